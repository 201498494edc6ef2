//! The prefetch stage: the plan placed ahead of the guest, on the VM's fault thread.
//!
//! Synchronous plans (`eager`, `reap`) are placed before any fault is served. A background plan
//! (`union`) is placed one batch per idle turn of the loop, so a demand fault waits for at most
//! one small batch. A fault in a batch not placed yet is served by placing that batch; if the
//! guest overtook the plan, a burst of the next batches follows ([`Prefetcher::pull_forward`]).
//! Deferred batches (pages seen in fewer than half the runs) wait until the guest has not
//! faulted for [`QUIET_BEFORE_DEFERRED`], or until the machine has a CPU to spare.

use super::removed::RemovedRanges;
use super::spare_cpu::machine_has_spare_cpu;
use super::{Fault, Guest, Step};
use crate::addr::{FileOffset, BASE_PAGE};
use crate::memory::pieces::pieces;
use crate::memory::placer::{Access, Stop};
use crate::source::loading_set::BatchBytes;
use crate::source::PageSource;
use crate::stats::count;
use prefetch::loading_set::LoadingSet;
use prefetch::plan::{BatchKind, Plan};
use prefetch::prefetcher::PrefetchSchedule;
use prefetch::PageIndex;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Deferred batches wait until the guest has not demand-faulted for this long.
pub const QUIET_BEFORE_DEFERRED: Duration = Duration::from_millis(1);

/// How much of the plan a fault that overtook it places at once, without reading events:
/// ~100 µs of copying, the most another fault can wait.
pub const PULL_FORWARD_BURST_BYTES: u64 = 256 * 1024;

/// A fault in one of this many batches next due means the guest overtook the plan.
pub const FRONTIER_BATCHES: usize = 8;

/// While the guest is quiet, consecutive batches that are contiguous in the file are placed
/// with one copy of up to this much: 64 KiB copies reach ~90% of the bulk UFFDIO_COPY ceiling
/// here, larger ones more; a fault arriving meanwhile waits for at most ~100 µs of copying.
pub const QUIET_RUN_BYTES: u64 = 256 * 1024;

/// The prefetch stage of one VM.
pub struct Prefetcher<'a> {
    plan: &'a Plan,
    schedule: PrefetchSchedule<'a>,
    synchronous: bool,
    /// The bytes of the plan's batches, when it came from a loading-set file.
    loading_set: Option<&'a LoadingSet>,
    /// When the VM attached: the plan's completion is timed from there.
    attached: Instant,
    last_demand: Option<Instant>,
    /// The batch the last fault ahead of the plan placed.
    last_pulled: Option<usize>,
    /// A batch a pending event interrupted: its index and the file offset placed up to.
    resume: Option<(usize, u64)>,
    /// Pieces that could not be placed (left to demand faults).
    failed_pieces: u64,
}

/// How far a VM's plan was placed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanProgress {
    /// The plan's batch count and pages: a plan that differs is not resumed.
    pub batches: usize,
    /// See `batches`.
    pub pages: u64,
    /// The batches placed.
    pub placed: Vec<usize>,
}

/// What pulling the plan forward for a fault came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The faulting page is placed (and woken).
    Covered,
    /// The fault still needs serving: no unplaced batch holds it, or it was removed.
    NotCovered,
    /// Placing stopped: read events and ask again, or the VM is gone.
    Stopped(Step),
}

impl<'a> Prefetcher<'a> {
    /// The stage for `plan` (None when it is empty); `loading_set` holds its batches' bytes.
    pub fn new(plan: &'a Plan, loading_set: Option<&'a LoadingSet>, attached: Instant) -> Option<Prefetcher<'a>> {
        (!plan.is_empty()).then(|| Prefetcher {
            plan,
            schedule: PrefetchSchedule::new(plan),
            synchronous: plan.synchronous,
            loading_set,
            attached,
            last_demand: None,
            last_pulled: None,
            resume: None,
            failed_pieces: 0,
        })
    }

    /// Whether a synchronous plan is still being placed (faults wait meanwhile).
    pub fn is_installing(&self) -> bool {
        self.synchronous && !self.schedule.is_finished()
    }

    /// Pages placed so far.
    pub fn placed_pages(&self) -> u64 {
        self.schedule.placed_pages()
    }

    /// Where the plan is: its size, and the batches placed so far (to carry over a handover).
    pub fn progress(&self) -> PlanProgress {
        let plan = self.plan;
        let placed = (0..plan.batches.len()).filter(|&i| self.schedule.is_placed(i)).collect();
        PlanProgress { batches: plan.batches.len(), pages: plan.pages(), placed }
    }

    /// Goes on from a predecessor's `progress` of the same plan (the same batch count and
    /// pages; else the plan starts over, pages already there costing an EEXIST each).
    pub fn resume(&mut self, progress: &PlanProgress) {
        let plan = self.plan;
        if progress.batches != plan.batches.len() || progress.pages != plan.pages() {
            return;
        }
        for &batch in &progress.placed {
            self.schedule.placed(batch);
        }
    }

    /// When the next batch may be placed: now (zero), after a wait (a deferred batch while the
    /// guest still faults), or never (None: nothing left).
    pub fn next_wait(&mut self) -> Option<Duration> {
        let next = self.schedule.next_batch()?;
        if !self.schedule.is_deferred(next) || machine_has_spare_cpu() {
            return Some(Duration::ZERO);
        }
        let quiet_for = self.last_demand.map_or(QUIET_BEFORE_DEFERRED, |t| t.elapsed());
        Some(QUIET_BEFORE_DEFERRED.saturating_sub(quiet_for))
    }

    /// The plan's view of a demand fault on `file_page`.
    pub fn note_demand(&mut self, guest: &Guest<'_>, file_page: PageIndex) {
        self.last_demand = Some(Instant::now());
        if !self.schedule.is_finished() {
            count(&guest.stats.faults_during_prefetch, 1);
        }
        if self.schedule.batch_containing(file_page).is_none() {
            count(&guest.stats.faults_outside_plan, 1);
        }
    }

    /// Places the next batch of the plan.
    pub fn place_next(&mut self, guest: &Guest<'_>, removed: &RemovedRanges) -> Step {
        fail::fail_point!("prefetch-step");
        match self.schedule.next_batch() {
            Some(index) => {
                let run = self.quiet_run(guest, index);
                self.place_batches(guest, removed, run)
            }
            None => Step::Done,
        }
    }

    /// Batch `first` and, while the guest has been quiet, the unplaced batches after it that
    /// continue it in the file, up to [`QUIET_RUN_BYTES`] and to what the snapshot reads in
    /// place: placed as one copy.
    fn quiet_run(&self, guest: &Guest<'_>, first: usize) -> Range<usize> {
        let quiet = self.last_demand.is_none_or(|t| t.elapsed() >= QUIET_BEFORE_DEFERRED);
        if !quiet || self.loading_set.is_some() {
            return first..first + 1; // a loading set holds its bytes batch by batch
        }
        let bytes = QUIET_RUN_BYTES.min(guest.snapshot.contiguous_len());
        self.schedule.contiguous_run(first, bytes / BASE_PAGE)
    }

    /// A fault in a batch not placed yet: places that batch, which wakes its vCPU. What comes
    /// next depends on where the batch is in the plan:
    /// - among the next [`FRONTIER_BATCHES`] due: the guest overtook the prefetch, and a burst
    ///   from the frontier on follows;
    /// - right after the batch the last such fault placed: the guest goes on in plan order from
    ///   there; the schedule follows it, with a burst;
    /// - anywhere else: a one-off (an input reorders a few accesses); the schedule stays where
    ///   it was, since the guest comes back to it. Moving on past it, as this once did, left
    ///   the batches the guest needed next for a second pass, and made the vCPU wait for a
    ///   burst from the wrong place (experiment 1b: 1.26–1.32× the resident floor on a stable
    ///   set with no compute, 1.13–1.20× now).
    pub fn pull_forward(&mut self, guest: &Guest<'_>, removed: &RemovedRanges, fault: &Fault) -> Pulled {
        let Some(first) = self.schedule.batch_containing(fault.file_page).filter(|&b| !self.schedule.is_placed(b))
        else {
            return Pulled::NotCovered;
        };
        if self.resume.is_none_or(|(batch, _)| batch != first) {
            count(&guest.stats.faults_unreached_plan, 1);
        }
        let overtaken = self.schedule.next_batch().is_some_and(|due| (due..due + FRONTIER_BATCHES).contains(&first));
        let continued = self.last_pulled.is_some_and(|last| first == last + 1);
        self.last_pulled = Some(first);
        if continued {
            self.schedule.follow(first);
        }
        let failed_before = self.failed_pieces;
        let mut step = self.place_batches(guest, removed, first..first + 1);
        if step == Step::Done && (overtaken || continued) {
            step = self.burst(guest, removed);
        }
        let unit = fault.region.page_size.bytes();
        match step {
            Step::Done if !removed.overlaps(fault.page, unit) && self.failed_pieces == failed_before => Pulled::Covered,
            Step::Done => Pulled::NotCovered, // a removed page still needs its zeros
            stopped => Pulled::Stopped(stopped),
        }
    }

    /// The next (not deferred) batches, up to [`PULL_FORWARD_BURST_BYTES`], placed without
    /// reading events in between: the guest is at the plan's frontier and races it. Each copy
    /// wakes what waits on its batch (free when nothing does), so a vCPU that faults on one
    /// meanwhile runs again as soon as it lands.
    fn burst(&mut self, guest: &Guest<'_>, removed: &RemovedRanges) -> Step {
        let mut bytes = 0;
        while bytes < PULL_FORWARD_BURST_BYTES {
            // The burst never runs into deferred batches: one-off pages of other inputs.
            let Some(index) = self.schedule.next_batch().filter(|&i| !self.schedule.is_deferred(i)) else { break };
            let step = self.place_batches(guest, removed, index..index + 1);
            if step != Step::Done {
                return step;
            }
            bytes += self.schedule.batch(index).pages * BASE_PAGE;
        }
        Step::Done
    }

    /// Places plan batches `run` (consecutive, contiguous in the file; one when a loading set
    /// holds their bytes), from where a pending event interrupted the first, if it did.
    fn place_batches(&mut self, guest: &Guest<'_>, removed: &RemovedRanges, run: Range<usize>) -> Step {
        let index = run.start;
        let batch = *self.schedule.batch(index);
        let end = self.schedule.batch(run.end - 1).end_page() * BASE_PAGE;
        let from = match self.resume {
            Some((batch, offset)) if batch == index => offset,
            _ => batch.first_page * BASE_PAGE,
        };
        let data = self.loading_set.and_then(|loading_set| loading_set.data(index));
        if data.is_none() && self.loading_set.is_some() && batch.kind == BatchKind::Copy {
            tracing::warn!(batch = index, "loading-set batch failed its checksum; its pages come from the snapshot");
        }
        let from_loading_set = data.map(|bytes| BatchBytes::new(&batch, bytes, guest.snapshot));
        let source: &dyn PageSource = match &from_loading_set {
            Some(batch_bytes) => batch_bytes,
            None => guest.snapshot,
        };
        let mut step = Step::Done;
        'pieces: for piece in pieces(guest.regions, FileOffset(from), FileOffset(end)) {
            // What the guest gave back is left out (demand faults there are served zeros); the
            // rest is placed, so a fault next to a ballooned page is covered too.
            let kept = removed.kept_parts(piece.host, piece.len, piece.page_size.bytes());
            let kept_bytes: u64 = kept.iter().map(|&(_, len)| len).sum();
            count(&guest.stats.prefetch_removed_pages, (piece.len - kept_bytes) / BASE_PAGE);
            for (at, len) in kept {
                let part = piece.part(at, len);
                let outcome = guest.placer.fill(part, source, Access::Read);
                count(&guest.stats.prefetched_pages, outcome.placed() / BASE_PAGE);
                count(&guest.stats.prefetch_present_pages, outcome.present / BASE_PAGE);
                match outcome.stop {
                    None => {}
                    Some(Stop::NeedEvents) => {
                        // The batches wholly placed count as placed; the rest resumes from here.
                        let at = part.file.0 + outcome.handled();
                        let mut resume_at = index;
                        for i in run.clone() {
                            if self.schedule.batch(i).end_page() * BASE_PAGE <= at {
                                self.mark_placed(guest, i);
                                resume_at = i + 1;
                            }
                        }
                        self.resume = (resume_at < run.end).then_some((resume_at, at));
                        step = Step::NeedEvents;
                        break 'pieces;
                    }
                    Some(Stop::Gone) => {
                        step = Step::Gone;
                        break 'pieces;
                    }
                    Some(Stop::Failed(e)) => {
                        self.failed_pieces += 1;
                        if guest.log_limit.allow() {
                            tracing::warn!(host = %part.host, len = part.len, "prefetch of a range failed, left to demand faults: {e}");
                        }
                    }
                }
            }
        }
        if let Some(batch_bytes) = from_loading_set {
            count(&guest.stats.loading_set_pages, batch_bytes.served() / BASE_PAGE);
        }
        if step == Step::Done {
            self.resume = None;
            run.for_each(|i| self.mark_placed(guest, i));
        }
        step
    }

    /// Records batch `index` as placed (timing the first and the last).
    fn mark_placed(&mut self, guest: &Guest<'_>, index: usize) {
        if self.schedule.is_placed(index) {
            return;
        }
        let micros = || u64::try_from(self.attached.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
        if self.schedule.placed_pages() == 0 {
            count(&guest.stats.prefetch_first_batch_us, micros());
        }
        self.schedule.placed(index);
        if self.schedule.is_finished() {
            count(&guest.stats.prefetch_done_us, micros());
        }
    }
}
