//! The prefetch schedule: which plan batch to place next, following the guest.
//!
//! The server places batches on the VM's fault thread whenever no event is pending, so a
//! demand fault waits for at most one small batch in flight, never for the queue (measured on
//! this machine kind: a separate prefetch thread costs ~0.5 ms per demand fault in hand-offs,
//! because reading a REMOVE safely needs every COPY of the VM serialised with the event read).
//!
//! Batches go in plan order. A batch a fault placed out of turn is skipped when the schedule
//! gets there, and does not move it: inputs reorder a few accesses, and the guest comes back.
//! When the server sees the guest go on in plan order from such a batch, the schedule follows
//! it ([`PrefetchSchedule::follow`]): copying behind the guest only races its own faults.
//! Batches skipped that way come in a second pass.

use crate::plan::{Batch, Plan};
use crate::PageIndex;

/// Which batch of a plan to place next. Borrows the plan, which every VM of a snapshot shares.
pub struct PrefetchSchedule<'p> {
    plan: &'p Plan,
    /// (first page, batch index), sorted by first page: finds the batch of a faulting page.
    by_first_page: Vec<(PageIndex, usize)>,
    placed: Vec<bool>,
    placed_batches: usize,
    placed_pages: u64,
    /// The next batch in plan order.
    cursor: usize,
    /// Every batch below `low` is placed: the second pass scans from here.
    low: usize,
}

impl<'p> PrefetchSchedule<'p> {
    /// A schedule of `plan`'s batches, none placed yet.
    pub fn new(plan: &'p Plan) -> PrefetchSchedule<'p> {
        let mut by_first_page: Vec<(PageIndex, usize)> =
            plan.batches.iter().enumerate().map(|(i, b)| (b.first_page, i)).collect();
        by_first_page.sort_unstable();
        PrefetchSchedule {
            plan,
            by_first_page,
            placed: vec![false; plan.batches.len()],
            placed_batches: 0,
            placed_pages: 0,
            cursor: 0,
            low: 0,
        }
    }

    /// Whether `batch` should wait until the guest has been quiet for a while: the pages seen
    /// in fewer than half the runs ([`Plan::deferred_from`]). Each is needed by a new input
    /// only now and then, and copying them while the guest demand-faults delays the faults it
    /// does need (measured: `benches/prefetch.rs`, shifting working sets). A fault in one still
    /// pulls it forward.
    pub fn is_deferred(&self, batch: usize) -> bool {
        batch >= self.plan.deferred_from && batch < self.plan.batches.len()
    }

    /// Batch `index` of the plan.
    pub fn batch(&self, index: usize) -> &'p Batch {
        &self.plan.batches[index]
    }

    /// Pages of the batches placed so far.
    pub fn placed_pages(&self) -> u64 {
        self.placed_pages
    }

    /// Whether every batch is placed.
    pub fn is_finished(&self) -> bool {
        self.placed_batches == self.plan.batches.len()
    }

    /// The batch holding `page`, if the plan has one (batches never overlap).
    pub fn batch_containing(&self, page: PageIndex) -> Option<usize> {
        let after = self.by_first_page.partition_point(|&(first, _)| first <= page);
        let (_, i) = *self.by_first_page.get(after.checked_sub(1)?)?;
        (page < self.plan.batches[i].end_page()).then_some(i)
    }

    /// Whether batch `batch` is placed (an index past the plan counts as placed).
    pub fn is_placed(&self, batch: usize) -> bool {
        self.placed.get(batch).copied().unwrap_or(true)
    }

    /// The next batch to place: the first one not placed from the cursor on, else (second pass)
    /// from the start. None once every batch is placed.
    pub fn next_batch(&mut self) -> Option<usize> {
        while self.low < self.placed.len() && self.placed[self.low] {
            self.low += 1;
        }
        let first_from = |from: usize| (from..self.placed.len()).find(|&i| !self.placed[i]);
        first_from(self.cursor).or_else(|| first_from(self.low))
    }

    /// Records that `batch` is placed. The cursor moves past batches placed in turn; one placed
    /// out of turn (a fault ahead of the plan) does not move it: see [`PrefetchSchedule::follow`].
    pub fn placed(&mut self, batch: usize) {
        if let Some(flag) = self.placed.get_mut(batch) {
            if !*flag {
                *flag = true;
                self.placed_batches += 1;
                self.placed_pages += self.plan.batches[batch].pages;
            }
        }
        while self.cursor < self.placed.len() && self.placed[self.cursor] {
            self.cursor += 1;
        }
    }

    /// Batch `first` and the unplaced batches after it in plan order that continue it in the
    /// file (same kind, same tier), up to `max_pages` in all: what one copy can place.
    pub fn contiguous_run(&self, first: usize, max_pages: u64) -> std::ops::Range<usize> {
        let batches = &self.plan.batches;
        let Some(head) = batches.get(first) else { return first..first };
        let (mut end, mut pages) = (first + 1, head.pages);
        while let Some(next) = batches.get(end) {
            let last = &batches[end - 1];
            let continues = next.first_page == last.end_page()
                && next.kind == last.kind
                && self.is_deferred(end) == self.is_deferred(first)
                && !self.is_placed(end);
            if !continues || pages + next.pages > max_pages {
                break;
            }
            pages += next.pages;
            end += 1;
        }
        first..end
    }

    /// The guest is at `batch`: the schedule goes on after it, wherever it was.
    pub fn follow(&mut self, batch: usize) {
        self.cursor = (batch + 1).min(self.placed.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BatchKind;

    fn plan() -> Plan {
        let batches =
            (0..6).map(|i| Batch { first_page: i * 10, pages: 4, kind: BatchKind::Copy, priority: i as f64 }).collect();
        Plan::background(batches, Some(4.0))
    }

    #[test]
    fn follows_the_guest_and_places_skipped_batches_last() {
        let plan = plan();
        let mut s = PrefetchSchedule::new(&plan);
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
    fn a_batch_placed_out_of_turn_does_not_move_the_schedule() {
        let plan = plan();
        let mut s = PrefetchSchedule::new(&plan);
        s.placed(0);
        s.placed(3); // a fault far ahead
        assert_eq!(s.next_batch(), Some(1), "the schedule stays where it was");
        s.placed(1);
        s.placed(2);
        assert_eq!(s.next_batch(), Some(4), "and skips the batch placed out of turn");
    }

    #[test]
    fn a_run_joins_batches_that_continue_each_other_within_its_size() {
        let batch = |first_page, pages, kind| Batch { first_page, pages, kind, priority: 0.0 };
        let copy = BatchKind::Copy;
        // 0..4, 4..8, 8..12 continue each other; 12..16 is zero-mapped; 16..20 after it; then
        // 30..34 (a gap), then 34..38 (deferred: another tier).
        let batches = vec![
            batch(0, 4, copy),
            batch(4, 4, copy),
            batch(8, 4, copy),
            batch(12, 4, BatchKind::Zero),
            batch(16, 4, copy),
            batch(30, 4, copy),
            batch(34, 4, copy),
        ];
        let plan = Plan { batches, deferred_from: 6, ..Plan::default() };
        let mut s = PrefetchSchedule::new(&plan);
        assert_eq!(s.contiguous_run(0, 64), 0..3, "up to the change of kind");
        assert_eq!(s.contiguous_run(0, 8), 0..2, "within the size");
        assert_eq!(s.contiguous_run(0, 2), 0..1, "a batch larger than the size still goes alone");
        assert_eq!(s.contiguous_run(4, 64), 4..5, "not across a gap");
        assert_eq!(s.contiguous_run(5, 64), 5..6, "not into the deferred tier");
        s.placed(1);
        assert_eq!(s.contiguous_run(0, 64), 0..1, "not over a batch already placed");
        assert_eq!(s.contiguous_run(7, 64), 7..7, "past the plan: nothing");
    }

    #[test]
    fn plain_order_without_faults_and_nothing_after_the_end() {
        let plan = plan();
        let mut s = PrefetchSchedule::new(&plan);
        let mut order = Vec::new();
        while let Some(i) = s.next_batch() {
            order.push(i);
            s.placed(i);
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(s.next_batch(), None);
        assert!(PrefetchSchedule::new(&Plan::default()).is_finished());
        assert!((0..4).all(|i| !s.is_deferred(i)) && s.is_deferred(4) && s.is_deferred(5));
    }
}
