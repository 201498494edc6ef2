//! The prefetch schedule: which plan batch to place next, following the guest.
//!
//! The server places batches on the VM's fault thread whenever no event is pending, so a
//! demand fault waits for at most one small batch in flight, never for the queue (measured on
//! this machine kind: a separate prefetch thread costs ~0.5 ms per demand fault in hand-offs,
//! because reading a REMOVE safely needs every COPY of the VM serialised with the event read).
//!
//! Batches go in plan order from where the guest was last seen: on a fault in a batch not
//! placed yet, the fault thread places that batch at once and the schedule moves past it
//! ([`PrefetchSchedule::follow`]) — copying behind the guest only races its own faults.
//! Batches skipped that way come in a second pass.

use crate::plan::Batch;
use crate::PageIndex;
use std::collections::BTreeMap;

pub struct PrefetchSchedule {
    batches: Vec<Batch>,
    /// Batches of this rank or later wait until the guest is quiet (see `is_deferred`).
    deferred_rank: f64,
    /// first page → batch index, to find the batch of a faulting page.
    by_first_page: BTreeMap<PageIndex, usize>,
    placed: Vec<bool>,
    placed_batches: usize,
    placed_pages: u64,
    /// The next batch in plan order.
    cursor: usize,
    /// Every batch below `low` is placed: the second pass scans from here.
    low: usize,
}

impl PrefetchSchedule {
    /// A schedule of `batches` (in plan order); batches ranked `deferred_rank` or later are
    /// [deferred](PrefetchSchedule::is_deferred).
    pub fn new(batches: Vec<Batch>, deferred_rank: Option<f64>) -> PrefetchSchedule {
        let by_first_page = batches.iter().enumerate().map(|(i, b)| (b.first_page, i)).collect();
        let placed = vec![false; batches.len()];
        let deferred_rank = deferred_rank.unwrap_or(f64::INFINITY);
        PrefetchSchedule {
            batches,
            deferred_rank,
            by_first_page,
            placed,
            placed_batches: 0,
            placed_pages: 0,
            cursor: 0,
            low: 0,
        }
    }

    /// Whether `batch` should wait until the guest has been quiet for a while: the pages seen
    /// in fewer than half the runs. Each is needed by a new input only now and then, and
    /// copying them while the guest demand-faults delays the faults it does need (measured:
    /// `benches/prefetch.rs`, shifting working sets). A fault in one still pulls it forward.
    pub fn is_deferred(&self, batch: usize) -> bool {
        self.batches.get(batch).is_some_and(|b| b.rank >= self.deferred_rank)
    }

    pub fn batch(&self, index: usize) -> &Batch {
        &self.batches[index]
    }

    /// Pages of the batches placed so far.
    pub fn placed_pages(&self) -> u64 {
        self.placed_pages
    }

    pub fn is_finished(&self) -> bool {
        self.placed_batches == self.batches.len()
    }

    /// The batch holding `page`, if the plan has one (batches never overlap).
    pub fn batch_containing(&self, page: PageIndex) -> Option<usize> {
        let (_, &i) = self.by_first_page.range(..=page).next_back()?;
        (page < self.batches[i].end_page()).then_some(i)
    }

    pub fn is_placed(&self, batch: usize) -> bool {
        self.placed.get(batch).copied().unwrap_or(true)
    }

    /// The next batch to place: the first one not placed from the cursor on, else (second pass)
    /// from the start. None once every batch is placed.
    pub fn next_batch(&mut self) -> Option<usize> {
        while self.low < self.batches.len() && self.placed[self.low] {
            self.low += 1;
        }
        let first_from = |from: usize| (from..self.batches.len()).find(|&i| !self.placed[i]);
        first_from(self.cursor).or_else(|| first_from(self.low))
    }

    /// Records that `batch` is placed; the schedule goes on after it.
    pub fn placed(&mut self, batch: usize) {
        self.cursor = self.cursor.max(batch + 1).min(self.batches.len());
        if let Some(flag) = self.placed.get_mut(batch) {
            if !*flag {
                *flag = true;
                self.placed_batches += 1;
                self.placed_pages += self.batches[batch].pages;
            }
        }
    }

    /// The guest is at `batch`: the schedule goes on after it, wherever it was.
    pub fn follow(&mut self, batch: usize) {
        self.cursor = (batch + 1).min(self.batches.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BatchKind;

    fn schedule() -> PrefetchSchedule {
        PrefetchSchedule::new(
            (0..6).map(|i| Batch { first_page: i * 10, pages: 4, kind: BatchKind::Copy, rank: i as f64 }).collect(),
            Some(4.0),
        )
    }

    #[test]
    fn follows_the_guest_and_places_skipped_batches_last() {
        let mut s = schedule();
        let mut order = Vec::new();
        while let Some(i) = s.next_batch() {
            if order.is_empty() {
                // The guest faults in batch 3 while batch 0 is being placed: the fault thread
                // places 3 at once and the schedule follows it.
                s.placed(3);
                s.follow(3);
            }
            order.push(s.batch(i).first_page);
            s.placed(i);
        }
        assert_eq!(order, vec![0, 40, 50, 10, 20], "batch 3 not twice; after it, then back");
        assert!(s.is_finished());
        assert_eq!(s.placed_pages(), 24);
        assert_eq!(s.batch_containing(32), Some(3));
        assert_eq!(s.batch_containing(35), None, "between batches");
    }

    #[test]
    fn plain_order_without_faults_and_nothing_after_the_end() {
        let mut s = schedule();
        let mut order = Vec::new();
        while let Some(i) = s.next_batch() {
            order.push(i);
            s.placed(i);
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(s.next_batch(), None);
        assert!(PrefetchSchedule::new(vec![], None).is_finished());
        assert!((0..4).all(|i| !s.is_deferred(i)) && s.is_deferred(4) && s.is_deferred(5));
    }
}
