//! Serving one VM that is attached — freshly, or taken over from a predecessor — until it
//! ends, and what happens after: its journal removed (or kept for a successor), what it taught
//! saved and shared, its end logged.

use super::SnapshotService;
use crate::config::Mode;
use crate::log_limit::LogLimit;
use crate::memory::placer::Placer;
use crate::memory::regions::RegionMap;
use crate::memory::uffd_io::Userfaultfd;
use crate::recovery::handover::HandedVm;
use crate::registry::VmRecord;
use crate::source::snapshot::Snapshot;
use crate::stats::count;
use crate::vm::learner::Learner;
use crate::vm::prefetcher::Prefetcher;
use crate::vm::removed::RemovedRanges;
use crate::vm::{self, Guest, VmEnd, VmmLink};
use prefetch::plan::Plan;
use prefetch::policy::PrefetchPolicy;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a VM's service was doing, for the successor to go on from (a crash loses it: the
/// journal holds only what serving correctly needs).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)] // a field an older predecessor did not send is left at its default
pub(super) struct Carried {
    /// What it learned so far: a run being recorded, pages new to the working set.
    pub learned: crate::vm::learner::Learned,
    /// How long ago it attached (a record window's time limit counts from then).
    pub attached_ms_ago: u64,
    /// How far its plan was placed.
    pub progress: Option<crate::vm::prefetcher::PlanProgress>,
}

/// A VM validated, registered and journaled: everything its fault loop needs.
pub(super) struct ReadyVm {
    pub record: Arc<VmRecord>,
    pub snapshot: Arc<Snapshot>,
    pub regions: RegionMap,
    pub uffd: Userfaultfd,
    pub link: VmmLink,
    /// Ranges removed so far, and the VM's journal.
    pub removed: RemovedRanges,
    /// Taken over from a predecessor: its ranges are woken before serving (a fault the
    /// predecessor read and never answered is raised again). After a handover it goes on with
    /// what the predecessor carried over; after a crash it is not learned from (its first
    /// touches before the crash are lost).
    pub taken_over: bool,
    /// What a predecessor's service of it left (a handover).
    pub carried: Option<Carried>,
}

/// Serves `vm` until it ends.
pub(super) fn serve_vm(service: &SnapshotService, vm: ReadyVm) {
    let ReadyVm { record, snapshot, regions, uffd, link, removed, taken_over, carried } = vm;
    let config = &service.config;
    let planned = service.plans.get(&snapshot);
    let eager = match config.mode {
        Mode::Serve { policy: PrefetchPolicy::Eager, plan, .. } => Some(whole_memory(&regions, plan.max_batch_pages)),
        _ => None,
    };
    let plan = eager.as_ref().unwrap_or(&planned.plan);
    let stats = &record.stats;
    count(&stats.prefetch_plan_us, u64::try_from(record.started().elapsed().as_micros()).unwrap_or(u64::MAX));
    count(&stats.prefetch_planned_pages, plan.pages());
    count(&stats.prefetch_deferred_pages, plan.batches[plan.deferred_from..].iter().map(|b| b.pages).sum());
    let window = match config.mode {
        Mode::Record { window } if !taken_over || carried.is_some() => Some(window),
        _ => None,
    };
    let guest = Guest {
        placer: Placer::new(&uffd),
        regions: &regions,
        snapshot: snapshot.pages(),
        stats,
        log_limit: LogLimit::default(),
    };
    if taken_over {
        count(&stats.taken_over, 1);
        guest.wake_all();
    }
    let mut prefetcher = Prefetcher::new(plan, planned.loading_set.as_ref(), record.started());
    let known = planned.working_set.as_ref().filter(|_| !taken_over || carried.is_some());
    let learner = match carried {
        Some(Carried { learned, attached_ms_ago, progress }) => {
            if let (Some(prefetcher), Some(progress)) = (prefetcher.as_mut(), progress.as_ref()) {
                prefetcher.resume(progress);
            }
            let attached =
                Instant::now().checked_sub(Duration::from_millis(attached_ms_ago)).unwrap_or_else(Instant::now);
            Learner::resume(window, known, &record.end_recording, learned, attached)
        }
        None => Learner::new(window, known, &record.end_recording),
    };
    let (end, served) = vm::serve(guest, &link, config.demand, (prefetcher, learner), removed);
    let vm::Served { learned, mut removed, progress } = served;
    let journal = removed.take_journal();

    if end == VmEnd::Stopped {
        // Left as it is for a successor: the journal stays, and a handover in progress takes
        // the fds (else they close with the process; the VMM keeps its copies).
        if let Some(journal) = journal {
            let attached_ms_ago = u64::try_from(record.started().elapsed().as_millis()).unwrap_or(u64::MAX);
            let handed = HandedVm {
                journal: journal.path().to_path_buf(),
                uffd: uffd.into_owned(),
                socket: link.socket,
                carried: Carried { learned, attached_ms_ago, progress },
            };
            service.lifecycle.handover.give(handed);
        }
        log_end(service, &record, &end);
        return;
    }
    // Let go of the VM before the slow part (the working-set file): a VMM that maps memory again
    // in the same process waits for this hang-up (docs/protocol.md).
    drop(uffd);
    if let Some(socket) = &link.socket {
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
    if let Some(journal) = journal {
        journal.remove();
    }
    log_end(service, &record, &end);
    if let Some(path) = &config.working_set {
        learned.save(path, &snapshot.identity());
    }
    if let Some(remote) = service.store.remote_of(&service.name).filter(|_| config.shares_learning()) {
        publish_learned(remote, &service.name, &learned, &snapshot.identity());
    }
}

/// Shares what a VM of a snapshot from an object store taught with every other host: as a run
/// object of its own in the bucket (`snapstore::shared_set`). A failure loses this hint only.
fn publish_learned(
    remote: &snapstore::remote::RemoteStore,
    name: &str,
    learned: &crate::vm::learner::Learned,
    identity: &prefetch::identity::SnapshotIdentity,
) {
    let Some(set) = learned.as_set(identity) else { return };
    match snapstore::shared_set::publish(remote.bucket(), name, &set, remote.retry_policy()) {
        Ok(key) => tracing::info!(key, pages = set.pages.len(), "learned pages published for other hosts"),
        Err(e) => tracing::warn!("learned pages not published: {e}"),
    }
}

/// Marks the VM ended in the registry and logs its counters (as an error if it failed).
fn log_end(service: &SnapshotService, record: &Arc<VmRecord>, end: &VmEnd) {
    let elapsed = service.registry.end(record, end.to_string());
    let summary = format!("VM ended ({end}) after {:.3}s: {}", elapsed.as_secs_f64(), record.stats.report().summary());
    if end.is_error() {
        tracing::error!(peer_pid = record.peer_pid, "{summary}");
    } else {
        tracing::info!(peer_pid = record.peer_pid, "{summary}");
    }
}

/// Every page of every region, in file order (the `eager` policy).
fn whole_memory(regions: &RegionMap, max_batch_pages: u64) -> Plan {
    let page = crate::addr::BASE_PAGE;
    let ranges = regions.regions().iter().map(|r| (r.file_offset.0 / page, (r.file_offset.0 + r.size) / page));
    Plan::whole(ranges, max_batch_pages)
}
