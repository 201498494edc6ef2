//! A snapshot held in RAM: read once, shared by every VM restored from it.
//!
//! Loading indexes all-zero pages and gives their memory back (MADV_DONTNEED), so a snapshot
//! costs RAM only for its non-zero pages. Holes of sparse files are never read.

use super::zero_pages::{data_extents, ZeroPages};
use super::{checked_end, PageSource, SourceError};
use crate::addr::{FileOffset, BASE_PAGE};
use memmap2::{MmapMut, UncheckedAdvice};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Reads are issued in chunks of this size: large enough for full disk bandwidth, small enough
/// that the zero scan of a chunk runs while it is still in cache.
const READ_CHUNK: u64 = 4 * 1024 * 1024;

/// A memory file's bytes in anonymous memory, with its zero-page index.
pub struct RamPages {
    memory: MmapMut,
    zero: ZeroPages,
}

/// Why a file could not be loaded into RAM.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No memory for it.
    #[error("cannot allocate {len} bytes: {source}")]
    Allocate {
        /// Bytes asked for.
        len: u64,
        /// What mmap said.
        source: io::Error,
    },
    /// A read failed.
    #[error("reading at offset {offset:#x} failed (truncated while loading?): {source}")]
    Read {
        /// Where.
        offset: u64,
        /// What the read said.
        source: io::Error,
    },
}

impl RamPages {
    /// Reads the `len` bytes of `file` into RAM.
    pub fn load(file: &File, len: u64) -> Result<RamPages, LoadError> {
        let size =
            usize::try_from(len).map_err(|_| LoadError::Allocate { len, source: io::ErrorKind::OutOfMemory.into() })?;
        let mut memory = MmapMut::map_anon(size).map_err(|source| LoadError::Allocate { len, source })?;
        // Every page starts as zero: holes are never read, data pages are cleared as scanned.
        let mut zero = ZeroPages::all_zero(len);
        for (start, end) in data_extents(file, len) {
            let mut offset = start;
            while offset < end {
                let chunk_end = (offset + READ_CHUNK).min(end);
                let dst = &mut memory[as_index(offset)..as_index(chunk_end)];
                file.read_exact_at(dst, offset).map_err(|source| LoadError::Read { offset, source })?;
                let first_page = as_index(offset / BASE_PAGE);
                for (i, page) in dst.chunks(as_index(BASE_PAGE)).enumerate() {
                    if !is_zero(page) {
                        zero.set_data(first_page + i);
                    }
                }
                offset = chunk_end;
            }
        }
        release_zero_runs(&memory, &zero);
        Ok(RamPages { memory, zero })
    }
}

impl RamPages {
    /// Pages known to be all zeros.
    pub fn zero_page_count(&self) -> usize {
        self.zero.count()
    }
}

impl PageSource for RamPages {
    fn file_len(&self) -> u64 {
        self.memory.len() as u64
    }

    fn is_zero(&self, offset: FileOffset, len: u64) -> bool {
        self.zero.covers(offset, len)
    }

    fn read<'s>(&'s self, offset: FileOffset, len: u64, _scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError> {
        let end = checked_end(offset, len, self.file_len())?;
        Ok(&self.memory[as_index(offset.0)..as_index(end)])
    }

    fn resident_bytes(&self) -> u64 {
        (self.zero.len() - self.zero.count()) as u64 * BASE_PAGE
    }
}

/// An offset inside the mapping, which fits in usize (the mapping does).
fn as_index(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// Gives the memory of all-zero pages back to the kernel; it reads back as zeros.
fn release_zero_runs(memory: &MmapMut, zero: &ZeroPages) {
    let page = as_index(BASE_PAGE);
    for (start, end) in zero.zero_runs() {
        // SAFETY: the range lies inside our own anonymous mapping and holds only zeros;
        // MADV_DONTNEED on private anonymous memory makes it read back as zeros, so no byte
        // anyone could observe changes. No reference into the range is live.
        let advised =
            unsafe { memory.unchecked_advise_range(UncheckedAdvice::DontNeed, start * page, (end - start) * page) };
        if let Err(e) = advised {
            tracing::debug!("MADV_DONTNEED of zero pages failed (memory kept): {e}");
        }
    }
}

/// Branch-free OR over small chunks vectorises well; a page is 4096 bytes.
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(256).all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
