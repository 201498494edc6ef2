//! Recording one VM run: the sequence of first-touch faults, bounded by a record window.
//!
//! A long-lived VM must not poison the working set with everything it ever touched, so a run
//! stops recording at the first of: an explicit end, a fault-count limit, a time limit (and, in
//! any case, when the VMM goes away).

use crate::PageIndex;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// One first touch: the page and whether the first access was a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    /// The file page.
    pub page: PageIndex,
    /// Whether the first access was a write.
    pub write: bool,
}

/// A recorded run: first touches in order (a touch's rank is its position).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Each page once, in the order first touched.
    pub touches: Vec<Touch>,
}

/// Bounds of a recording; `None` means unbounded.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordWindow {
    /// Stop after this many first touches.
    pub max_faults: Option<usize>,
    /// Stop this long after the run started.
    pub max_duration: Option<Duration>,
}

/// Records one run within its window.
pub struct Recorder {
    window: RecordWindow,
    started: Instant,
    seen: HashSet<PageIndex>,
    run: Run,
    closed: bool,
}

impl Recorder {
    /// A recorder whose run starts now.
    pub fn new(window: RecordWindow) -> Recorder {
        Recorder { window, started: Instant::now(), seen: HashSet::new(), run: Run::default(), closed: false }
    }

    /// Records a touch of `page` at `now`; repeats of a page are ignored. Returns false once
    /// the window has closed.
    pub fn record_at(&mut self, page: PageIndex, write: bool, now: Instant) -> bool {
        if self.closed {
            return false;
        }
        if self.window.max_duration.is_some_and(|limit| now.duration_since(self.started) >= limit) {
            self.closed = true;
            return false;
        }
        if self.seen.insert(page) {
            self.run.touches.push(Touch { page, write });
            if self.window.max_faults.is_some_and(|limit| self.run.touches.len() >= limit) {
                self.closed = true;
            }
        }
        true
    }

    /// Records a touch of `page` now (see [`Recorder::record_at`]).
    pub fn record(&mut self, page: PageIndex, write: bool) -> bool {
        self.record_at(page, write, Instant::now())
    }

    /// Ends the window explicitly: later touches are not recorded.
    pub fn end(&mut self) {
        self.closed = true;
    }

    /// The run recorded.
    pub fn finish(self) -> Run {
        self.run
    }

    /// Whether the window has closed (as far as touches so far tell).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Goes on with `run`, recorded so far by another process since `started`: a run carried
    /// over a server handover.
    pub fn resume(window: RecordWindow, run: Run, started: Instant, closed: bool) -> Recorder {
        let seen = run.touches.iter().map(|t| t.page).collect();
        Recorder { window, started, seen, run, closed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keeps_first_touches_in_order_up_to_the_fault_limit(
            pages in proptest::collection::vec(0u64..64, 0..200),
            limit in proptest::option::of(1usize..40),
        ) {
            let mut recorder = Recorder::new(RecordWindow { max_faults: limit, max_duration: None });
            for &p in &pages {
                recorder.record(p, p % 3 == 0);
            }
            let mut expected = Vec::new();
            for &p in &pages {
                if !expected.contains(&p) && limit.is_none_or(|l| expected.len() < l) {
                    expected.push(p);
                }
            }
            let run = recorder.finish();
            prop_assert_eq!(run.touches.iter().map(|t| t.page).collect::<Vec<_>>(), expected);
            prop_assert!(run.touches.iter().all(|t| t.write == (t.page % 3 == 0)));
        }
    }

    #[test]
    fn time_limit_and_explicit_end_close_the_window() {
        let mut recorder = Recorder::new(RecordWindow { max_faults: None, max_duration: Some(Duration::from_secs(1)) });
        let t0 = recorder.started;
        assert!(recorder.record_at(1, false, t0));
        assert!(!recorder.record_at(2, false, t0 + Duration::from_secs(2)), "past the time limit");
        assert!(!recorder.record_at(3, false, t0), "closed for good");
        let mut explicit = Recorder::new(RecordWindow::default());
        explicit.record(7, true);
        explicit.end();
        assert!(!explicit.record(8, false));
        assert_eq!(recorder.finish().touches, vec![Touch { page: 1, write: false }]);
        assert_eq!(explicit.finish().touches, vec![Touch { page: 7, write: true }]);
    }
}
