//! Which 4 KiB pages of a memory file are all zeros: one bit per page.
//!
//! Zero pages are never copied (FaaSnap): a read fault maps the shared zero page, a write fault
//! gets a copy of zeros. Sparse files' holes are found with SEEK_DATA/SEEK_HOLE, never read.

use crate::addr::{FileOffset, BASE_PAGE};
use bitvec::vec::BitVec;
pub use snapstore::extents::data_extents;
use std::fs::File;

/// One bit per 4 KiB page of a file: set when the page is known to be all zeros.
#[derive(Debug)]
pub struct ZeroPages {
    bits: BitVec,
}

impl ZeroPages {
    /// Every page of a `len`-byte file zero except the data extents (holes are zero).
    pub fn from_holes(file: &File, len: u64) -> ZeroPages {
        let mut zero = ZeroPages { bits: BitVec::repeat(true, page_count(len)) };
        for (start, end) in data_extents(file, len) {
            zero.bits[page_index(start)..page_index(end)].fill(false);
        }
        zero
    }

    /// Every page of a `len`-byte file zero; data pages are marked with [`ZeroPages::set_data`].
    pub fn all_zero(len: u64) -> ZeroPages {
        ZeroPages { bits: BitVec::repeat(true, page_count(len)) }
    }

    /// Marks page `index` as holding data.
    pub fn set_data(&mut self, index: usize) {
        if index < self.bits.len() {
            self.bits.set(index, false);
        }
    }

    /// Whether every page overlapping `[offset, offset + len)` is zero (false past the end).
    pub fn covers(&self, offset: FileOffset, len: u64) -> bool {
        let first = page_index(offset.0);
        let last = page_index(offset.0.saturating_add(len).div_ceil(BASE_PAGE) * BASE_PAGE);
        if last == first + 1 {
            // One page, the common demand fault: a bit, not a range scan (~2% of a fault here).
            return self.bits.get(first).is_some_and(|zero| *zero);
        }
        last <= self.bits.len() && self.bits.get(first..last).is_some_and(|bits| bits.all())
    }

    /// Number of zero pages.
    pub fn count(&self) -> usize {
        self.bits.count_ones()
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    /// Whether the file has no pages.
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// `[first, end)` page runs that are all zero, in order.
    pub fn zero_runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let start = at + self.bits[at..].first_one()?;
            let end = start + self.bits[start..].first_zero().unwrap_or(self.bits.len() - start);
            at = end;
            Some((start, end))
        })
    }
}

fn page_count(len: u64) -> usize {
    page_index(len.div_ceil(BASE_PAGE) * BASE_PAGE)
}

fn page_index(offset: u64) -> usize {
    usize::try_from(offset / BASE_PAGE).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_coverage() {
        let mut zero = ZeroPages::all_zero(10 * BASE_PAGE);
        for data in [0, 4, 5, 9] {
            zero.set_data(data);
        }
        assert_eq!(zero.zero_runs().collect::<Vec<_>>(), vec![(1, 4), (6, 9)]);
        assert_eq!((zero.count(), zero.len()), (6, 10));
        assert!(zero.covers(FileOffset(BASE_PAGE), 3 * BASE_PAGE));
        assert!(!zero.covers(FileOffset(BASE_PAGE), 4 * BASE_PAGE), "page 4 holds data");
        assert!(zero.covers(FileOffset(BASE_PAGE + 1), 10), "a partial page counts whole");
        assert!(!zero.covers(FileOffset(9 * BASE_PAGE), 2 * BASE_PAGE), "past the end is not zero");
    }
}
