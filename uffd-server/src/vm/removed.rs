//! Ranges the VMM removed (`UFFD_EVENT_REMOVE`: balloon inflation, free-page reporting).
//!
//! Their pages must read as zeros from now on, never as snapshot bytes. The ranges stay
//! registered: a fault for a removed page can arrive right after the REMOVE event, and an
//! unregistered range would turn its COPY into ENOENT and hang the faulting thread.

use crate::addr::HostAddr;
use std::collections::BTreeMap;

/// A set of disjoint `[start, end)` host ranges, merged on insert.
#[derive(Debug, Default)]
pub struct RemovedRanges {
    /// start -> end
    ranges: BTreeMap<u64, u64>,
}

impl RemovedRanges {
    /// Marks `[start, end)` removed.
    pub fn insert(&mut self, start: HostAddr, end: HostAddr) {
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
        r.insert(HostAddr(0x3000), HostAddr(0x5000));
        r.insert(HostAddr(0x8000), HostAddr(0x9000));
        assert!(r.overlaps(HostAddr(0x4000), 0x1000));
        assert!(!r.overlaps(HostAddr(0x5000), 0x3000), "end is exclusive, gap is not removed");
        assert!(r.overlaps(HostAddr(0x2000), 0x2000), "partial overlap at the start");
        assert!(!r.overlaps(HostAddr(0x1000), 0x2000));
        r.insert(HostAddr(0x5000), HostAddr(0x8000)); // bridges both
        assert_eq!(r.ranges.len(), 1);
        assert!(r.overlaps(HostAddr(0x6000), 0x1000));
        r.insert(HostAddr(0x7000), HostAddr(0x7000)); // empty: ignored
        assert_eq!(r.ranges.len(), 1);
    }
}
