//! Surviving the server's own end: a VM outlives the process that served it.
//!
//! - [`journal`]: per attached VM, what a successor needs (pid, uffd, regions, removed ranges);
//! - [`events_file`]: per journal, the buffer its VM's events are read into, so a REMOVE read
//!   but not journaled yet when the process died is not lost;
//! - [`reacquire`]: after a crash, its uffd taken back from the VMM with `pidfd_getfd`;
//! - [`handover`]: a planned handover, every VM's fds passed to a successor over a socket.
//!
//! Either way the successor wakes every registered range, so a fault its predecessor read and
//! did not answer is raised again, and serves on.

pub mod events_file;
pub mod handover;
pub mod journal;
pub mod reacquire;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A new file at `path` holding `bytes`, written under a random name in `dir` (its
/// directory) and renamed over `path`: a successor reading the directory never sees part of
/// one. Returns it open for writing. Not synced: a journal outlives the server's process, not
/// the host.
fn create_whole(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::Write as _;
    let mut tmp = tempfile::Builder::new().prefix(".vm-").suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)
}

/// Asks every VM's fault loop to stop at its next safe point: a flag for loops that are busy
/// (checked each turn), and a pipe that wakes the ones waiting in `poll`.
#[derive(Debug)]
pub struct StopSignal {
    requested: AtomicBool,
    readable: OwnedFd,
    writable: OwnedFd,
}

impl StopSignal {
    /// A signal not raised yet.
    pub fn new() -> std::io::Result<StopSignal> {
        let (readable, writable) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        Ok(StopSignal { requested: AtomicBool::new(false), readable, writable })
    }

    /// Raises it: every loop stops at its next safe point. The byte is never read, so the
    /// pipe stays readable for every poll from now on.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&self.writable, &[1]);
    }

    /// Whether it was raised.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Lowers it again (a handover that failed: the server goes on). Only once nothing waits
    /// on it: loops that see it raised stop.
    pub fn clear(&self) {
        let mut byte = [0u8; 64];
        while matches!(nix::unistd::read(self.readable.as_raw_fd(), &mut byte), Ok(n) if n > 0) {}
        self.requested.store(false, Ordering::SeqCst);
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.readable.as_fd()
    }
}
