//! One placement path: a piece of a VM's memory filled from a page source.
//!
//! Demand faults, synchronous installs (`eager`, `reap`) and prefetch batches all place through
//! [`Placer::fill`], so what a page is filled with, and what each ioctl outcome means, is
//! decided here once:
//! - all-zero in the source → ZEROPAGE on a read; a copy of zeros on a write (ZEROPAGE would
//!   cost a second, CoW fault: measured 2× slower) and in hugetlbfs (no ZEROPAGE there);
//! - `EEXIST`: that page is present (placed by a fault or a prefetch before us), the rest of the
//!   piece is still placed;
//! - `ENOENT` on a multi-page piece: the piece spans two mappings (e.g. split by `mprotect`), it
//!   is placed one page at a time;
//! - `EAGAIN`: a memory-layout event (REMOVE) is pending; the caller must let the loop read it
//!   and call again for the rest ([`Stop::NeedEvents`]);
//! - `ESRCH`: the VMM is gone.

use super::pieces::{Piece, MAX_PIECE};
use super::uffd_io::{IoctlError, Userfaultfd};
use crate::addr::{HostAddr, PageSize};
use crate::source::{PageSource, SourceError};
use std::cell::RefCell;
use std::sync::OnceLock;

/// Whether the faulting access was a write: decides how zero pages are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read (or a prefetch): zero pages are mapped to the shared zero page.
    Read,
    /// A write: zero pages are copied, so the write does not take a second fault.
    Write,
}

/// What filling a piece came to. Byte counts, from the start of the piece: everything below
/// [`Outcome::handled`] is in the guest's memory now.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes copied from the source.
    pub copied: u64,
    /// Bytes of zero pages mapped with ZEROPAGE.
    pub zero_mapped: u64,
    /// Bytes of zero pages copied from the zero buffer.
    pub zero_copied: u64,
    /// Bytes found already present.
    pub present: u64,
    /// Bytes outside every registered mapping (the VMM changed its mappings).
    pub unregistered: u64,
    /// Why filling stopped before the end of the piece, if it did.
    pub stop: Option<Stop>,
}

/// Why filling a piece stopped early.
#[derive(Debug)]
pub enum Stop {
    /// A memory-layout event is pending: read events, then fill the rest of the piece.
    NeedEvents,
    /// The VMM's address space is gone.
    Gone,
    /// The source or the ioctl failed for this range.
    Failed(PlaceError),
}

/// A failure to place a range.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The source could not give the bytes.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// The ioctl failed.
    #[error("placing at {at} failed: {error}")]
    Ioctl {
        /// Where.
        at: HostAddr,
        /// What the kernel said.
        error: IoctlError,
    },
}

impl Outcome {
    /// Bytes placed by this fill.
    pub fn placed(&self) -> u64 {
        self.copied + self.zero_mapped + self.zero_copied
    }

    /// Bytes from the start of the piece that are in memory, or never will be from us.
    pub fn handled(&self) -> u64 {
        self.placed() + self.present + self.unregistered
    }
}

/// How one ioctl placed a range.
#[derive(Clone, Copy)]
enum Kind {
    Copied,
    ZeroMapped,
    ZeroCopied,
}

/// The zero buffer: the source for zero pages that must be *copied* rather than mapped with
/// UFFDIO_ZEROPAGE. A zeroed allocation this large is fresh anonymous memory that is never
/// written, so it costs no RAM.
fn zero_buffer() -> &'static [u8] {
    static ZEROS: OnceLock<Box<[u8]>> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; usize::try_from(MAX_PIECE).expect("2 MiB fits in usize")].into_boxed_slice())
}

/// Places pieces into one VM's memory. Lives on that VM's thread.
pub struct Placer<'a> {
    uffd: &'a Userfaultfd,
    /// Where sources that do not hold their bytes in RAM put them.
    scratch: RefCell<Vec<u8>>,
}

impl<'a> Placer<'a> {
    /// A placer into the VM behind `uffd`.
    pub fn new(uffd: &'a Userfaultfd) -> Placer<'a> {
        Placer { uffd, scratch: RefCell::new(Vec::new()) }
    }

    /// The VM's userfaultfd.
    pub fn uffd(&self) -> &'a Userfaultfd {
        self.uffd
    }

    /// Fills every missing page of `piece` from `source`.
    pub fn fill(&self, piece: Piece, source: &dyn PageSource, access: Access) -> Outcome {
        let unit = piece.page_size.bytes();
        let mut outcome = Outcome::default();
        let mut one_page_at_a_time = false;
        while outcome.handled() < piece.len {
            let at = outcome.handled();
            let part = piece.part(at, if one_page_at_a_time { unit } else { piece.len - at });
            let (kind, result) = match self.place_once(part, source, access) {
                Ok(placed) => placed,
                Err(e) => {
                    outcome.stop = Some(Stop::Failed(e.into()));
                    break;
                }
            };
            let placed = match result {
                Ok(bytes) if bytes > 0 => bytes,
                // Success without progress would loop for ever: never seen, refused all the same.
                Ok(_) => {
                    let error = IoctlError::Other(nix::errno::Errno::EIO);
                    outcome.stop = Some(Stop::Failed(PlaceError::Ioctl { at: part.host, error }));
                    break;
                }
                // Stopped after `copied` bytes; the next ioctl says why.
                Err(IoctlError::Again { copied }) if copied > 0 => copied,
                Err(IoctlError::Exists) => {
                    outcome.present += unit;
                    continue;
                }
                Err(IoctlError::Again { .. }) => {
                    outcome.stop = Some(Stop::NeedEvents);
                    break;
                }
                Err(IoctlError::NotRegistered) if part.len > unit => {
                    one_page_at_a_time = true;
                    continue;
                }
                Err(IoctlError::NotRegistered) => {
                    outcome.unregistered += unit;
                    continue;
                }
                Err(IoctlError::VmGone) => {
                    outcome.stop = Some(Stop::Gone);
                    break;
                }
                Err(error @ IoctlError::Other(_)) => {
                    outcome.stop = Some(Stop::Failed(PlaceError::Ioctl { at: part.host, error }));
                    break;
                }
            };
            match kind {
                Kind::Copied => outcome.copied += placed,
                Kind::ZeroMapped => outcome.zero_mapped += placed,
                Kind::ZeroCopied => outcome.zero_copied += placed,
            }
        }
        outcome
    }

    /// Wakes threads waiting on `piece` (on finding it present: whoever placed it woke only
    /// those waiting then).
    pub fn wake(&self, piece: &Piece) {
        if let Err(e) = self.uffd.wake(piece.host, piece.len) {
            tracing::debug!(host = %piece.host, len = piece.len, "wake failed: {e}");
        }
    }

    /// One ioctl (at most [`MAX_PIECE`] of zeros): how it placed, and what it returned.
    fn place_once(
        &self,
        part: Piece,
        source: &dyn PageSource,
        access: Access,
    ) -> Result<(Kind, Result<u64, IoctlError>), SourceError> {
        if source.is_zero(part.file, part.len) {
            if access == Access::Write || part.page_size == PageSize::Huge {
                let zeros = &zero_buffer()[..part.len.min(MAX_PIECE) as usize];
                return Ok((Kind::ZeroCopied, self.uffd.copy(zeros, part.host)));
            }
            return Ok((Kind::ZeroMapped, self.uffd.zeropage(part.host, part.len)));
        }
        let mut scratch = self.scratch.borrow_mut();
        let bytes = source.read(part.file, part.len, &mut scratch)?;
        Ok((Kind::Copied, self.uffd.copy(bytes, part.host)))
    }
}
