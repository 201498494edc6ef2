//! The working set of a snapshot: the union of the pages its runs touched, with per-page
//! statistics, so a plan can prefer pages most runs need, in the order they need them.
//!
//! REAP keeps only the first run; a working set that shifts between runs then falls back to
//! demand paging. Here every run is merged, and the first run is kept too (the `reap` policy).

use crate::identity::SnapshotIdentity;
use crate::record::Run;
use crate::PageIndex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the runs that touched a page have in common.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStats {
    /// Runs that touched the page.
    pub runs: u32,
    /// Sum of its first-touch ranks over those runs (mean = rank_sum / runs).
    pub rank_sum: u64,
    /// Its lowest first-touch rank in any run.
    pub min_rank: u32,
    /// Number (1-based) of the last run that touched it.
    pub last_run: u32,
    /// Runs whose first access to it was a write.
    pub writes: u32,
    /// Known only from online refinement (a serving VM faulted on it), never seen in a
    /// recorded run: one input's page as far as we know, so it is prefetched last.
    pub learned_only: bool,
}

impl PageStats {
    /// Mean first-touch rank over the runs that touched the page.
    pub fn mean_rank(&self) -> f64 {
        self.rank_sum as f64 / f64::from(self.runs.max(1))
    }
}

/// A page first seen while serving (online refinement), not in a recorded run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnedTouch {
    /// The file page.
    pub page: PageIndex,
    /// Its first-touch rank as estimated while serving (demand faults plus pages prefetched
    /// before it).
    pub rank: u32,
    /// Whether the first access was a write.
    pub write: bool,
}

/// The union of a snapshot's recorded runs, with per-page statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkingSet {
    /// The snapshot the set belongs to.
    pub identity: SnapshotIdentity,
    /// Runs merged so far.
    pub runs: u32,
    /// The first run's pages in first-touch order (what REAP would prefetch).
    pub first_run: Vec<PageIndex>,
    /// Every page any run touched, with its statistics.
    pub pages: BTreeMap<PageIndex, PageStats>,
}

impl WorkingSet {
    /// An empty set of snapshot `identity`.
    pub fn new(identity: SnapshotIdentity) -> WorkingSet {
        WorkingSet { identity, runs: 0, first_run: Vec::new(), pages: BTreeMap::new() }
    }

    /// Merges one run as a union.
    pub fn merge(&mut self, run: &Run) {
        self.runs += 1;
        if self.runs == 1 {
            self.first_run = run.touches.iter().map(|t| t.page).collect();
        }
        for (rank, touch) in run.touches.iter().enumerate() {
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            let stats = self.pages.entry(touch.page).or_insert(PageStats {
                runs: 0,
                rank_sum: 0,
                min_rank: rank,
                last_run: 0,
                writes: 0,
                learned_only: false,
            });
            if stats.learned_only {
                // A recorded run confirms it: its statistics start from this run.
                *stats =
                    PageStats { runs: 0, rank_sum: 0, min_rank: rank, last_run: 0, writes: 0, learned_only: false };
            }
            stats.runs += 1;
            stats.rank_sum += u64::from(rank);
            stats.min_rank = stats.min_rank.min(rank);
            stats.last_run = self.runs;
            stats.writes += u32::from(touch.write);
        }
    }

    /// Online refinement: adds `touches` of pages the set does not know yet, as seen once in
    /// the latest run. A serve run is not counted as a run: its prefetched pages never fault,
    /// so it cannot say which of them were touched.
    pub fn learn(&mut self, touches: &[LearnedTouch]) {
        let last_run = self.runs.max(1);
        for &LearnedTouch { page, rank, write } in touches {
            self.pages.entry(page).or_insert(PageStats {
                runs: 1,
                rank_sum: u64::from(rank),
                min_rank: rank,
                last_run,
                writes: u32::from(write),
                learned_only: true,
            });
        }
    }

    /// Merges another working set of the same snapshot (two servers' files, say): runs add up,
    /// per-page statistics combine as if every run had been merged here.
    pub fn merge_set(&mut self, other: &WorkingSet) {
        let offset = self.runs;
        if self.runs == 0 {
            self.first_run = other.first_run.clone();
        }
        self.runs += other.runs;
        for (&page, theirs) in &other.pages {
            let shifted = PageStats { last_run: theirs.last_run + offset, ..*theirs };
            self.pages
                .entry(page)
                .and_modify(|mine| {
                    mine.runs += theirs.runs;
                    mine.rank_sum += theirs.rank_sum;
                    mine.min_rank = mine.min_rank.min(theirs.min_rank);
                    mine.last_run = shifted.last_run;
                    mine.writes += theirs.writes;
                    mine.learned_only &= theirs.learned_only;
                })
                .or_insert(shifted);
        }
    }

    /// The priority from which [`WorkingSet::select`] ranks pages seen in fewer than half the
    /// runs (and pages only learned online): every such page's priority is at least this,
    /// every other page's below it.
    pub fn minority_priority(&self) -> f64 {
        1.0 + self.pages.values().map(PageStats::mean_rank).fold(0.0, f64::max)
    }

    /// Pages touched in at least `min_frequency` (0..=1) of the runs — 0 selects the union —
    /// with their priority (lower = sooner), sorted by it: first the pages seen in at least
    /// half the runs, then the others, each group by mean first-touch rank (ties: lower page).
    ///
    /// Majority first because a page seen in one run of five is needed by the next input about
    /// one time in five: interleaving such pages with those every run touches delays the sure
    /// ones (measured: `benches/prefetch.rs`, shifting working sets).
    pub fn select(&self, min_frequency: f64) -> Vec<(PageIndex, f64)> {
        let needed = (min_frequency.clamp(0.0, 1.0) * f64::from(self.runs)).ceil().max(1.0);
        let minority_offset = self.minority_priority();
        let mut pages: Vec<(PageIndex, f64)> = self
            .pages
            .iter()
            .filter(|(_, s)| f64::from(s.runs) >= needed)
            .map(|(&p, s)| {
                let majority = !s.learned_only && 2 * s.runs >= self.runs;
                (p, if majority { s.mean_rank() } else { minority_offset + s.mean_rank() })
            })
            .collect();
        pages.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Touch;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn run(pages: &[u64]) -> Run {
        Run { touches: pages.iter().map(|&page| Touch { page, write: page % 2 == 1 }).collect() }
    }

    fn identity() -> SnapshotIdentity {
        SnapshotIdentity { len: 1 << 20, fingerprint: 7 }
    }

    /// Runs of distinct pages, as a recorder produces them.
    fn runs() -> impl Strategy<Value = Vec<Vec<u64>>> {
        proptest::collection::vec(proptest::collection::btree_set(0u64..100, 0..30).prop_shuffle_pages(), 1..8)
    }

    trait Shuffle {
        fn prop_shuffle_pages(self) -> BoxedStrategy<Vec<u64>>;
    }

    impl<S: Strategy<Value = BTreeSet<u64>> + 'static> Shuffle for S {
        fn prop_shuffle_pages(self) -> BoxedStrategy<Vec<u64>> {
            self.prop_map(|s| s.into_iter().collect::<Vec<_>>()).prop_shuffle().boxed()
        }
    }

    proptest! {
        #[test]
        fn union_counts_and_ranks_match_a_direct_computation(runs in runs()) {
            let mut set = WorkingSet::new(identity());
            for r in &runs {
                set.merge(&run(r));
            }
            prop_assert_eq!(set.runs as usize, runs.len());
            prop_assert_eq!(&set.first_run, &runs[0]);
            let union: BTreeSet<u64> = runs.iter().flatten().copied().collect();
            prop_assert_eq!(set.pages.keys().copied().collect::<BTreeSet<_>>(), union.clone());
            for page in union {
                let ranks: Vec<usize> = runs.iter().filter_map(|r| r.iter().position(|&p| p == page)).collect();
                let s = set.pages[&page];
                prop_assert_eq!(s.runs as usize, ranks.len());
                prop_assert_eq!(s.rank_sum, ranks.iter().sum::<usize>() as u64);
                prop_assert_eq!(s.min_rank as usize, *ranks.iter().min().unwrap_or(&0));
                let last = runs.iter().rposition(|r| r.contains(&page)).map_or(0, |i| i + 1);
                prop_assert_eq!(s.last_run as usize, last);
                prop_assert_eq!(s.writes as usize, if page % 2 == 1 { ranks.len() } else { 0 });
            }
        }

        #[test]
        fn frequency_filter_and_order(runs in runs(), min_frequency in 0.0f64..=1.0) {
            let mut set = WorkingSet::new(identity());
            for r in &runs {
                set.merge(&run(r));
            }
            let selected = set.select(min_frequency);
            let needed = (min_frequency * runs.len() as f64).ceil().max(1.0);
            let expected: BTreeSet<u64> = set.pages.iter().filter(|(_, s)| f64::from(s.runs) >= needed).map(|(&p, _)| p).collect();
            prop_assert_eq!(selected.iter().map(|&(p, _)| p).collect::<BTreeSet<_>>(), expected);
            prop_assert!(selected.windows(2).all(|w| w[0].1 < w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0)));
            let threshold = set.minority_priority();
            prop_assert!(selected.iter().all(|&(p, priority)| (2 * set.pages[&p].runs >= set.runs) == (priority < threshold)));
            // (no page here is learned-only: merge() alone never makes one)
            // Majority pages first, each group in (mean rank, page) order.
            let majority = |p: &u64| 2 * set.pages[p].runs >= set.runs;
            let key = |&(p, _): &(u64, f64)| (!majority(&p), set.pages[&p].mean_rank(), p);
            prop_assert!(selected.windows(2).all(|w| key(&w[0]).partial_cmp(&key(&w[1])) == Some(std::cmp::Ordering::Less)));
            // The union (0) is a superset of every stricter selection.
            prop_assert!(set.select(0.0).len() >= selected.len());
        }

        #[test]
        fn learning_adds_only_unknown_pages(runs in runs(), extra in proptest::collection::vec(0u64..200, 0..40)) {
            let mut set = WorkingSet::new(identity());
            for r in &runs {
                set.merge(&run(r));
            }
            let before = set.clone();
            let touches: Vec<LearnedTouch> = extra.iter().enumerate().map(|(i, &page)| LearnedTouch { page, rank: u32::try_from(i).expect("few"), write: false }).collect();
            set.learn(&touches);
            prop_assert_eq!(set.runs, before.runs);
            for (page, stats) in &set.pages {
                match before.pages.get(page) {
                    Some(old) => prop_assert_eq!(old, stats),
                    None => prop_assert!(extra.contains(page) && stats.runs == 1 && stats.learned_only),
                }
            }
            // Learned-only pages are never in the first tier, whatever the run count.
            let threshold = set.minority_priority();
            for (page, priority) in set.select(0.0) {
                if set.pages[&page].learned_only {
                    prop_assert!(priority >= threshold);
                }
            }
            prop_assert!(extra.iter().all(|p| set.pages.contains_key(p)));
        }

        #[test]
        fn merging_sets_equals_merging_their_runs(runs in runs(), split in 0usize..8) {
            let split = split.min(runs.len());
            let (mut all, mut left, mut right) = (WorkingSet::new(identity()), WorkingSet::new(identity()), WorkingSet::new(identity()));
            for (i, r) in runs.iter().enumerate() {
                all.merge(&run(r));
                if i < split { left.merge(&run(r)) } else { right.merge(&run(r)) }
            }
            left.merge_set(&right);
            prop_assert_eq!(left, all);
        }
    }
}
