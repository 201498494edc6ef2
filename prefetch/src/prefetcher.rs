//! The background prefetcher's schedule: a plan's batches in rank order, demand first.
//!
//! One [`PrefetchQueue`] per VM. The prefetch thread runs [`PrefetchQueue::run`]; the fault
//! thread, on a fault for a planned page whose batch has not run yet, calls
//! [`PrefetchQueue::pull_forward`] so that batch runs next. Placing memory is the server's
//! business ([`BatchPlacer`]); this module only decides what comes next and when to stop.

use crate::plan::Batch;
use crate::PageIndex;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// What placing a batch came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The batch is in (or was found present, or was skipped as removed).
    Done,
    /// A memory-layout event must be read by the fault thread first: try again shortly.
    Retry,
    /// The VM is gone: stop prefetching.
    Stop,
}

pub trait BatchPlacer {
    fn place(&self, batch: &Batch) -> Placed;
}

pub struct PrefetchQueue {
    batches: Vec<Batch>,
    /// first page → batch index, to find the batch of a faulting page.
    by_first_page: BTreeMap<PageIndex, usize>,
    done: Vec<AtomicBool>,
    urgent_tx: Sender<usize>,
    urgent_rx: Receiver<usize>,
    stop: AtomicBool,
    finished: AtomicBool,
    placed_pages: AtomicU64,
}

/// How long the prefetcher waits for the fault thread to read a pending layout event.
const RETRY_PAUSE: Duration = Duration::from_micros(50);

impl PrefetchQueue {
    pub fn new(batches: Vec<Batch>) -> PrefetchQueue {
        let by_first_page = batches.iter().enumerate().map(|(i, b)| (b.first_page, i)).collect();
        let done = batches.iter().map(|_| AtomicBool::new(false)).collect();
        let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded();
        PrefetchQueue {
            batches,
            by_first_page,
            done,
            urgent_tx,
            urgent_rx,
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            placed_pages: AtomicU64::new(0),
        }
    }

    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    pub fn planned_pages(&self) -> u64 {
        self.batches.iter().map(|b| b.pages).sum()
    }

    /// Pages of batches completed so far.
    pub fn placed_pages(&self) -> u64 {
        self.placed_pages.load(Ordering::Relaxed)
    }

    /// The batch holding `page`, if the plan has one (batches never overlap).
    pub fn batch_containing(&self, page: PageIndex) -> Option<usize> {
        let (_, &i) = self.by_first_page.range(..=page).next_back()?;
        (page < self.batches[i].end_page()).then_some(i)
    }

    pub fn is_done(&self, batch: usize) -> bool {
        self.done.get(batch).is_some_and(|d| d.load(Ordering::Acquire))
    }

    /// Asks the prefetch thread to run `batch` next (a fault showed the guest needs it now).
    pub fn pull_forward(&self, batch: usize) {
        let _ = self.urgent_tx.send(batch);
    }

    /// Stops the prefetch thread after its current batch.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether every batch has run (false if stopped early).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// The prefetch thread's body: pulled-forward batches first, then the plan in rank order.
    pub fn run(&self, placer: &impl BatchPlacer) {
        let mut next = 0;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let batch = match self.urgent_rx.try_recv() {
                Ok(i) => i,
                Err(_) => {
                    while next < self.batches.len() && self.is_done(next) {
                        next += 1;
                    }
                    if next == self.batches.len() {
                        break;
                    }
                    next
                }
            };
            if batch >= self.batches.len() || self.is_done(batch) {
                continue;
            }
            loop {
                match placer.place(&self.batches[batch]) {
                    Placed::Done => break,
                    Placed::Retry if !self.stop.load(Ordering::Acquire) => std::thread::sleep(RETRY_PAUSE),
                    Placed::Retry | Placed::Stop => {
                        self.stop();
                        return;
                    }
                }
            }
            self.done[batch].store(true, Ordering::Release);
            self.placed_pages
                .fetch_add(self.batches[batch].pages, Ordering::Relaxed);
        }
        self.finished.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BatchKind;
    use std::sync::Mutex;

    struct Log<'a> {
        order: Mutex<Vec<PageIndex>>,
        /// Pulled forward from "the fault thread" when the first batch runs.
        pull: Option<(&'a PrefetchQueue, usize)>,
        retries_left: Mutex<u32>,
    }

    impl BatchPlacer for Log<'_> {
        fn place(&self, batch: &Batch) -> Placed {
            let mut retries = self.retries_left.lock().expect("lock");
            if *retries > 0 {
                *retries -= 1;
                return Placed::Retry;
            }
            let mut order = self.order.lock().expect("lock");
            if order.is_empty() {
                if let Some((queue, i)) = self.pull {
                    queue.pull_forward(i);
                }
            }
            order.push(batch.first_page);
            Placed::Done
        }
    }

    fn batches() -> Vec<Batch> {
        (0..5)
            .map(|i| Batch {
                first_page: i * 10,
                pages: 4,
                kind: BatchKind::Copy,
                rank: i as f64,
            })
            .collect()
    }

    #[test]
    fn runs_in_order_and_pulled_forward_batches_jump_the_queue() {
        let queue = PrefetchQueue::new(batches());
        let log = Log {
            order: Mutex::new(vec![]),
            pull: Some((&queue, 3)),
            retries_left: Mutex::new(2),
        };
        queue.run(&log);
        assert_eq!(
            *log.order.lock().expect("lock"),
            vec![0, 30, 10, 20, 40],
            "batch 3 ran right after it was pulled"
        );
        assert!(queue.is_finished());
        assert_eq!(queue.placed_pages(), 20);
        assert_eq!(queue.batch_containing(32), Some(3));
        assert_eq!(queue.batch_containing(35), None, "between batches");
        assert!(queue.is_done(4));
    }

    #[test]
    fn stop_ends_the_run_unfinished() {
        let queue = PrefetchQueue::new(batches());
        queue.stop();
        let log = Log {
            order: Mutex::new(vec![]),
            pull: None,
            retries_left: Mutex::new(0),
        };
        queue.run(&log);
        assert!(log.order.lock().expect("lock").is_empty());
        assert!(!queue.is_finished());
    }
}
