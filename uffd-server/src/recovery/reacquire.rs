//! Taking a VM's userfaultfd back from its VMM after a crash: the VMM keeps its own copy
//! (Firecracker does), so `pidfd_open` + `pidfd_getfd` fetch it again.
//!
//! Nothing is touched unless it is provably the journaled VM: the pidfd pins one process, its
//! start time must be the journaled one (a pid reused by another process differs), and the fd
//! taken must be the uffd with the journaled inode.

use super::journal::JournalHeader;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

/// Why a journaled VM cannot be taken back.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum ReacquireError {
    #[error("its VMM (pid {0}) has exited")]
    VmmGone(i32),
    #[error("pid {0} is another process now (started at tick {1}, the VMM at {2}): not touched")]
    PidReused(i32, u64, u64),
    #[error("the VMM (pid {0}) no longer holds the userfaultfd")]
    UffdClosed(i32),
    #[error("cannot take the userfaultfd from pid {0}: {1} (the server needs CAP_SYS_PTRACE over its VMMs)")]
    Denied(i32, std::io::Error),
    #[error("pid {0}: {1}")]
    Io(i32, std::io::Error),
}

/// A VM taken back: its VMM's pidfd and its uffd.
pub struct Reacquired {
    /// Readable when the VMM exits.
    pub pidfd: OwnedFd,
    /// The uffd, the journaled one.
    pub uffd: OwnedFd,
}

/// A pidfd for `pid`: readable (POLLIN) once the process exits.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A copy of fd `target` of the process behind `pidfd`.
fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two fds and flags and returns a new fd (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22).
pub fn start_ticks(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
    let after_name = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or_default();
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|ticks| ticks.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/stat has no start time")))
}

/// The fds of the processes looked at so far: pid → (device, inode) → fd number. A VMM that
/// runs many VMs (one process, many uffds) has its `/proc/PID/fd` read once, not once per VM.
#[derive(Debug, Default)]
pub struct FdTables {
    tables: std::collections::HashMap<i32, std::collections::HashMap<(u64, u64), RawFd>>,
}

/// Takes back the uffd of the VM `header` journals.
pub fn reacquire(header: &JournalHeader, fd_tables: &mut FdTables) -> Result<Reacquired, ReacquireError> {
    let pid = header.peer_pid;
    let gone_or = |e: std::io::Error, other: fn(i32, std::io::Error) -> ReacquireError| match e.raw_os_error() {
        Some(libc::ESRCH | libc::ENOENT) => ReacquireError::VmmGone(pid),
        _ => other(pid, e),
    };
    let pidfd = pidfd_open(pid).map_err(|e| gone_or(e, ReacquireError::Io))?;
    // Checked after the pidfd pins the process: a pid reused before pidfd_open shows here.
    let started = start_ticks(pid).map_err(|e| gone_or(e, ReacquireError::Io))?;
    if started != header.peer_start_ticks {
        return Err(ReacquireError::PidReused(pid, started, header.peer_start_ticks));
    }
    let table = match fd_tables.tables.entry(pid) {
        std::collections::hash_map::Entry::Occupied(table) => table.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => slot.insert(fd_table(pid)?),
    };
    let target = *table.get(&header.uffd).ok_or(ReacquireError::UffdClosed(pid))?;
    let uffd = pidfd_getfd(&pidfd, target).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => ReacquireError::Denied(pid, e),
        _ => gone_or(e, ReacquireError::Io),
    })?;
    // The fd number may have been closed and reused between the scan and the copy.
    let meta =
        std::fs::metadata(format!("/proc/self/fd/{}", uffd.as_raw_fd())).map_err(|e| ReacquireError::Io(pid, e))?;
    if (meta.dev(), meta.ino()) != header.uffd {
        return Err(ReacquireError::UffdClosed(pid));
    }
    Ok(Reacquired { pidfd, uffd })
}

/// The fds of `pid`, by the (device, inode) of the file each is open on.
fn fd_table(pid: i32) -> Result<std::collections::HashMap<(u64, u64), RawFd>, ReacquireError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => ReacquireError::VmmGone(pid),
        Some(libc::EACCES | libc::EPERM) => ReacquireError::Denied(pid, e),
        _ => ReacquireError::Io(pid, e),
    })?;
    let mut table = std::collections::HashMap::new();
    for entry in entries.flatten() {
        // Only anonymous inodes can be uffds: a readlink is cheaper than a stat of a file.
        let is_anon = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"anon_inode:"));
        // stat follows the magic link to the open file itself.
        let Some(meta) = is_anon.then(|| std::fs::metadata(entry.path()).ok()).flatten() else { continue };
        if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            table.insert((meta.dev(), meta.ino()), fd);
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_reads_this_process_and_differs_from_a_younger_one() {
        let ours = start_ticks(std::process::id().cast_signed()).unwrap();
        assert!(ours > 0);
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let theirs = start_ticks(child.id().cast_signed()).unwrap();
        assert!(theirs >= ours);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(start_ticks(child.id().cast_signed()).is_err(), "a reaped process has no stat");
    }

    #[test]
    fn an_fd_is_taken_back_from_a_process_only_by_its_identity() {
        // A uffd of our own (every uffd has an anonymous inode of its own).
        let uffd = userfaultfd::UffdBuilder::new().user_mode_only(true).create().unwrap();
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", uffd.as_raw_fd())).unwrap();
        let pid = std::process::id().cast_signed();
        let header = |ticks, ino| JournalHeader {
            format: super::super::journal::JOURNAL_FORMAT,
            snapshot: "s".into(),
            identity: prefetch::identity::SnapshotIdentity { len: 0, fingerprint: 0 },
            peer_pid: pid,
            peer_start_ticks: ticks,
            uffd: (meta.dev(), ino),
            regions: Vec::new(),
        };
        let ticks = start_ticks(pid).unwrap();
        let mut tables = FdTables::default();
        let taken = reacquire(&header(ticks, meta.ino()), &mut tables).unwrap();
        let copy = std::fs::metadata(format!("/proc/self/fd/{}", taken.uffd.as_raw_fd())).unwrap();
        assert_eq!(copy.ino(), meta.ino());
        let mut tables = FdTables::default();
        assert!(matches!(reacquire(&header(ticks + 1, meta.ino()), &mut tables), Err(ReacquireError::PidReused(..))));
        let other = reacquire(&header(ticks, meta.ino() + 1_000_000), &mut tables);
        assert!(matches!(other, Err(ReacquireError::UffdClosed(_))));
    }
}
