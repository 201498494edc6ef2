//! The socket directory and its sockets: who can reach the server.
//!
//! Whoever can connect to a snapshot's socket can hand the server a userfaultfd and have pages
//! placed into it, and whoever can replace a socket file can impersonate the server to every
//! VMM (and serve them any bytes). So the directory must be ours and writable by nobody else:
//! created 0700 (0711 with `--allow-uid`, so the allowed users can reach the sockets), refused
//! if it is a symlink, owned by another user, or writable by group or others. Sockets are bound
//! under a 077 umask and then opened as far as the configuration says: 0600 (only our user), or
//! 0666 with `--allow-uid`, where SO_PEERCRED decides. A socket of a server that is still
//! running is never replaced.

use nix::sys::stat::{umask, Mode};
use nix::unistd::geteuid;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket directory or a socket was refused.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum SocketError {
    #[error("cannot create socket directory {0}: {1}")]
    CreateDir(PathBuf, io::Error),
    #[error("socket directory {0}: {1}")]
    Stat(PathBuf, io::Error),
    #[error("socket directory {0} is not a directory (a symlink or a file): refusing it")]
    NotADirectory(PathBuf),
    #[error("socket directory {path} belongs to uid {owner}, not to this server's uid {ours}: refusing it")]
    OtherOwner { path: PathBuf, owner: u32, ours: u32 },
    #[error("socket directory {path} is writable by group or others (mode {mode:o}): anyone could replace its sockets; refusing it")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{0} is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0} is the socket of a running server: stop it first")]
    InUse(PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, io::Error),
    #[error("another server runs on socket directory {0} (it holds {LOCK_FILE}); stop it, or start this one with --takeover")]
    Locked(PathBuf),
    #[error("cannot lock socket directory {0}: {1}")]
    Lock(PathBuf, io::Error),
}

/// The lock file in the socket directory: held (flock) by the one server running there.
pub const LOCK_FILE: &str = ".lock";

/// Takes the socket directory's lock, or refuses when another server holds it. The lock goes
/// with the process (a crash releases it) or with its fd (a handover passes it on).
pub fn lock_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, SocketError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| SocketError::Lock(path.clone(), e))?;
    // SAFETY: flock takes an open fd and flags; it touches no memory.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => SocketError::Locked(dir.into()),
            _ => SocketError::Lock(path, e),
        });
    }
    Ok(file.into())
}

/// Who may connect to the snapshot sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// This server's user only.
    Owner,
    /// Any user; the server checks each peer's uid (`--allow-uid`).
    CheckedPeers,
}

/// Creates the socket directory, or checks the one that is there, and sets its mode.
pub fn prepare_dir(dir: &Path, access: Access) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SocketError::CreateDir(dir.into(), e))?,
        Err(e) => return Err(SocketError::Stat(dir.into(), e)),
        Ok(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| SocketError::Stat(dir.into(), e))?;
    if !meta.file_type().is_dir() {
        return Err(SocketError::NotADirectory(dir.into()));
    }
    let ours = geteuid().as_raw();
    if meta.uid() != ours {
        return Err(SocketError::OtherOwner { path: dir.into(), owner: meta.uid(), ours });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(SocketError::Writable { path: dir.into(), mode: meta.mode() & 0o7777 });
    }
    let mode = match access {
        Access::Owner => 0o700,
        Access::CheckedPeers => 0o711,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| SocketError::Stat(dir.into(), e))
}

/// Binds a socket at `path` (replacing a stale one of a server that is gone) with `access`.
pub fn bind(path: &Path, access: Access) -> Result<UnixListener, SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(SocketError::NotASocket(path.into())),
        Ok(_) if UnixStream::connect(path).is_ok() => return Err(SocketError::InUse(path.into())),
        Ok(_) => {
            std::fs::remove_file(path).map_err(|e| SocketError::Bind(path.into(), e))?;
            tracing::info!(path = %path.display(), "replaced a stale socket file");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::Bind(path.into(), e)),
    }
    // Bound with no permission for anyone but us, whatever the caller's umask: the socket
    // exists before it can be chmod-ed. Sockets are bound at start, before any thread.
    let previous = umask(Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(path);
    umask(previous);
    let listener = bound.map_err(|e| SocketError::Bind(path.into(), e))?;
    let mode = match access {
        Access::Owner => 0o600,
        Access::CheckedPeers => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SocketError::Bind(path.into(), e))?;
    Ok(listener)
}

/// Whether a control-socket peer may use it: this server's user, or root.
pub fn may_control(peer_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == geteuid().as_raw()
}
