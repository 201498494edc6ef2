//! The only module that talks to a userfaultfd: typed events in, typed ioctl results out.
//!
//! The rest of the server names destinations by [`HostAddr`] and never sees a raw pointer.
//! COPY and ZEROPAGE are safe to call: the kernel only ever *populates missing* pages of ranges
//! registered on this uffd (an existing page yields EEXIST, never an overwrite), so no memory
//! that anyone can observe changes under their feet — in the VMM or in this process.

use crate::addr::HostAddr;
use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use userfaultfd_sys::{uffdio_copy, uffdio_range, uffdio_zeropage, UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_ZEROPAGE};

/// `struct uffdio_poison` (linux/userfaultfd.h, 6.6+; not in userfaultfd-sys 0.6).
#[repr(C)]
struct UffdioPoison {
    range: uffdio_range,
    mode: u64,
    updated: i64,
}

/// `UFFDIO_POISON = _IOWR(0xAA, 0x08, struct uffdio_poison)`.
const UFFDIO_POISON: u64 = 0xC020_AA08;

/// What an ioctl on the uffd can report that the fault loop must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoctlError {
    /// Some page of the range is present.
    #[error("the range is already populated (EEXIST)")]
    Exists,
    /// A memory-layout event (REMOVE, UNMAP, …) is pending and must be read first; `copied`
    /// bytes from the start of the range were placed before it stopped.
    #[error("a memory-layout event is pending; {copied} bytes were placed (EAGAIN)")]
    Again {
        /// Bytes placed from the start of the range.
        copied: u64,
    },
    /// The VMM exited.
    #[error("the VMM's address space is gone (ESRCH)")]
    VmGone,
    /// The range is not (or not wholly) one registered mapping.
    #[error("the range is not registered on this uffd as one mapping (ENOENT)")]
    NotRegistered,
    /// Anything else.
    #[error("userfaultfd ioctl failed: {0}")]
    Other(Errno),
}

impl IoctlError {
    fn from_errno(errno: Errno, copied: i64) -> Self {
        match errno {
            Errno::EEXIST => IoctlError::Exists,
            Errno::EAGAIN => IoctlError::Again { copied: u64::try_from(copied).unwrap_or(0) },
            Errno::ESRCH => IoctlError::VmGone,
            Errno::ENOENT => IoctlError::NotRegistered,
            other => IoctlError::Other(other),
        }
    }
}

/// The size of one event as the kernel writes it (`struct uffd_msg`).
pub const MSG_LEN: usize = std::mem::size_of::<userfaultfd_sys::uffd_msg>();

/// An event read from the uffd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are the kernel's
pub enum UffdEvent {
    /// A thread touched a missing page at `addr`.
    Fault { addr: HostAddr, write: bool },
    /// `madvise(MADV_DONTNEED/REMOVE)` (a balloon, free-page reporting): the range must read as
    /// zeros from now on.
    Remove { start: HostAddr, end: HostAddr },
    /// The VMM unmapped a range (only with UFFD_FEATURE_EVENT_UNMAP, which Firecracker does not set).
    Unmap { start: HostAddr, end: HostAddr },
    /// The VMM moved a range (only with UFFD_FEATURE_EVENT_REMAP).
    Remap { from: HostAddr, to: HostAddr, len: u64 },
    /// The VMM forked (only with UFFD_FEATURE_EVENT_FORK); the kernel put the child's uffd in
    /// the reader's fd table as `ufd`.
    Fork { ufd: i32 },
}

impl UffdEvent {
    /// The event in one `struct uffd_msg` (`msg`, [`MSG_LEN`] bytes, as the kernel wrote it);
    /// None for a zeroed slot or an event this server does not know.
    pub fn decode(msg: &[u8]) -> Option<UffdEvent> {
        let word = |at: usize| Some(u64::from_ne_bytes(msg.get(at..at + 8)?.try_into().ok()?));
        // `struct uffd_msg`: the event's kind in the first byte, its arguments from byte 8.
        Some(match *msg.first()? {
            0x12 => UffdEvent::Fault {
                addr: HostAddr(word(16)?),
                write: word(8)? & userfaultfd_sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
            },
            0x13 => UffdEvent::Fork { ufd: i32::from_ne_bytes(msg.get(8..12)?.try_into().ok()?) },
            0x14 => UffdEvent::Remap { from: HostAddr(word(8)?), to: HostAddr(word(16)?), len: word(24)? },
            0x15 => UffdEvent::Remove { start: HostAddr(word(8)?), end: HostAddr(word(16)?) },
            0x16 => UffdEvent::Unmap { start: HostAddr(word(8)?), end: HostAddr(word(16)?) },
            _ => return None,
        })
    }
}

/// Why reading events failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The uffd has no VMM behind it any more.
    #[error("the uffd reported end of file")]
    Eof,
    /// Anything else.
    #[error("reading the uffd failed: {0}")]
    Read(String),
}

/// A VM's userfaultfd. Non-blocking but while the fault loop waits in a blocking `read`
/// ([`Userfaultfd::set_blocking`]).
///
/// Held as a plain fd, every ioctl issued here: of the `userfaultfd` crate's `Uffd` the server
/// used only `wake`, and its `into_raw_fd` still closes the fd when the `Uffd` drops.
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Takes ownership of a uffd received from a VMM and makes it non-blocking (a blocking uffd
    /// reports POLLERR to poll, so a VMM that sent one would otherwise never be served).
    pub fn from_owned(fd: OwnedFd) -> Result<Self, Errno> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Userfaultfd { fd })
    }

    /// Reads every pending event (never blocks) into `buf` (whole events: a multiple of
    /// [`MSG_LEN`] bytes) and appends them to `out`. `buf` is where the kernel writes them:
    /// the VM's events file, when it has a journal (`crate::recovery::events_file`).
    pub fn read_events(&self, buf: &mut [u8], out: &mut Vec<UffdEvent>) -> Result<(), ReadError> {
        self.read_events_with(buf, out, |uffd, buf| nix::unistd::read(uffd.as_raw_fd(), buf))
    }

    /// As [`Userfaultfd::read_events`], reading with `read` (a blocking read that a signal
    /// interrupts: `EINTR` is no event, like `EAGAIN`).
    pub fn read_events_with(
        &self,
        buf: &mut [u8],
        out: &mut Vec<UffdEvent>,
        read: impl FnOnce(BorrowedFd<'_>, &mut [u8]) -> nix::Result<usize>,
    ) -> Result<(), ReadError> {
        let len = match read(self.fd.as_fd(), buf) {
            Err(Errno::EAGAIN | Errno::EINTR) => 0,
            Err(e) => return Err(ReadError::Read(e.to_string())),
            Ok(0) => return Err(ReadError::Eof),
            Ok(len) if len % MSG_LEN != 0 => {
                return Err(ReadError::Read(format!("a read of {len} bytes is not whole events")))
            }
            Ok(len) => len,
        };
        for msg in buf[..len].chunks_exact(MSG_LEN) {
            match UffdEvent::decode(msg) {
                Some(UffdEvent::Fork { ufd }) => {
                    // SAFETY: the kernel installed `ufd` in our fd table for this read, and
                    // nothing else knows it: owning it here closes it.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ufd) });
                    out.push(UffdEvent::Fork { ufd });
                }
                Some(event) => out.push(event),
                None => return Err(ReadError::Read(format!("an event of unknown kind {:#x}", msg[0]))),
            }
        }
        Ok(())
    }

    /// Makes `read` on the uffd block (`blocking`) or return EAGAIN when no event is pending.
    /// The flag belongs to the open file, which the VMM shares: the VMM never reads its copy,
    /// and a successor sets it again for itself ([`Userfaultfd::from_owned`]).
    pub fn set_blocking(&self, blocking: bool) -> Result<(), Errno> {
        let flags = nix::fcntl::fcntl(self.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
        flags.set(nix::fcntl::OFlag::O_NONBLOCK, !blocking);
        nix::fcntl::fcntl(self.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).map(drop)
    }

    /// Places `src` at `dst` (page aligned, length a multiple of the region's page size) and
    /// wakes the threads waiting on it (free when none does). Returns the bytes placed.
    pub fn copy(&self, src: &[u8], dst: HostAddr) -> Result<u64, IoctlError> {
        let mut arg =
            uffdio_copy { dst: dst.0, src: src.as_ptr() as usize as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: `arg` is a valid uffdio_copy for the duration of the call; the kernel reads
        // `src.len()` bytes from a live slice and writes only `arg.copy`. Destination pages are
        // populated only if missing (see the module comment), so no observable memory changes.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
        if ret == 0 {
            Ok(u64::try_from(arg.copy).unwrap_or(0))
        } else {
            Err(IoctlError::from_errno(Errno::last(), arg.copy))
        }
    }

    /// Maps the zero page over `[dst, dst + len)` (anonymous memory only: not hugetlbfs) and
    /// wakes the threads waiting on it.
    pub fn zeropage(&self, dst: HostAddr, len: u64) -> Result<u64, IoctlError> {
        let mut arg = uffdio_zeropage { range: uffdio_range { start: dst.0, len }, mode: 0, zeropage: 0 };
        // SAFETY: as for `copy`: a valid argument struct, and only missing pages are populated.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
        if ret == 0 {
            Ok(u64::try_from(arg.zeropage).unwrap_or(0))
        } else {
            Err(IoctlError::from_errno(Errno::last(), arg.zeropage))
        }
    }

    /// Marks `[dst, dst + len)` poisoned (Linux 6.6+): a thread touching it gets a memory
    /// error (SIGBUS; a KVM vCPU exits to its VMM) instead of waiting for a page that will never
    /// come. For faults whose bytes cannot be had.
    pub fn poison(&self, dst: HostAddr, len: u64) -> Result<u64, IoctlError> {
        let mut arg = UffdioPoison { range: uffdio_range { start: dst.0, len }, mode: 0, updated: 0 };
        // SAFETY: a valid uffdio_poison for the duration of the call; like COPY, it only fills
        // missing pages of ranges registered on this uffd (with poison markers).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON as _, &mut arg) };
        if ret == 0 {
            Ok(u64::try_from(arg.updated).unwrap_or(0))
        } else {
            Err(IoctlError::from_errno(Errno::last(), arg.updated))
        }
    }

    /// Wakes threads waiting for faults in `[dst, dst + len)`.
    pub fn wake(&self, dst: HostAddr, len: u64) -> Result<(), IoctlError> {
        let mut range = uffdio_range { start: dst.0, len };
        // SAFETY: a valid uffdio_range for the duration of the call, which the kernel only
        // reads; waking changes no memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if ret == 0 {
            Ok(())
        } else {
            Err(IoctlError::from_errno(Errno::last(), 0))
        }
    }
}

impl Userfaultfd {
    /// The fd itself, for a successor to take over.
    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userfaultfd::{FeatureFlags, UffdBuilder};

    #[test]
    fn a_remove_the_kernel_wrote_into_the_buffer_decodes_to_its_range() {
        let uffd = UffdBuilder::new()
            .non_blocking(true)
            .user_mode_only(true)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .expect("a userfaultfd with REMOVE events");
        let len = 16 * 4096;
        let memory = memmap2::MmapMut::map_anon(len).expect("anonymous memory");
        let base = memory.as_ptr() as usize;
        uffd.register(memory.as_ptr() as *mut _, len).expect("register");
        // Not `into_raw_fd`: userfaultfd 0.9's still closes the fd when the `Uffd` drops.
        let uffd = std::mem::ManuallyDrop::new(uffd);
        // SAFETY: the `Uffd` never drops, so its fd is owned here alone.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(uffd.as_raw_fd()) };
        let uffd = Userfaultfd::from_owned(fd).expect("non-blocking");
        // The madvise waits until its REMOVE is read, as a VMM's balloon does.
        let remover = std::thread::spawn(move || {
            // SAFETY: the range lies inside `memory`, which outlives this thread (joined
            // below); dropping its pages is what the test is about.
            unsafe { libc::madvise((base + 4 * 4096) as *mut _, 8 * 4096, libc::MADV_DONTNEED) }
        });
        let mut buf = [0xffu8; 4 * MSG_LEN];
        let mut events = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while events.is_empty() && std::time::Instant::now() < deadline {
            uffd.read_events(&mut buf, &mut events).expect("read");
            std::thread::yield_now();
        }
        assert_eq!(remover.join().expect("madvise thread"), 0);
        let (start, end) = (HostAddr((base + 4 * 4096) as u64), HostAddr((base + 12 * 4096) as u64));
        assert_eq!(events, vec![UffdEvent::Remove { start, end }]);
        assert_eq!(UffdEvent::decode(&buf[..MSG_LEN]), Some(UffdEvent::Remove { start, end }), "the buffer holds it");
        assert_eq!(UffdEvent::decode(&[0u8; MSG_LEN]), None, "a zeroed slot is no event");
        drop(memory);
    }
}
