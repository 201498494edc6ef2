//! The only module that talks to a userfaultfd: typed events in, typed ioctl results out.
//!
//! The rest of the server names destinations by [`HostAddr`] and never sees a raw pointer.
//! COPY and ZEROPAGE are safe to call: the kernel only ever *populates missing* pages of ranges
//! registered on this uffd (an existing page yields EEXIST, never an overwrite), so no memory
//! that anyone can observe changes under their feet — in the VMM or in this process.

use crate::addr::HostAddr;
use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use userfaultfd::{Event, EventBuffer, Uffd};
use userfaultfd_sys::{uffdio_copy, uffdio_range, uffdio_zeropage, UFFDIO_COPY, UFFDIO_ZEROPAGE};

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
    /// The VMM forked (only with UFFD_FEATURE_EVENT_FORK); the child's uffd was closed.
    Fork,
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

/// A VM's userfaultfd. Always non-blocking: the fault loop polls it together with the VMM socket.
pub struct Userfaultfd {
    uffd: Uffd,
}

impl Userfaultfd {
    /// Takes ownership of a uffd received from a VMM and makes it non-blocking (a blocking uffd
    /// reports POLLERR to poll, so a VMM that sent one would otherwise never be served).
    pub fn from_owned(fd: OwnedFd) -> Result<Self, Errno> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `into_raw_fd` hands over sole ownership of an open fd, which `Uffd` closes on drop.
        let uffd = unsafe { <Uffd as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
        Ok(Userfaultfd { uffd })
    }

    /// Reads every pending event (never blocks) and appends them to `out`.
    pub fn read_events(&self, buf: &mut EventBuffer, out: &mut Vec<UffdEvent>) -> Result<(), ReadError> {
        let events = self.uffd.read_events(buf).map_err(|e| match e {
            userfaultfd::Error::ReadEof => ReadError::Eof,
            other => ReadError::Read(other.to_string()),
        })?;
        for event in events {
            let event = event.map_err(|e| ReadError::Read(e.to_string()))?;
            out.push(match event {
                Event::Pagefault { rw, addr, .. } => {
                    UffdEvent::Fault { addr: HostAddr(addr as u64), write: rw == userfaultfd::ReadWrite::Write }
                }
                Event::Remove { start, end } => {
                    UffdEvent::Remove { start: HostAddr(start as u64), end: HostAddr(end as u64) }
                }
                Event::Unmap { start, end } => {
                    UffdEvent::Unmap { start: HostAddr(start as u64), end: HostAddr(end as u64) }
                }
                Event::Remap { from, to, len } => {
                    UffdEvent::Remap { from: HostAddr(from as u64), to: HostAddr(to as u64), len: len as u64 }
                }
                Event::Fork { .. } => UffdEvent::Fork, // the child's Uffd is dropped (closed) here
            });
        }
        Ok(())
    }

    /// Places `src` at `dst` (page aligned, length a multiple of the region's page size) and
    /// wakes the threads waiting on it (free when none does). Returns the bytes placed.
    pub fn copy(&self, src: &[u8], dst: HostAddr) -> Result<u64, IoctlError> {
        let mut arg =
            uffdio_copy { dst: dst.0, src: src.as_ptr() as usize as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: `arg` is a valid uffdio_copy for the duration of the call; the kernel reads
        // `src.len()` bytes from a live slice and writes only `arg.copy`. Destination pages are
        // populated only if missing (see the module comment), so no observable memory changes.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
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
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
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
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_POISON as _, &mut arg) };
        if ret == 0 {
            Ok(u64::try_from(arg.updated).unwrap_or(0))
        } else {
            Err(IoctlError::from_errno(Errno::last(), arg.updated))
        }
    }

    /// Wakes threads waiting for faults in `[dst, dst + len)`.
    #[allow(clippy::cast_possible_truncation)] // host addresses are pointers of a 64-bit VMM
    pub fn wake(&self, dst: HostAddr, len: u64) -> Result<(), userfaultfd::Error> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.uffd.wake(dst.0 as usize as *mut std::ffi::c_void, len)
    }
}

impl Userfaultfd {
    /// The fd itself, for a successor to take over.
    pub fn into_owned(self) -> OwnedFd {
        // Not `IntoRawFd`: userfaultfd 0.9's `into_raw_fd` returns the fd and still closes it
        // when the `Uffd` drops.
        let uffd = std::mem::ManuallyDrop::new(self.uffd);
        // SAFETY: the `Uffd` will never drop, so the fd it owned is now owned here alone.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(uffd.as_raw_fd()) }
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}
