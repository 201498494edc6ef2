//! A snapshot's working set, loaded and planned once and shared by every VM restored from it
//! until its files change: loading and planning are not free (measured ~17 ms for 65 536
//! pages).
//!
//! A lost hint is logged, never an error to the VM: a missing, corrupt or other-snapshot file
//! means serving without its prefetch. Pages are always served from the snapshot, never from
//! the working set, so a stale set can waste copies but never serve a wrong byte.

use crate::config::{Mode, ServerConfig};
use crate::source::snapshot::Snapshot;
use prefetch::loading_set::LoadingSet;
use prefetch::plan::Plan;
use prefetch::policy::plan_for;
use prefetch::working_set::WorkingSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A snapshot's working set as loaded and planned for the server's policy.
#[derive(Default)]
pub struct PlannedSet {
    /// The set demand faults are checked against for online refinement.
    pub working_set: Option<WorkingSet>,
    /// What to place, in order.
    pub plan: Plan,
    /// The bytes of the plan's batches, when the plan came from a loading-set file.
    pub loading_set: Option<LoadingSet>,
}

/// Changes whenever a file is rewritten (always by rename: a new inode).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// The stamps of the working-set and loading-set files a plan was made from.
type PlanStamp = (Option<FileStamp>, Option<FileStamp>);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp { inode: meta.ino(), len: meta.len(), modified: meta.modified().ok() })
}

/// The plan of one snapshot, kept while its files are unchanged.
pub struct PlanCache {
    mode: Mode,
    working_set: Option<PathBuf>,
    loading_set: Option<PathBuf>,
    cached: Mutex<Option<(PlanStamp, Arc<PlannedSet>)>>,
}

impl PlanCache {
    /// The cache of a snapshot served by `config`.
    pub fn new(config: &ServerConfig) -> PlanCache {
        PlanCache {
            mode: config.mode,
            working_set: config.working_set.clone(),
            loading_set: config.loading_set.clone(),
            cached: Mutex::new(None),
        }
    }

    /// The planned set for a VM of `snapshot`: the cached one while the files are unchanged,
    /// else loaded and planned anew.
    pub fn get(&self, snapshot: &Snapshot) -> Arc<PlannedSet> {
        let Mode::Serve { policy, min_frequency, plan: plan_config } = self.mode else {
            return Arc::default();
        };
        let (ws_path, ls_path) = (self.working_set.as_deref(), self.loading_set.as_deref());
        if ws_path.is_none() && ls_path.is_none() {
            return Arc::default();
        }
        let stamp: PlanStamp = (ws_path.and_then(file_stamp), ls_path.and_then(file_stamp));
        let complete = ws_path.is_none() == stamp.0.is_none() && ls_path.is_none() == stamp.1.is_none();
        // Holders only ever replace the value whole: a poisoned lock holds a consistent one.
        let mut cache = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, planned)) = cache.as_ref().filter(|(cached, _)| complete && *cached == stamp) {
            return Arc::clone(planned);
        }
        let started = Instant::now();
        let mut planned = PlannedSet::default();
        if let Some(path) = ws_path {
            let set = match prefetch::format::load(path, &snapshot.identity()) {
                Ok(set) => {
                    let is_zero = |page| snapshot.is_zero_page(page);
                    planned.plan = plan_for(&set, policy, min_frequency, is_zero, plan_config);
                    tracing::info!(path = %path.display(), runs = set.runs, pages = set.pages.len(), "working set loaded");
                    set
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "working set not used, serving without its prefetch: {e}");
                    WorkingSet::new(snapshot.identity())
                }
            };
            planned.working_set = Some(set);
        }
        if let Some(path) = ls_path {
            match LoadingSet::load(path, snapshot.identity(), snapshot.stamp().digest()) {
                Ok(loading_set) => {
                    let batches = loading_set.plan().batches.len();
                    tracing::info!(path = %path.display(), batches, "loading set loaded");
                    planned.plan = loading_set.plan().clone();
                    planned.loading_set = Some(loading_set);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "loading set not used, prefetching from the snapshot: {e}")
                }
            }
        }
        tracing::info!(
            ?policy,
            batches = planned.plan.batches.len(),
            us = started.elapsed().as_micros(),
            "working set loaded and planned"
        );
        let planned = Arc::new(planned);
        *cache = complete.then(|| (stamp, Arc::clone(&planned)));
        planned
    }
}
