//! A snapshot read from its memory file on each fault (`--snapshot-storage disk`): the page
//! cache decides what stays in RAM, and only the file's holes are known to be zero (finding
//! zero pages would mean reading the whole file).
//!
//! The file must not change under its VMs: its hole index, and every page already served,
//! belong to the file as it was loaded. Each read checks the file's stamp first (one fstat,
//! ~1 µs beside a read that costs more) and refuses to serve a file that changed.

use super::snapshot::FileStamp;
use super::zero_pages::ZeroPages;
use super::{checked_end, PageSource, SourceError};
use crate::addr::FileOffset;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// An open memory file and the index of its holes.
pub struct DiskPages {
    file: File,
    stamp: FileStamp,
    zero: ZeroPages,
}

impl DiskPages {
    /// Serves `file`, as `stamp` describes it, from the file itself.
    pub fn open(file: File, stamp: FileStamp) -> DiskPages {
        let zero = ZeroPages::from_holes(&file, stamp.len);
        DiskPages { file, stamp, zero }
    }

    /// Pages known to be all zeros (the file's holes).
    pub fn zero_page_count(&self) -> usize {
        self.zero.count()
    }
}

impl PageSource for DiskPages {
    fn file_len(&self) -> u64 {
        self.stamp.len
    }

    fn is_zero(&self, offset: FileOffset, len: u64) -> bool {
        self.zero.covers(offset, len)
    }

    fn read<'s>(&'s self, offset: FileOffset, len: u64, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError> {
        checked_end(offset, len, self.stamp.len)?;
        let now = self.file.metadata().map(|meta| FileStamp::of(&meta));
        if now.as_ref().ok() != Some(&self.stamp) {
            return Err(SourceError::Changed { offset, len });
        }
        scratch.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
        self.file.read_exact_at(scratch, offset.0).map_err(|source| SourceError::Read { offset, len, source })?;
        Ok(scratch)
    }
}
