//! Ranges the VMM removed (`UFFD_EVENT_REMOVE`: balloon inflation, free-page reporting).
//!
//! Their pages must read as zeros from now on, never as snapshot bytes. The ranges stay
//! registered: a fault for a removed page can arrive right after the REMOVE event, and an
//! unregistered range would turn its COPY into ENOENT and hang the faulting thread.
//!
//! Each range is journaled as it is marked (`crate::recovery::journal`), so a successor taking
//! the VM over after a crash knows it too.

use crate::addr::HostAddr;
use crate::recovery::journal::{JournalError, VmJournal};
use std::collections::BTreeMap;

/// A set of disjoint `[start, end)` host ranges, merged on insert.
#[derive(Debug, Default)]
pub struct RemovedRanges {
    /// start -> end
    ranges: BTreeMap<u64, u64>,
    /// Where each new range is journaled, if the VM has a journal.
    journal: Option<VmJournal>,
}

impl RemovedRanges {
    /// The ranges `earlier` (a VM taken over), journaling new ones into `journal`.
    pub fn journaled(journal: Option<VmJournal>, earlier: &[(HostAddr, HostAddr)]) -> RemovedRanges {
        let mut removed = RemovedRanges::default();
        for &(start, end) in earlier {
            removed.mark(start, end);
        }
        removed.journal = journal;
        removed
    }

    /// Marks `[start, end)` removed, journaling it first. A journal that cannot be written is
    /// dropped (the VM is then never recovered) and the error returned; the range is marked
    /// either way.
    pub fn insert(&mut self, start: HostAddr, end: HostAddr) -> Result<(), JournalError> {
        let journaled = match self.journal.as_mut() {
            Some(journal) => journal.note_removed(start, end),
            None => Ok(()),
        };
        if journaled.is_err() {
            self.journal = None;
        }
        self.mark(start, end);
        journaled
    }

    /// Where to read the VM's uffd into: its journal's events file (so a REMOVE read is kept
    /// even if the process dies before it is journaled); None without a journal.
    pub fn read_buffer(&mut self) -> Option<&mut [u8]> {
        self.journal.as_mut().map(VmJournal::read_buffer)
    }

    /// The VM's journal, taken out (when the VM ends or is handed over).
    pub fn take_journal(&mut self) -> Option<VmJournal> {
        self.journal.take()
    }

    fn mark(&mut self, start: HostAddr, end: HostAddr) {
        let (mut start, mut end) = (start.0, end.0);
        if start >= end {
            return;
        }
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Whether any byte of `[start, start + len)` was removed.
    pub fn overlaps(&self, start: HostAddr, len: u64) -> bool {
        let end = start.0 + len;
        self.ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start.0)
    }

    /// The parts of `[start, start + len)` that were not removed, as (offset from `start`,
    /// length), each shrunk to whole `unit`s (a page size).
    pub fn kept_parts(&self, start: HostAddr, len: u64, unit: u64) -> Vec<(u64, u64)> {
        if len == 0 {
            return Vec::new();
        }
        let end = start.0 + len;
        let mut kept = Vec::new();
        let mut at = start.0;
        // The removed ranges reaching into [start, end), in order (the first may begin before).
        let first = self.ranges.range(..=start.0).next_back().map(|(&s, &e)| (s, e));
        let later = self.ranges.range(start.0 + 1..end).map(|(&s, &e)| (s, e));
        for (removed_start, removed_end) in first.into_iter().chain(later) {
            if removed_end <= at {
                continue;
            }
            kept.push((at, removed_start.min(end)));
            at = at.max(removed_end);
        }
        kept.push((at, end));
        kept.into_iter()
            .map(|(from, to)| (from.next_multiple_of(unit), to - to % unit))
            .filter(|(from, to)| from < to)
            .map(|(from, to)| (from - start.0, to - from))
            .collect()
    }

    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_answers_overlap_queries() {
        let mut r = RemovedRanges::default();
        r.insert(HostAddr(0x3000), HostAddr(0x5000)).unwrap();
        r.insert(HostAddr(0x8000), HostAddr(0x9000)).unwrap();
        assert!(r.overlaps(HostAddr(0x4000), 0x1000));
        assert!(!r.overlaps(HostAddr(0x5000), 0x3000), "end is exclusive, gap is not removed");
        assert!(r.overlaps(HostAddr(0x2000), 0x2000), "partial overlap at the start");
        assert!(!r.overlaps(HostAddr(0x1000), 0x2000));
        r.insert(HostAddr(0x5000), HostAddr(0x8000)).unwrap(); // bridges both
        assert_eq!(r.ranges.len(), 1);
        assert!(r.overlaps(HostAddr(0x6000), 0x1000));
        r.insert(HostAddr(0x7000), HostAddr(0x7000)).unwrap(); // empty: ignored
        assert_eq!(r.ranges.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn a_page_is_kept_exactly_when_no_removed_range_touches_it(
            removed in proptest::collection::vec((0u64..64, 1u64..8), 0..6),
            first in 0u64..64,
            pages in 0u64..64,
        ) {
            let page = 0x1000;
            let mut r = RemovedRanges::default();
            for (start, len) in removed {
                r.insert(HostAddr(start * page), HostAddr((start + len) * page)).unwrap();
            }
            let kept = r.kept_parts(HostAddr(first * page), pages * page, page);
            for n in 0..pages {
                let offset = n * page;
                let in_kept = kept.iter().any(|&(at, len)| (at..at + len).contains(&offset));
                proptest::prop_assert_eq!(in_kept, !r.overlaps(HostAddr((first + n) * page), page), "page {}", n);
            }
        }
    }

    #[test]
    fn kept_parts_are_what_no_removed_range_covers() {
        let mut r = RemovedRanges::default();
        assert_eq!(r.kept_parts(HostAddr(0x10000), 0x4000, 0x1000), vec![(0, 0x4000)], "nothing removed");
        r.insert(HostAddr(0x3000), HostAddr(0x5000)).unwrap();
        r.insert(HostAddr(0x8000), HostAddr(0x9000)).unwrap();
        assert_eq!(
            r.kept_parts(HostAddr(0x2000), 0x8000, 0x1000),
            vec![(0, 0x1000), (0x3000, 0x3000), (0x7000, 0x1000)]
        );
        assert_eq!(
            r.kept_parts(HostAddr(0x4000), 0x2000, 0x1000),
            vec![(0x1000, 0x1000)],
            "starts inside a removed range"
        );
        assert_eq!(r.kept_parts(HostAddr(0x3000), 0x2000, 0x1000), vec![], "wholly removed");
        assert_eq!(r.kept_parts(HostAddr(0x0), 0x200000, 0x200000), vec![], "a huge page partly removed is not kept");
        assert_eq!(r.kept_parts(HostAddr(0x200000), 0x200000, 0x200000), vec![(0, 0x200000)]);
    }
}
