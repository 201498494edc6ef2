//! Page sources: where the bytes of a snapshot's file range come from.
//!
//! [`PageSource`] is the one seam between placing memory and storing it. The fault path asks a
//! source for a file range and places what it gets; it never knows whether the bytes sat in RAM
//! ([`ram`]), were read from the memory file ([`disk`]) or from a loading-set batch
//! ([`loading_set`]), or are zeros because the guest gave the range back ([`Zeros`]). A
//! deduplicated, compressed or remote store plugs in here without touching the loop.

pub mod chunk_pool;
pub mod chunked;
pub mod disk;
pub mod loading_set;
pub mod pack_fetch;
pub mod ram;
pub mod snapshot;
pub mod store;
pub mod zero_pages;

use crate::addr::FileOffset;
use std::io;

/// The bytes of a snapshot memory file, by file range.
///
/// Contract: `is_zero` may only say true for ranges that *are* all zeros (a source that does
/// not know says false, and the bytes it reads are zeros anyway). `read` returns exactly `len`
/// bytes of the file at `offset`, never other ones: a source that cannot, says so with an error
/// and the caller serves nothing from it. A source that keeps its bytes elsewhere (a file,
/// compressed chunks, an object store) reads, decompresses or fetches them into `scratch`, a
/// buffer of the calling VM, and may block until they are there: it runs on that VM's fault
/// thread and never holds up another VM.
pub trait PageSource {
    /// Length of the memory file the source serves, in bytes.
    fn file_len(&self) -> u64;

    /// Whether every 4 KiB page overlapping `[offset, offset + len)` is known to be all zeros.
    fn is_zero(&self, offset: FileOffset, len: u64) -> bool;

    /// The bytes of `[offset, offset + len)`: a slice of the source's own memory, or of
    /// `scratch` after reading them into it.
    fn read<'s>(&'s self, offset: FileOffset, len: u64, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError>;

    /// Bytes of RAM the source holds (what a cache budget counts).
    fn resident_bytes(&self) -> u64 {
        0
    }

    /// The longest read served in place, from the source's own memory; a longer one is put
    /// together in `scratch` (a chunked source: a read across chunks). Prefetch copies no more
    /// at once: an extra copy of the bytes costs more than the larger UFFDIO_COPY saves.
    fn contiguous_len(&self) -> u64 {
        u64::MAX
    }

    /// Readies `[offset, offset + len)` for fast reads (a compressed source decompresses it
    /// ahead of the VMs that will need it); a hint, ignored by sources that are always fast.
    fn warm(&self, _offset: FileOffset, _len: u64) {}
}

/// Why a source could not give the bytes of a range.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The range leaves the file.
    #[error("range {offset}+{len:#x} leaves the memory file ({file_len:#x} bytes)")]
    OutOfRange {
        /// Start of the range.
        offset: FileOffset,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The file changed since it was loaded: its bytes are not the snapshot's any more.
    #[error("the memory file changed since it was loaded: {len:#x} bytes at {offset} are not served")]
    Changed {
        /// Start of the range.
        offset: FileOffset,
        /// Its length.
        len: u64,
    },
    /// Reading the bytes failed.
    #[error("reading {len:#x} bytes at {offset} failed: {source}")]
    Read {
        /// Start of the range.
        offset: FileOffset,
        /// Its length.
        len: u64,
        /// What the read reported.
        source: io::Error,
    },
}

/// The end of `[offset, offset + len)` when it lies inside a file of `file_len` bytes.
pub(crate) fn checked_end(offset: FileOffset, len: u64, file_len: u64) -> Result<u64, SourceError> {
    offset.0.checked_add(len).filter(|&end| end <= file_len).ok_or(SourceError::OutOfRange { offset, len, file_len })
}

/// Pages that must read as zeros whatever the snapshot holds: ranges the guest removed
/// (balloon, free-page reporting).
pub struct Zeros;

impl PageSource for Zeros {
    fn file_len(&self) -> u64 {
        u64::MAX
    }

    fn is_zero(&self, _offset: FileOffset, _len: u64) -> bool {
        true
    }

    fn read<'s>(&'s self, _offset: FileOffset, len: u64, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        scratch.clear();
        scratch.resize(len, 0);
        Ok(scratch)
    }
}
