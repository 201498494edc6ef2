//! A planned handover (upgrade): the running server passes its listening sockets and every
//! live VM to a successor over the control socket, then exits.
//!
//! ```text
//! successor → "handover\n"
//! predecessor: stops accepting and asks every VM to stop at a safe point (journal current), then
//!   Listeners { snapshots, metrics }  fds: lock, control, one per snapshot, metrics?
//!   Vm { journal, socket }            fds: uffd, VMM socket?   (one per VM, as each stops: a VM
//!                                     stalls for its own stop and adoption, not the slowest's)
//!   Done { vms }
//! successor → "ok\n" once it serves them; the predecessor exits
//! ```
//!
//! Each message is a little-endian u32 length and that much JSON, its fds attached to the
//! length. The successor re-reads each VM's journal (the one source of a VM's state, as after a
//! crash) and wakes its ranges before serving.

use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

/// Largest message accepted: a VM's carried state holds its recorded run (~16 bytes a page in
/// JSON; a 1 GiB set is 262,144 pages).
const MAX_MESSAGE_BYTES: u32 = 64 << 20;

/// A VM stopped for a successor: its journal, the fds the successor serves it through, and
/// what its service was doing (`C`: the server's business, carried as JSON).
#[derive(Debug)]
pub struct HandedVm<C> {
    /// Its journal file.
    pub journal: PathBuf,
    /// Its userfaultfd.
    pub uffd: OwnedFd,
    /// Its VMM's connection, if this server had one.
    pub socket: Option<UnixStream>,
    /// What the successor goes on from.
    pub carried: C,
}

/// The VMs stopped so far, collected from their threads as each reaches its safe point.
#[derive(Debug)]
pub struct Collector<C> {
    vms: Mutex<Vec<HandedVm<C>>>,
    given: Condvar,
}

impl<C> Default for Collector<C> {
    fn default() -> Self {
        Collector { vms: Mutex::default(), given: Condvar::new() }
    }
}

impl<C> Collector<C> {
    /// A VM's thread gives it up.
    pub fn give(&self, vm: HandedVm<C>) {
        self.lock().push(vm);
        self.given.notify_all();
    }

    /// The VMs given so far, waiting up to `wait` for one if there are none.
    pub fn take(&self, wait: std::time::Duration) -> Vec<HandedVm<C>> {
        let mut vms = self.lock();
        if vms.is_empty() {
            vms = self.given.wait_timeout(vms, wait).map_or_else(|p| p.into_inner().0, |(vms, _)| vms);
        }
        std::mem::take(&mut *vms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HandedVm<C>>> {
        // Only ever pushed to or emptied whole: a poisoned list is consistent.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One message of the handover; `C` is what a VM's service carries over.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message<C> {
    /// The listening sockets: fds lock, control, then one per snapshot in this order, then the
    /// metrics listener if `metrics`.
    Listeners {
        /// The snapshot names of the snapshot listeners, in fd order.
        snapshots: Vec<String>,
        /// Whether a metrics listener follows.
        metrics: bool,
    },
    /// A VM: fds uffd, then its VMM socket if `socket`.
    Vm {
        /// Its journal.
        journal: PathBuf,
        /// Whether its VMM socket follows.
        socket: bool,
        /// What its service goes on from (missing from an older predecessor: defaults).
        #[serde(default)]
        carried: C,
    },
    /// Every VM was sent.
    Done {
        /// How many.
        vms: usize,
    },
}

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum HandoverError {
    #[error("handover connection: {0}")]
    Io(#[from] io::Error),
    #[error("handover message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("handover message of {0} bytes is too large")]
    TooLarge(u32),
    #[error("handover message {what} came with {got} fds, expected {expected}")]
    Fds { what: &'static str, got: usize, expected: usize },
    #[error("the predecessor closed the handover before it was done")]
    Cut,
    #[error("unexpected handover message: {0}")]
    Unexpected(String),
}

/// Sends `message` with `fds`.
pub fn send<C: Serialize>(stream: &UnixStream, message: &Message<C>, fds: &[RawFd]) -> Result<(), HandoverError> {
    let json = serde_json::to_vec(message)?;
    let len = u32::try_from(json.len()).map_err(|_| HandoverError::TooLarge(u32::MAX))?;
    let header = len.to_le_bytes();
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let cmsgs: &[_] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&header)],
        cmsgs,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    if sent != header.len() {
        return Err(HandoverError::Io(io::Error::other("short write of a message header")));
    }
    io::Write::write_all(&mut &*stream, &json)?;
    Ok(())
}

/// Receives one message and the fds that came with it.
pub fn receive<C: serde::de::DeserializeOwned + Default>(
    stream: &UnixStream,
) -> Result<(Message<C>, Vec<OwnedFd>), HandoverError> {
    let mut header = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: each fd arrived with this message and is owned by nothing else yet.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Err(HandoverError::Cut);
    }
    (&*stream).read_exact(&mut header[got..])?;
    let len = u32::from_le_bytes(header);
    if len > MAX_MESSAGE_BYTES {
        return Err(HandoverError::TooLarge(len));
    }
    let mut json = vec![0u8; len as usize];
    (&*stream).read_exact(&mut json)?;
    Ok((serde_json::from_slice(&json)?, fds))
}

/// Checks that `fds` has `expected` fds for message `what`.
pub fn expect_fds(what: &'static str, fds: &[OwnedFd], expected: usize) -> Result<(), HandoverError> {
    if fds.len() == expected {
        Ok(())
    } else {
        Err(HandoverError::Fds { what, got: fds.len(), expected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_fds_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        send(&a, &Message::<()>::Listeners { snapshots: vec!["a".into(), "b".into()], metrics: false }, &raw).unwrap();
        send(&a, &Message::<()>::Done { vms: 0 }, &[]).unwrap();
        let (message, fds) = receive::<()>(&b).unwrap();
        assert!(matches!(message, Message::Listeners { ref snapshots, metrics: false } if snapshots.len() == 2));
        use std::os::unix::fs::MetadataExt;
        let ino = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let sent: Vec<u64> = raw.iter().map(|&fd| ino(fd)).collect();
        let got: Vec<u64> = fds.iter().map(|fd| ino(fd.as_raw_fd())).collect();
        assert_eq!(sent, got);
        let (message, fds) = receive::<()>(&b).unwrap();
        assert!(matches!(message, Message::Done { vms: 0 }) && fds.is_empty());
        drop(a);
        assert!(matches!(receive::<()>(&b), Err(HandoverError::Cut)));
    }
}
