//! Every VM the server has attached, live or recently ended, with its counters: what the
//! control socket reports and where it finds a VM by id.

use crate::stats::{VmStats, VmStatsReport};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Ended VMs whose reports are kept for the stats endpoint.
const ENDED_VMS_KEPT: usize = 1024;

/// One attached VM, as the control socket sees it.
pub struct VmRecord {
    /// The server's id for it (in its thread's name and log lines).
    pub id: u64,
    /// The snapshot it was restored from.
    pub snapshot: String,
    /// The VMM's pid (SO_PEERCRED).
    pub peer_pid: i32,
    /// Its userfaultfd's (device, inode): one uffd serves one VM.
    pub uffd_identity: (u64, u64),
    started: Instant,
    /// Its counters, updated by its thread.
    pub stats: VmStats,
    /// Set through the control socket: end this VM's record window now.
    pub end_recording: AtomicBool,
    end: Mutex<Option<(String, Duration)>>,
}

/// A VM as `uffd-server stats` reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmReport {
    /// The server's id for it.
    pub id: u64,
    /// The snapshot it was restored from.
    pub snapshot: String,
    /// The VMM's pid.
    pub peer_pid: i32,
    /// Why it ended; None while it is attached.
    pub ended: Option<String>,
    /// Seconds since it attached (until it ended).
    pub seconds: f64,
    /// Its counters.
    pub counters: VmStatsReport,
}

impl VmRecord {
    /// A VM attaching now.
    pub fn new(id: u64, snapshot: &str, peer_pid: i32, uffd_identity: (u64, u64)) -> VmRecord {
        VmRecord {
            id,
            snapshot: snapshot.into(),
            peer_pid,
            uffd_identity,
            started: Instant::now(),
            stats: VmStats::default(),
            end_recording: AtomicBool::new(false),
            end: Mutex::new(None),
        }
    }

    /// When it attached.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Why and after how long it ended, once it has.
    pub fn ended(&self) -> Option<(String, Duration)> {
        self.lock_end().clone()
    }

    /// Marks it ended; returns how long it was served.
    fn set_ended(&self, why: String) -> Duration {
        let elapsed = self.started.elapsed();
        *self.lock_end() = Some((why, elapsed));
        elapsed
    }

    /// Its report now.
    pub fn report(&self) -> VmReport {
        let ended = self.ended();
        let seconds = ended.as_ref().map_or(self.started.elapsed(), |(_, d)| *d).as_secs_f64();
        VmReport {
            id: self.id,
            snapshot: self.snapshot.clone(),
            peer_pid: self.peer_pid,
            ended: ended.map(|(why, _)| why),
            seconds,
            counters: self.stats.report(),
        }
    }

    fn lock_end(&self) -> MutexGuard<'_, Option<(String, Duration)>> {
        // Only ever set whole: a poisoned lock holds a consistent value.
        self.end.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The VMs of a server: the attached ones, the last [`ENDED_VMS_KEPT`] ended ones (as their final
/// reports), and per snapshot the totals of every VM that ended.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    /// Attached VMs. Lock order: `live`, then `totals`.
    live: Mutex<Vec<Arc<VmRecord>>>,
    ended: Mutex<VecDeque<VmReport>>,
    totals: Mutex<BTreeMap<String, Totals>>,
}

/// A snapshot's totals beyond its attached VMs, so that they never go down.
#[derive(Default)]
struct Totals {
    /// Every counter and histogram of the VMs that ended, summed: an ended VM's own histograms
    /// (~37 KB) are not kept.
    ended: VmStats,
    ended_vms: u64,
    refused: BTreeMap<&'static str, u64>,
}

/// Everything a snapshot's VMs counted since the server started (the metrics endpoint).
#[derive(Default)]
pub struct SnapshotView {
    /// Every counter and histogram, summed over its VMs.
    pub stats: VmStats,
    /// VMs attached so far.
    pub vms_attached: u64,
    /// VMs attached now.
    pub vms_live: u64,
    /// Connections refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

impl Registry {
    /// A fresh id for a connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds an attached VM; refuses it (returning the live VM's id) when its uffd already
    /// serves a live VM: two loops on one uffd would place two region maps into one guest.
    pub fn add(&self, record: Arc<VmRecord>) -> Result<(), u64> {
        let mut live = self.lock_live();
        if let Some(other) = live.iter().find(|v| v.uffd_identity == record.uffd_identity) {
            return Err(other.id);
        }
        live.push(record);
        Ok(())
    }

    /// Marks `record` ended for `why`: its final report is kept (the last [`ENDED_VMS_KEPT`]),
    /// its counters join its snapshot's totals. Returns how long it was served.
    pub fn end(&self, record: &Arc<VmRecord>, why: String) -> Duration {
        let elapsed = record.set_ended(why);
        let report = record.report();
        {
            let mut live = self.lock_live();
            live.retain(|v| !Arc::ptr_eq(v, record));
            let mut totals = self.lock_totals();
            let totals = totals.entry(record.snapshot.clone()).or_default();
            totals.ended.absorb(&record.stats);
            totals.ended_vms += 1;
        }
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.len() >= ENDED_VMS_KEPT {
            ended.pop_front();
        }
        ended.push_back(report);
        elapsed
    }

    /// Every live VM's report, then the ended ones kept.
    pub fn reports(&self) -> Vec<VmReport> {
        let mut reports: Vec<VmReport> = self.lock_live().iter().map(|v| v.report()).collect();
        reports.extend(self.ended.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        reports.sort_by_key(|r| r.id);
        reports
    }

    /// The live VM with id `id`.
    pub fn find(&self, id: u64) -> Option<Arc<VmRecord>> {
        self.lock_live().iter().find(|v| v.id == id).cloned()
    }

    /// Whether VM `id` ended (among those kept).
    pub fn has_ended(&self, id: u64) -> bool {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|r| r.id == id)
    }

    /// Counts a connection to `snapshot` refused for `reason`.
    pub fn count_refusal(&self, snapshot: &str, reason: &'static str) {
        *self.lock_totals().entry(snapshot.into()).or_default().refused.entry(reason).or_default() += 1;
    }

    /// Each snapshot's totals since the server started (snapshots with no VM and no refusal
    /// yet are absent). Every VM counts once: live VMs and totals are read under one hold of
    /// both locks (as [`Registry::end`] moves a VM between them); the live VMs' counters are
    /// summed after, without holding any lock.
    pub fn per_snapshot(&self) -> BTreeMap<String, SnapshotView> {
        let mut views: BTreeMap<String, SnapshotView> = BTreeMap::new();
        let live: Vec<Arc<VmRecord>> = {
            let live = self.lock_live();
            for (snapshot, totals) in self.lock_totals().iter() {
                let view = views.entry(snapshot.clone()).or_default();
                view.stats.absorb(&totals.ended);
                view.vms_attached += totals.ended_vms;
                view.refused.clone_from(&totals.refused);
            }
            live.clone()
        };
        for vm in live {
            let view = views.entry(vm.snapshot.clone()).or_default();
            view.stats.absorb(&vm.stats);
            view.vms_attached += 1;
            view.vms_live += 1;
        }
        views
    }

    fn lock_live(&self) -> MutexGuard<'_, Vec<Arc<VmRecord>>> {
        // Entries are added or removed whole: a poisoned lock holds a consistent list.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_totals(&self) -> MutexGuard<'_, BTreeMap<String, Totals>> {
        // Only ever added to: a poisoned lock holds consistent (if slightly low) totals.
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }
}
