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
}
