//! A prefetch plan: the selected pages as contiguous batches, each one ioctl, in the order the
//! guest first needs them (their *priority*: lower is sooner).
//!
//! Runs of contiguous pages are bridged over gaps of at most `bridge_gap_pages` (one larger
//! copy is cheaper than two ioctls when the gap is small), split where all-zero stretches are
//! long enough to be worth a ZEROPAGE of their own, and cut into batches of at most
//! `max_batch_pages`: a demand fault never waits behind more than one batch.

use crate::PageIndex;
use std::collections::BTreeMap;

/// How selected pages become batches.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    /// Gaps of at most this many unselected pages are copied along (and zero stretches this
    /// short stay inside a copy).
    pub bridge_gap_pages: u64,
    /// Largest batch (one ioctl); 512 pages = 2 MiB.
    pub max_batch_pages: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig { bridge_gap_pages: 4, max_batch_pages: 512 }
    }
}

/// How a batch is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// UFFDIO_COPY from the snapshot.
    Copy,
    /// All-zero pages: UFFDIO_ZEROPAGE.
    Zero,
}

/// A contiguous range of file pages placed by one ioctl.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Batch {
    /// Its first file page.
    pub first_page: PageIndex,
    /// Its length in 4 KiB pages.
    pub pages: u64,
    /// Copied or zero-mapped.
    pub kind: BatchKind,
    /// The lowest priority among its selected pages: batches run in this order.
    pub priority: f64,
}

impl Batch {
    /// The page after its last.
    pub fn end_page(&self) -> PageIndex {
        self.first_page + self.pages
    }
}

/// What to place for a VM, in order, and when.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Batches in plan order (ascending priority).
    pub batches: Vec<Batch>,
    /// Batches from this index on are *deferred*: pages seen in fewer than half the recorded
    /// runs, placed only while the guest is quiet (`batches.len()` when none is).
    pub deferred_from: usize,
    /// Placed before the first fault is served (`eager`, `reap`), not in the background.
    pub synchronous: bool,
}

impl Plan {
    /// A background plan of `batches`, those of priority `deferred_priority` or more deferred.
    pub fn background(batches: Vec<Batch>, deferred_priority: Option<f64>) -> Plan {
        let deferred_from =
            deferred_priority.and_then(|p| batches.iter().position(|b| b.priority >= p)).unwrap_or(batches.len());
        Plan { batches, deferred_from, synchronous: false }
    }

    /// Every page of `ranges` (`[first, end)` file pages) in file order, as batches of at most
    /// `max_batch_pages`, placed before the first fault (SnapFaaS's eager copy).
    pub fn whole(ranges: impl IntoIterator<Item = (PageIndex, PageIndex)>, max_batch_pages: u64) -> Plan {
        let step = max_batch_pages.max(1);
        let mut batches = Vec::new();
        for (first, end) in ranges {
            let mut start = first;
            while start < end {
                let pages = step.min(end - start);
                batches.push(Batch { first_page: start, pages, kind: BatchKind::Copy, priority: 0.0 });
                start += pages;
            }
        }
        Plan { deferred_from: batches.len(), batches, synchronous: true }
    }

    /// Whether there is nothing to place.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Pages the plan places.
    pub fn pages(&self) -> u64 {
        self.batches.iter().map(|b| b.pages).sum()
    }
}

/// Plans `selected` pages (page, priority); `is_zero` tells all-zero pages. Batches come in
/// priority order.
pub fn plan(selected: &[(PageIndex, f64)], is_zero: impl Fn(PageIndex) -> bool, config: PlanConfig) -> Vec<Batch> {
    let priorities: BTreeMap<PageIndex, f64> = selected.iter().copied().collect();
    let max_batch = config.max_batch_pages.max(1);
    let mut batches = Vec::new();
    for (start, end) in runs(&priorities, config.bridge_gap_pages) {
        for (seg_start, seg_end, kind) in segments(start, end, &is_zero, config.bridge_gap_pages) {
            let mut first = seg_start;
            while first < seg_end {
                let last = (first + max_batch).min(seg_end);
                if let Some(priority) = priorities.range(first..last).map(|(_, &p)| p).min_by(f64::total_cmp) {
                    batches.push(Batch { first_page: first, pages: last - first, kind, priority });
                }
                first = last;
            }
        }
    }
    batches.sort_by(|a, b| a.priority.total_cmp(&b.priority).then(a.first_page.cmp(&b.first_page)));
    batches
}

/// `[start, end)` runs of selected pages, bridging gaps of at most `gap` pages.
fn runs(priorities: &BTreeMap<PageIndex, f64>, gap: u64) -> Vec<(PageIndex, PageIndex)> {
    let mut runs: Vec<(PageIndex, PageIndex)> = Vec::new();
    for &page in priorities.keys() {
        match runs.last_mut() {
            Some((_, end)) if page <= *end + gap => *end = page + 1,
            _ => runs.push((page, page + 1)),
        }
    }
    runs
}

/// Splits `[start, end)` into copy and zero stretches; zero stretches of at most `gap` pages
/// are copied with their neighbours.
fn segments(
    start: PageIndex,
    end: PageIndex,
    is_zero: impl Fn(PageIndex) -> bool,
    gap: u64,
) -> Vec<(PageIndex, PageIndex, BatchKind)> {
    let mut raw: Vec<(PageIndex, PageIndex, BatchKind)> = Vec::new();
    for page in start..end {
        let kind = if is_zero(page) { BatchKind::Zero } else { BatchKind::Copy };
        match raw.last_mut() {
            Some((_, e, k)) if *k == kind => *e = page + 1,
            _ => raw.push((page, page + 1, kind)),
        }
    }
    let has_copy = raw.iter().any(|s| s.2 == BatchKind::Copy);
    let mut merged: Vec<(PageIndex, PageIndex, BatchKind)> = Vec::new();
    for (s, e, mut kind) in raw {
        if kind == BatchKind::Zero && e - s <= gap && has_copy {
            kind = BatchKind::Copy;
        }
        match merged.last_mut() {
            Some((_, last_end, k)) if *k == kind => *last_end = e,
            _ => merged.push((s, e, kind)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn batches_cover_the_selection_once_in_priority_order(
            pages in proptest::collection::btree_set(0u64..2000, 0..300),
            zero_every in 1u64..7,
            gap in 0u64..6,
            max_batch in 1u64..64,
        ) {
            let selected: Vec<(u64, f64)> = pages.iter().map(|&p| (p, ((p * 7919) % 1000) as f64)).collect();
            let is_zero = |p: u64| zero_every > 1 && p.is_multiple_of(zero_every);
            let config = PlanConfig { bridge_gap_pages: gap, max_batch_pages: max_batch };
            let batches = plan(&selected, is_zero, config);

            let mut covered = BTreeSet::new();
            for b in &batches {
                prop_assert!(b.pages >= 1 && b.pages <= max_batch);
                for p in b.first_page..b.end_page() {
                    prop_assert!(covered.insert(p), "page {} in two batches", p);
                    if b.kind == BatchKind::Zero {
                        prop_assert!(is_zero(p), "a ZEROPAGE batch holds data page {}", p);
                    }
                    // Extra pages only bridge small gaps between selected ones.
                    let near = pages.range(p.saturating_sub(gap)..=p + gap).next().is_some();
                    prop_assert!(pages.contains(&p) || near);
                }
                let priority = selected.iter().filter(|(p, _)| (b.first_page..b.end_page()).contains(p)).map(|&(_, r)| r).fold(f64::INFINITY, f64::min);
                prop_assert_eq!(b.priority, priority);
            }
            prop_assert!(pages.iter().all(|p| covered.contains(p)));
            prop_assert!(batches.windows(2).all(|w| w[0].priority <= w[1].priority));
        }
    }

    #[test]
    fn bridges_small_gaps_and_keeps_long_zero_stretches_apart() {
        // Pages 0..4 and 6..8 selected (gap of 2); 100..120 selected, all zero.
        let mut selected: Vec<(u64, f64)> = (0..4).chain(6..8).map(|p| (p, p as f64)).collect();
        selected.extend((100..120).map(|p| (p, 1.5)));
        let batches = plan(&selected, |p| p >= 100, PlanConfig { bridge_gap_pages: 2, max_batch_pages: 512 });
        assert_eq!(
            batches,
            vec![
                Batch { first_page: 0, pages: 8, kind: BatchKind::Copy, priority: 0.0 },
                Batch { first_page: 100, pages: 20, kind: BatchKind::Zero, priority: 1.5 },
            ]
        );
    }

    #[test]
    fn whole_and_background_plans() {
        let whole = Plan::whole([(0, 5), (10, 12)], 2);
        let firsts: Vec<u64> = whole.batches.iter().map(|b| b.first_page).collect();
        assert_eq!(firsts, vec![0, 2, 4, 10]);
        assert_eq!((whole.pages(), whole.deferred_from, whole.synchronous), (7, 4, true));
        let batch = |priority| Batch { first_page: 0, pages: 1, kind: BatchKind::Copy, priority };
        let background = Plan::background(vec![batch(0.0), batch(1.0), batch(5.0), batch(6.0)], Some(5.0));
        assert_eq!((background.deferred_from, background.synchronous), (2, false));
        assert_eq!(Plan::background(vec![batch(0.0)], None).deferred_from, 1);
    }
}
