//! Learning from a VM: in `record` mode its first touches within the record window (a run,
//! merged into the working set when it ends); while serving with a working set, the pages it
//! faults on that the set does not know (online refinement).

use prefetch::record::{RecordWindow, Recorder, Run};
use prefetch::working_set::{LearnedTouch, WorkingSet};
use prefetch::PageIndex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The learning stage of one VM.
pub struct Learner<'a> {
    recorder: Option<Recorder>,
    known: Option<&'a WorkingSet>,
    learned: Vec<LearnedTouch>,
    demand_faults: u64,
    /// Set from outside (the control socket) to end the record window now.
    end_recording: &'a AtomicBool,
}

/// What a VM taught us.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Learned {
    /// `record` mode: the run.
    pub run: Option<Run>,
    /// Whether the run's window had closed.
    #[serde(default)]
    pub run_closed: bool,
    /// Serving: pages new to the working set.
    pub touches: Vec<LearnedTouch>,
    /// Demand faults so far (a learned page's rank counts them).
    #[serde(default)]
    pub demand_faults: u64,
}

impl<'a> Learner<'a> {
    /// Records within `record`'s window, and/or learns pages `known` lacks; None when neither.
    pub fn new(
        record: Option<RecordWindow>,
        known: Option<&'a WorkingSet>,
        end_recording: &'a AtomicBool,
    ) -> Option<Learner<'a>> {
        (record.is_some() || known.is_some()).then(|| Learner {
            recorder: record.map(Recorder::new),
            known,
            learned: Vec::new(),
            demand_faults: 0,
            end_recording,
        })
    }

    /// A demand fault on file page `page`; `prefetched_pages` were placed ahead of the guest so
    /// far (they count towards the page's estimated first-touch rank).
    pub fn note(&mut self, page: PageIndex, write: bool, prefetched_pages: u64) {
        fail::fail_point!("learner-note");
        if let Some(recorder) = self.recorder.as_mut() {
            if self.end_recording.load(Ordering::Relaxed) {
                recorder.end();
            }
            recorder.record(page, write);
        }
        let rank = u32::try_from(self.demand_faults + prefetched_pages).unwrap_or(u32::MAX);
        self.demand_faults += 1;
        if self.known.is_some_and(|set| !set.pages.contains_key(&page)) {
            self.learned.push(LearnedTouch { page, rank, write });
        }
    }

    /// What was learned.
    pub fn finish(self) -> Learned {
        let run_closed = self.recorder.as_ref().is_some_and(Recorder::is_closed);
        Learned {
            run: self.recorder.map(Recorder::finish),
            run_closed,
            touches: self.learned,
            demand_faults: self.demand_faults,
        }
    }

    /// Goes on learning from a VM taken over: `so_far` is what its predecessor learned since
    /// the VM attached at `attached` (None for a VM recovered after a crash: its first touches
    /// are lost, so it records nothing).
    pub fn resume(
        record: Option<RecordWindow>,
        known: Option<&'a WorkingSet>,
        end_recording: &'a AtomicBool,
        so_far: Learned,
        attached: std::time::Instant,
    ) -> Option<Learner<'a>> {
        let mut learner = Learner::new(record, known, end_recording)?;
        learner.recorder =
            record.map(|window| Recorder::resume(window, so_far.run.unwrap_or_default(), attached, so_far.run_closed));
        learner.learned = so_far.touches;
        learner.demand_faults = so_far.demand_faults;
        Some(learner)
    }
}

impl Learned {
    /// What was learned as a working set of its own (for another host to merge); None if
    /// nothing was.
    pub fn as_set(&self, identity: &prefetch::identity::SnapshotIdentity) -> Option<WorkingSet> {
        let mut set = WorkingSet::new(*identity);
        match &self.run {
            Some(run) => set.merge(run),
            None if self.touches.is_empty() => return None,
            None => set.learn(&self.touches),
        }
        Some(set)
    }

    /// Merges what was learned into the working-set file at `path`; a failure loses this hint
    /// only, and is logged.
    pub fn save(&self, path: &std::path::Path, identity: &prefetch::identity::SnapshotIdentity) {
        let (result, what) = match &self.run {
            Some(run) => (prefetch::format::merge_run(path, identity, run), "run merged into the working set"),
            None if self.touches.is_empty() => return,
            None => (prefetch::format::learn(path, identity, &self.touches), "new pages learned into the working set"),
        };
        match result {
            Ok(merged) => {
                if let Some(why) = merged.replaced {
                    tracing::warn!(path = %path.display(), "previous working-set file unusable ({why}); kept as .corrupt, started anew");
                }
                let touches = self.run.as_ref().map_or(self.touches.len(), |r| r.touches.len());
                tracing::info!(path = %path.display(), runs = merged.runs, touches, "{what}");
            }
            Err(e) => tracing::error!("working set not updated: {e}"),
        }
    }
}
