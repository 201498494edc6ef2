//! One loading-set batch as a page source: its checked bytes where a range lies inside the
//! batch, the snapshot everywhere else (a hugetlbfs piece is widened beyond its batch).

use super::{PageSource, SourceError};
use crate::addr::{FileOffset, BASE_PAGE};
use prefetch::plan::Batch;
use std::cell::Cell;

/// The bytes of one loading-set batch over the snapshot they were taken from.
pub struct BatchBytes<'a> {
    start: u64,
    bytes: &'a [u8],
    snapshot: &'a dyn PageSource,
    /// Bytes served from the batch rather than the snapshot.
    served: Cell<u64>,
}

impl<'a> BatchBytes<'a> {
    /// `bytes` are those of `batch` (checked against their CRC by the loading set).
    pub fn new(batch: &Batch, bytes: &'a [u8], snapshot: &'a dyn PageSource) -> BatchBytes<'a> {
        BatchBytes { start: batch.first_page * BASE_PAGE, bytes, snapshot, served: Cell::new(0) }
    }

    /// Bytes served from the batch so far.
    pub fn served(&self) -> u64 {
        self.served.get()
    }

    fn inside(&self, offset: FileOffset, len: u64) -> Option<&'a [u8]> {
        let from = usize::try_from(offset.0.checked_sub(self.start)?).ok()?;
        self.bytes.get(from..from.checked_add(usize::try_from(len).ok()?)?)
    }
}

impl PageSource for BatchBytes<'_> {
    fn file_len(&self) -> u64 {
        self.snapshot.file_len()
    }

    fn is_zero(&self, offset: FileOffset, len: u64) -> bool {
        self.snapshot.is_zero(offset, len)
    }

    fn read<'s>(&'s self, offset: FileOffset, len: u64, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError> {
        match self.inside(offset, len) {
            Some(bytes) => {
                self.served.set(self.served.get() + len);
                Ok(bytes)
            }
            None => self.snapshot.read(offset, len, scratch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Zeros;
    use prefetch::plan::BatchKind;

    #[test]
    fn serves_its_own_bytes_inside_the_batch_and_the_snapshot_outside() {
        let batch = Batch { first_page: 2, pages: 2, kind: BatchKind::Copy, priority: 0.0 };
        let bytes = vec![7u8; 2 * 4096];
        let source = BatchBytes::new(&batch, &bytes, &Zeros);
        let mut scratch = Vec::new();
        let read =
            |offset, len, scratch: &mut Vec<u8>| source.read(FileOffset(offset), len, scratch).map(<[u8]>::to_vec);
        assert_eq!(read(2 * 4096, 4096, &mut scratch).expect("inside"), vec![7u8; 4096]);
        assert_eq!(read(0, 8192, &mut scratch).expect("outside"), vec![0u8; 8192]);
        assert_eq!(read(3 * 4096, 8192, &mut scratch).expect("straddles"), vec![0u8; 8192], "not half from each");
        assert_eq!(source.served(), 4096);
    }
}
