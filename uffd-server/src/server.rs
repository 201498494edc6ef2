//! The server: one listening socket per snapshot (Firecracker knows only a socket path), one
//! thread per attached VM, and a control socket that reports every VM's counters.
//!
//! A connection's failure — a bad handshake, a refused peer, a VMM that dies — is logged with
//! that VM's id and peer pid and ends that connection only; nothing here can stop the others.

use crate::addr::BASE_PAGE;
pub use crate::control::{end_recording, query_stats, StatsResponse, VmReport};
use crate::fault_loop::{FaultConfig, FaultLoop, VmEnd, VmOutcome};
use crate::handshake::{self, HandshakeError};
use crate::placer::Placer;
use crate::regions::{RegionError, RegionMap};
use crate::snapshot::Snapshot;
use crate::snapshot::{SnapshotError, Storage};
use crate::stats::VmStats;
use crate::store::SnapshotStore;
use crate::uffd_io::Userfaultfd;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use prefetch::loading_set::LoadingSet;
use prefetch::plan::{plan, Batch, BatchKind, PlanConfig};
use prefetch::record::{RecordWindow, Run};
use prefetch::working_set::WorkingSet;
use prefetch::PageIndex;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the control socket in the socket directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Ended VMs kept for the stats endpoint.
const ENDED_VMS_KEPT: usize = 1024;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub socket_dir: PathBuf,
    /// (name, memory file) pairs; the socket of `name` is `socket_dir/name.sock`.
    pub snapshots: Vec<(String, PathBuf)>,
    /// RAM budget for loaded snapshots; idle ones are evicted beyond it.
    pub cache_bytes: u64,
    /// Snapshots held in RAM, or read from their files on each fault.
    pub storage: Storage,
    pub fault: FaultConfig,
    /// When non-empty, only peers with one of these uids may attach.
    pub allow_uids: Vec<u32>,
    pub handshake_timeout: Duration,
    /// The working-set file of the (single) snapshot: recorded into, prefetched from, refined.
    pub working_set: Option<PathBuf>,
    /// A loading-set file of the (single) snapshot: `union` prefetches its batches from it.
    pub loading_set: Option<PathBuf>,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Serve, prefetching by `policy`; with a working set, demand faults on pages new to it are
    /// merged into it when the VM ends (online refinement).
    Serve { policy: PrefetchPolicy, min_frequency: f64, plan: PlanConfig },
    /// Serve on demand and merge each VM's first touches into the working set as a run.
    Record { window: RecordWindow },
}

/// What is brought in ahead of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefetchPolicy {
    /// Nothing: every page comes by demand fault (lazy).
    None,
    /// The whole snapshot, before the first fault is served (SnapFaaS).
    Eager,
    /// The first recorded run, synchronously before the first fault is served (REAP).
    Reap,
    /// The union over recorded runs, in the background in first-touch order (ours).
    Union,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no snapshot given")]
    NoSnapshots,
    #[error("snapshot name `{0}` is not valid: use letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("snapshot name `{0}` is given twice")]
    DuplicateName(String),
    #[error("a working-set file belongs to exactly one snapshot, got {0} snapshots")]
    WorkingSetNeedsOneSnapshot(usize),
    #[error("{0:?} needs a working set (--working-set)")]
    PolicyNeedsWorkingSet(PrefetchPolicy),
    #[error("a loading set is prefetched by --prefetch union, and belongs to exactly one snapshot")]
    LoadingSetNeedsUnion,
    #[error("cannot create socket directory {0}: {1}")]
    SocketDir(PathBuf, io::Error),
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, io::Error),
}

/// Why a connection was refused before its fault loop started.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot read peer credentials: {0}")]
    PeerCredentials(nix::Error),
    #[error("peer uid {0} is not allowed (--allow-uid)")]
    UidNotAllowed(u32),
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("handshake refused: {0}")]
    Regions(#[from] RegionError),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot use the userfaultfd: {0}")]
    Uffd(nix::Error),
}

/// One attached VM, as the stats endpoint sees it.
pub struct VmRecord {
    pub id: u64,
    pub snapshot: String,
    pub peer_pid: i32,
    started: Instant,
    pub stats: VmStats,
    /// Set through the control socket: end this VM's record window now.
    pub end_recording: AtomicBool,
    end: Mutex<Option<(String, Duration)>>,
}

#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    vms: Mutex<Vec<Arc<VmRecord>>>,
}

impl Registry {
    fn add(&self, record: Arc<VmRecord>) {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let ended = vms.iter().filter(|v| v.ended().is_some()).count();
        if ended >= ENDED_VMS_KEPT {
            if let Some(oldest) = vms.iter().position(|v| v.ended().is_some()) {
                vms.remove(oldest);
            }
        }
        vms.push(record);
    }

    pub(crate) fn reports(&self) -> Vec<VmReport> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.iter().map(|v| v.report()).collect()
    }

    pub(crate) fn find(&self, id: u64) -> Option<Arc<VmRecord>> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.iter().find(|v| v.id == id).cloned()
    }
}

impl VmRecord {
    pub(crate) fn ended(&self) -> Option<(String, Duration)> {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn report(&self) -> VmReport {
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
}

/// A server with all its sockets bound, ready to run.
pub struct Server {
    config: ServerConfig,
    store: Arc<SnapshotStore>,
    registry: Arc<Registry>,
    listeners: Vec<(String, UnixListener)>,
    control: UnixListener,
}

impl Server {
    /// Validates the configuration and binds every socket (mode 0600; a stale socket file from
    /// an earlier run is replaced).
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        if config.snapshots.is_empty() {
            return Err(ServerError::NoSnapshots);
        }
        if config.working_set.is_some() && config.snapshots.len() != 1 {
            return Err(ServerError::WorkingSetNeedsOneSnapshot(config.snapshots.len()));
        }
        if let Mode::Serve { policy: policy @ (PrefetchPolicy::Reap | PrefetchPolicy::Union), .. } = config.mode {
            if config.working_set.is_none() && !(policy == PrefetchPolicy::Union && config.loading_set.is_some()) {
                return Err(ServerError::PolicyNeedsWorkingSet(policy));
            }
        }
        let union = matches!(config.mode, Mode::Serve { policy: PrefetchPolicy::Union, .. });
        if config.loading_set.is_some() && (!union || config.snapshots.len() != 1) {
            return Err(ServerError::LoadingSetNeedsUnion);
        }
        let mut names = std::collections::BTreeSet::new();
        for (name, _) in &config.snapshots {
            if !is_valid_name(name) {
                return Err(ServerError::BadName(name.clone()));
            }
            if !names.insert(name.clone()) {
                return Err(ServerError::DuplicateName(name.clone()));
            }
        }
        std::fs::create_dir_all(&config.socket_dir)
            .map_err(|e| ServerError::SocketDir(config.socket_dir.clone(), e))?;
        let listeners = config
            .snapshots
            .iter()
            .map(|(name, _)| Ok((name.clone(), bind_private(&config.socket_dir.join(format!("{name}.sock")))?)))
            .collect::<Result<Vec<_>, ServerError>>()?;
        let control = bind_private(&config.socket_dir.join(CONTROL_SOCKET))?;
        let store = Arc::new(SnapshotStore::new(config.snapshots.clone(), config.cache_bytes, config.storage));
        Ok(Server { config, store, registry: Arc::default(), listeners, control })
    }

    /// Loads what fits in the budget, then serves until the process is killed.
    pub fn run(self) -> io::Result<()> {
        for result in self.store.preload() {
            if let Err(e) = result {
                tracing::error!("{e}; VMs of this snapshot will be refused until it loads");
            }
        }
        let mut threads = Vec::new();
        for (name, listener) in self.listeners {
            let ctx = Arc::new(AttachContext {
                snapshot: name.clone(),
                config: self.config.clone(),
                store: Arc::clone(&self.store),
                registry: Arc::clone(&self.registry),
                planned: Mutex::new(None),
            });
            threads.push(
                std::thread::Builder::new().name(format!("accept-{name}")).spawn(move || accept_loop(listener, ctx))?,
            );
        }
        let (store, registry) = (self.store, self.registry);
        threads.push(
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || crate::control::serve(self.control, &store, &registry))?,
        );
        for thread in threads {
            let _ = thread.join();
        }
        Ok(())
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != CONTROL_SOCKET.trim_end_matches(".sock")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn bind_private(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |e| ServerError::Bind(path.to_path_buf(), e);
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "replaced a stale socket file"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

struct AttachContext {
    snapshot: String,
    config: ServerConfig,
    store: Arc<SnapshotStore>,
    registry: Arc<Registry>,
    /// The working set as last loaded and planned, with the stamp of the file it came from.
    planned: Mutex<Option<(PlanStamp, Arc<PlannedSet>)>>,
}

fn accept_loop(listener: UnixListener, ctx: Arc<AttachContext>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends are transient: back off instead of spinning.
                tracing::error!(snapshot = ctx.snapshot, "accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = ctx.registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let ctx = Arc::clone(&ctx);
        let spawned = std::thread::Builder::new().name(format!("vm-{id}")).spawn(move || {
            let span = tracing::info_span!("vm", id, snapshot = ctx.snapshot.as_str());
            let _enter = span.enter();
            serve_connection(id, stream, &ctx);
        });
        if let Err(e) = spawned {
            tracing::error!(id, "cannot start a thread for the VM: {e}");
        }
    }
}

fn serve_connection(id: u64, stream: UnixStream, ctx: &AttachContext) {
    let creds = match getsockopt(&stream, PeerCredentials) {
        Ok(creds) => creds,
        Err(e) => {
            tracing::error!("VM refused: {}", AttachError::PeerCredentials(e));
            return;
        }
    };
    if let Err(e) = attach(id, creds.pid(), creds.uid(), &stream, ctx) {
        tracing::error!(peer_pid = creds.pid(), "VM refused: {e}");
    }
}

fn attach(id: u64, peer_pid: i32, peer_uid: u32, stream: &UnixStream, ctx: &AttachContext) -> Result<(), AttachError> {
    if !ctx.config.allow_uids.is_empty() && !ctx.config.allow_uids.contains(&peer_uid) {
        return Err(AttachError::UidNotAllowed(peer_uid));
    }
    // Bounds the wait for the handshake only; the fault loop polls without timeout.
    let _ = stream.set_read_timeout(Some(ctx.config.handshake_timeout));
    let handshake = handshake::receive(stream)?;
    let snapshot = ctx.store.get(&ctx.snapshot)?;
    let regions = RegionMap::new(handshake.regions, snapshot.len())?;
    let uffd = Userfaultfd::from_owned(handshake.uffd).map_err(AttachError::Uffd)?;
    let record = Arc::new(VmRecord {
        id,
        snapshot: ctx.snapshot.clone(),
        peer_pid,
        started: Instant::now(),
        stats: VmStats::default(),
        end_recording: AtomicBool::new(false),
        end: Mutex::new(None),
    });
    ctx.registry.add(Arc::clone(&record));
    tracing::info!(peer_pid, regions = regions.regions().len(), guest_bytes = regions.total_bytes(), "VM attached");
    let planned = planned_set(ctx, &snapshot);
    let eager = match ctx.config.mode {
        Mode::Serve { policy: PrefetchPolicy::Eager, plan, .. } => whole_snapshot(&regions, plan.max_batch_pages),
        _ => Vec::new(),
    };
    let install: &[Batch] = if eager.is_empty() { &planned.install } else { &eager };
    VmStats::add(&record.stats.prefetch_plan_us, record.started.elapsed().as_micros() as u64);
    let planned_pages = install.iter().chain(&planned.prefetch).map(|b| b.pages).sum();
    VmStats::add(&record.stats.prefetch_planned_pages, planned_pages);
    let fault_loop = FaultLoop {
        placer: Placer { uffd: &uffd, regions: &regions, snapshot: &snapshot, wake: true },
        socket: stream,
        config: ctx.config.fault,
        stats: &record.stats,
        attached: record.started,
        install_first: install,
        prefetch: &planned.prefetch,
        prefetch_deferred_rank: planned.deferred_rank,
        record: match ctx.config.mode {
            Mode::Record { window } => Some(window),
            Mode::Serve { .. } => None,
        },
        learn_from: planned.working_set.as_ref(),
        end_recording: &record.end_recording,
        loading_set: planned.loading_set.as_ref(),
    };
    let VmOutcome { end, run, learned } = fault_loop.run();
    // Let go of the VM before the slow part (the working-set file): a VMM that maps memory again
    // in the same process waits for this hang-up (docs/protocol.md).
    drop(uffd);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let elapsed = record.started.elapsed();
    *record.end.lock().unwrap_or_else(|p| p.into_inner()) = Some((end.to_string(), elapsed));
    let c = record.stats.report();
    let level_is_error = matches!(end, VmEnd::Failed(_));
    let summary = format!(
        "VM ended ({end}) after {:.3}s: faults={} copied_pages={} copied_bytes={} zeropage_pages={} zero_copied_pages={} removed_faults={} remove_events={} already_present={} fault_p50={}us fault_p99={}us",
        elapsed.as_secs_f64(), c.faults, c.copied_pages, c.copied_bytes, c.zeropage_pages, c.zero_copied_pages,
        c.removed_faults, c.remove_events, c.already_present, c.fault_latency_p50_us, c.fault_latency_p99_us
    );
    if level_is_error {
        tracing::error!(peer_pid, "{summary}");
    } else {
        tracing::info!(peer_pid, "{summary}");
    }
    if let Some(path) = &ctx.config.working_set {
        save_learning(&snapshot, path, run.as_ref(), &learned);
    }
    Ok(())
}

/// A snapshot's working set as loaded and planned for this server's policy. Shared by every
/// VM until the file changes: planning is not free (measured ~17 ms for 65 536 pages).
#[derive(Default)]
struct PlannedSet {
    /// The set demand faults are checked against for online refinement.
    working_set: Option<WorkingSet>,
    /// Placed synchronously before the first fault is served (`reap`).
    install: Vec<Batch>,
    /// Placed in the background, between events (`union`).
    prefetch: Vec<Batch>,
    /// The bytes of `prefetch`'s batches, when they come from a loading-set file.
    loading_set: Option<LoadingSet>,
    /// Batches of this rank or later hold pages seen in fewer than half the runs.
    deferred_rank: Option<f64>,
}

/// Changes whenever the working-set file is rewritten (always by rename: a new inode).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// The stamps of the files a plan was made from; a plan is reused only while all are unchanged.
type PlanStamp = (Option<FileStamp>, Option<FileStamp>);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp { inode: meta.ino(), len: meta.len(), modified: meta.modified().ok() })
}

/// The working set and plan for this VM: the cached ones while the files are unchanged, else
/// loaded and planned anew. A lost hint is logged, never an error to the VM.
fn planned_set(ctx: &AttachContext, snapshot: &Snapshot) -> Arc<PlannedSet> {
    let Mode::Serve { policy, min_frequency, plan: plan_config } = ctx.config.mode else {
        return Arc::default();
    };
    let (ws_path, ls_path) = (ctx.config.working_set.as_deref(), ctx.config.loading_set.as_deref());
    if ws_path.is_none() && ls_path.is_none() {
        return Arc::default();
    }
    let stamp: PlanStamp = (ws_path.and_then(file_stamp), ls_path.and_then(file_stamp));
    let complete = ws_path.is_none() == stamp.0.is_none() && ls_path.is_none() == stamp.1.is_none();
    let mut cache = ctx.planned.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, planned)) = cache.as_ref().filter(|(cached, _)| complete && *cached == stamp) {
        return Arc::clone(planned);
    }
    let started = Instant::now();
    let mut planned = PlannedSet::default();
    if let Some(path) = ws_path {
        planned.working_set = Some(match prefetch::format::load(path, &snapshot.identity()) {
            Ok(set) => {
                let is_zero = |page: PageIndex| snapshot.is_zero_page(page as usize);
                match policy {
                    PrefetchPolicy::Reap => {
                        let first: Vec<(PageIndex, f64)> =
                            set.first_run.iter().enumerate().map(|(i, &p)| (p, i as f64)).collect();
                        planned.install = plan(&first, is_zero, plan_config);
                    }
                    PrefetchPolicy::Union => {
                        planned.prefetch = plan(&set.select(min_frequency), is_zero, plan_config);
                        planned.deferred_rank = Some(set.minority_priority());
                    }
                    PrefetchPolicy::None | PrefetchPolicy::Eager => {}
                }
                tracing::info!(path = %path.display(), runs = set.runs, pages = set.pages.len(), "working set loaded");
                set
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "working set not used, serving without its prefetch: {e}");
                WorkingSet::new(snapshot.identity())
            }
        });
    }
    if let Some(path) = ls_path {
        match LoadingSet::load(path, snapshot.identity(), snapshot.mtime_ns()) {
            Ok(loading_set) => {
                tracing::info!(path = %path.display(), batches = loading_set.batches().len(), "loading set loaded");
                planned.prefetch = loading_set.batches().to_vec();
                planned.deferred_rank = loading_set.deferred_rank();
                planned.loading_set = Some(loading_set);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "loading set not used, prefetching from the snapshot: {e}")
            }
        }
    }
    tracing::info!(
        ?policy,
        batches = planned.install.len() + planned.prefetch.len(),
        us = started.elapsed().as_micros() as u64,
        "working set loaded and planned"
    );
    let planned = Arc::new(planned);
    *cache = complete.then(|| (stamp, Arc::clone(&planned)));
    planned
}

/// Every page of every region, in file order, as batches of at most `max_pages`.
fn whole_snapshot(regions: &RegionMap, max_pages: u64) -> Vec<Batch> {
    let mut batches = Vec::new();
    for region in regions.regions() {
        let (first, end) = (region.file_offset.0 / BASE_PAGE, (region.file_offset.0 + region.size) / BASE_PAGE);
        for start in (first..end).step_by(max_pages.max(1) as usize) {
            let pages = max_pages.min(end - start);
            batches.push(Batch { first_page: start, pages, kind: BatchKind::Copy, rank: 0.0 });
        }
    }
    batches
}

/// Merges what a VM taught us into the working-set file; a failure loses this hint only.
fn save_learning(snapshot: &Snapshot, path: &Path, run: Option<&Run>, learned: &[(PageIndex, u32, bool)]) {
    let identity = snapshot.identity();
    let (result, what) = match run {
        Some(run) => (prefetch::format::merge_run(path, &identity, run), "run merged into the working set"),
        None if learned.is_empty() => return,
        None => (prefetch::format::learn(path, &identity, learned), "new pages learned into the working set"),
    };
    match result {
        Ok(merged) => {
            if let Some(why) = merged.replaced {
                tracing::warn!(path = %path.display(), "previous working-set file unusable ({why}); kept as .corrupt, started anew");
            }
            let touches = run.map_or(learned.len(), |r| r.touches.len());
            tracing::info!(path = %path.display(), runs = merged.runs, touches, "{what}");
        }
        Err(e) => tracing::error!("working set not updated: {e}"),
    }
}
