//! The server: one listening socket per snapshot (Firecracker knows only a socket path), one
//! thread per attached VM, and a control socket that reports every VM's counters.
//!
//! A connection's failure — a bad handshake, a refused peer, a VMM that dies — is logged with
//! that VM's id and peer pid and ends that connection only; nothing here can stop the others.

use crate::config::StoreOrigin;
use crate::config::{Mode, ServerConfig, ServerError};
use crate::control::CONTROL_SOCKET;
use crate::log_limit::LogLimit;
use crate::memory::placer::Placer;
use crate::memory::regions::{RegionError, RegionMap};
use crate::memory::uffd_io::Userfaultfd;
use crate::metrics::Metrics;
use crate::plan_cache::PlanCache;
use crate::registry::{Registry, VmRecord};
use crate::sockets::{self, Access};
use crate::source::chunk_pool::{ChunkOrigin, ChunkPool};
use crate::source::snapshot::SnapshotError;
use crate::source::store::SnapshotStore;
use crate::stats::count;
use crate::vm::handshake::{self, HandshakeError};
use crate::vm::learner::Learner;
use crate::vm::prefetcher::Prefetcher;
use crate::vm::{self, Guest};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use prefetch::plan::Plan;
use prefetch::policy::PrefetchPolicy;
use snapstore::store::Store;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a connection was refused before its fault loop started.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
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
    #[error("handshake refused: this userfaultfd already serves VM {0}")]
    UffdInUse(u64),
}

impl AttachError {
    /// A short name of the reason, for the refusals metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AttachError::PeerCredentials(_) => "peer_credentials",
            AttachError::UidNotAllowed(_) => "uid_not_allowed",
            AttachError::Handshake(HandshakeError::Timeout) => "handshake_timeout",
            AttachError::Handshake(_) => "handshake",
            AttachError::Regions(_) => "regions",
            AttachError::Snapshot(_) => "snapshot",
            AttachError::Uffd(_) => "uffd",
            AttachError::UffdInUse(_) => "uffd_in_use",
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
    metrics: Option<tiny_http::Server>,
}

impl Server {
    /// Validates the configuration, checks the socket directory and binds every socket (see
    /// [`sockets`]; a stale socket file from an earlier run is replaced).
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let access = if config.allow_uids.is_empty() { Access::Owner } else { Access::CheckedPeers };
        sockets::prepare_dir(&config.socket_dir, access)?;
        let listeners = config
            .names()
            .into_iter()
            .map(|name| Ok((name.to_string(), sockets::bind(&config.socket_path(name), access)?)))
            .collect::<Result<Vec<_>, ServerError>>()?;
        let control = sockets::bind(&config.socket_dir.join(CONTROL_SOCKET), Access::Owner)?;
        let metrics = match &config.metrics_listen {
            Some(addr) => {
                let server =
                    tiny_http::Server::http(addr).map_err(|e| ServerError::Metrics(addr.clone(), e.to_string()))?;
                tracing::info!(listen = %server.server_addr(), "serving Prometheus metrics on GET /metrics");
                Some(server)
            }
            None => None,
        };
        let mut store =
            SnapshotStore::new(config.snapshots.clone(), config.cache_bytes, config.storage, config.load_wait);
        if let Some(chunks) = &config.chunk_store {
            let (origin, fetch_threads) = open_origin(&chunks.origin)?;
            let pool = Arc::new(ChunkPool::new(origin, chunks.ram_codec, chunks.inflate_bytes, fetch_threads));
            store = store.with_stored(pool, &chunks.names).map_err(|e| ServerError::Snapshot(Box::new(e)))?;
        }
        let store = Arc::new(store);
        Ok(Server { config, store, registry: Arc::default(), listeners, control, metrics })
    }

    /// Loads what fits in the budget, each snapshot on a thread of its own, and serves until the
    /// process is killed. VMs arriving during a snapshot's load wait for it (at most the load
    /// wait); the other snapshots and `stats` do not.
    pub fn run(self) -> io::Result<()> {
        let services: Vec<Arc<SnapshotService>> = self
            .listeners
            .iter()
            .map(|(name, _)| {
                Arc::new(SnapshotService {
                    plans: PlanCache::new(&self.config),
                    name: name.clone(),
                    config: self.config.clone(),
                    store: Arc::clone(&self.store),
                    registry: Arc::clone(&self.registry),
                    refusals_logged: Mutex::default(),
                })
            })
            .collect();
        let preload = self.store.preload_names();
        self.store.begin_preload(&preload);
        let mut threads = Vec::new();
        for name in preload {
            let Some(service) = services.iter().find(|s| s.name == name).map(Arc::clone) else { continue };
            let load = move || {
                if let Err(e) = service.store.finish_preload(&name, &|snapshot| service.prepare(snapshot)) {
                    tracing::error!("{e}; VMs of this snapshot will be refused until it loads");
                }
                release_freed_memory();
            };
            std::thread::Builder::new().name("preload".into()).spawn(load)?;
        }
        for ((name, listener), service) in self.listeners.into_iter().zip(services) {
            let accept = move || accept_loop(&listener, &service);
            threads.push(std::thread::Builder::new().name(format!("accept-{name}")).spawn(accept)?);
        }
        if let Some(server) = self.metrics {
            let metrics = Arc::new(Metrics::new(Arc::clone(&self.registry), Arc::clone(&self.store)));
            let serve = move || crate::metrics::serve(&server, &metrics);
            threads.push(std::thread::Builder::new().name("metrics".into()).spawn(serve)?);
        }
        let (store, registry, control) = (self.store, self.registry, self.control);
        let control = move || crate::control::serve(&control, &store, &registry);
        threads.push(std::thread::Builder::new().name("control".into()).spawn(control)?);
        for thread in threads {
            let _ = thread.join();
        }
        Ok(())
    }
}

/// Opens where stored chunks come from; the number of prefetch fetch threads.
fn open_origin(origin: &StoreOrigin) -> Result<(ChunkOrigin, usize), ServerError> {
    let store_error = |e| ServerError::ChunkStore(Box::new(e));
    match origin {
        StoreOrigin::Local(root) => Ok((ChunkOrigin::Local(Store::open(root).map_err(store_error)?), 1)),
        StoreOrigin::Remote(remote) => {
            Ok((ChunkOrigin::Remote(Box::new(remote.open()?.write_behind())), remote.fetch_threads))
        }
    }
}

/// Everything a snapshot's VMs share.
struct SnapshotService {
    name: String,
    config: ServerConfig,
    store: Arc<SnapshotStore>,
    registry: Arc<Registry>,
    plans: PlanCache,
    /// Bounds the log lines refused connections can trigger.
    refusals_logged: Mutex<LogLimit>,
}

/// Gives the memory a load freed (read buffers, decompressed chunks) back to the kernel: the
/// allocator keeps it in this thread's arena otherwise, and a server that loaded many stored
/// snapshots would hold ~10% more than its snapshots (measured: docs/results, experiment 6b).
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it takes no pointer and
    // touches no live allocation.
    unsafe { libc::malloc_trim(0) };
}

impl SnapshotService {
    /// Whenever the snapshot (re)loads, before a VM uses it: the working set planned, and the
    /// plan's ranges readied in the snapshot's source (a compressed store decompresses them now,
    /// not on the VMs' time).
    fn prepare(&self, snapshot: &crate::source::snapshot::Snapshot) {
        let planned = self.plans.get(snapshot);
        for batch in &planned.plan.batches {
            let offset = crate::addr::FileOffset(batch.first_page * crate::addr::BASE_PAGE);
            snapshot.pages().warm(offset, batch.pages * crate::addr::BASE_PAGE);
        }
    }
}

fn accept_loop(listener: &UnixListener, service: &Arc<SnapshotService>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends are transient: back off instead of spinning.
                tracing::error!(snapshot = service.name, "accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = service.registry.next_id();
        let service = Arc::clone(service);
        let spawned = std::thread::Builder::new().name(format!("vm-{id}")).spawn(move || {
            let span = tracing::info_span!("vm", id, snapshot = service.name.as_str());
            let _enter = span.enter();
            serve_connection(id, &stream, &service);
        });
        if let Err(e) = spawned {
            tracing::error!(id, "cannot start a thread for the VM: {e}");
        }
    }
}

fn serve_connection(id: u64, stream: &UnixStream, service: &SnapshotService) {
    let creds = match getsockopt(stream, PeerCredentials) {
        Ok(creds) => creds,
        Err(e) => {
            tracing::error!("VM refused: {}", AttachError::PeerCredentials(e));
            return;
        }
    };
    if let Err(e) = attach(id, creds.pid(), creds.uid(), stream, service) {
        service.registry.count_refusal(&service.name, e.reason());
        // Poisoned only by a panic while logging: the limiter holds nothing that matters.
        if service.refusals_logged.lock().unwrap_or_else(|p| p.into_inner()).allow() {
            tracing::error!(peer_pid = creds.pid(), "VM refused: {e}");
        }
    }
}

/// Attaches a VM and serves it until it ends.
fn attach(
    id: u64,
    peer_pid: i32,
    peer_uid: u32,
    stream: &UnixStream,
    service: &SnapshotService,
) -> Result<(), AttachError> {
    let config = &service.config;
    if !config.allow_uids.is_empty() && !config.allow_uids.contains(&peer_uid) {
        return Err(AttachError::UidNotAllowed(peer_uid));
    }
    // Bounds the wait for the handshake only; the fault loop polls without timeout.
    let _ = stream.set_read_timeout(Some(config.handshake_timeout));
    let handshake = handshake::receive(stream)?;
    let snapshot = service.store.get_prepared(&service.name, &|snapshot| service.prepare(snapshot))?;
    let regions = RegionMap::new(handshake.regions, snapshot.len())?;
    regions.check_page_sizes(peer_pid)?;
    let uffd = Userfaultfd::from_owned(handshake.uffd).map_err(AttachError::Uffd)?;
    let record = Arc::new(VmRecord::new(id, &service.name, peer_pid, handshake.uffd_identity));
    service.registry.add(Arc::clone(&record)).map_err(AttachError::UffdInUse)?;
    tracing::info!(peer_pid, regions = regions.regions().len(), guest_bytes = regions.total_bytes(), "VM attached");

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
        Mode::Record { window } => Some(window),
        Mode::Serve { .. } => None,
    };
    let guest = Guest {
        placer: Placer::new(&uffd),
        regions: &regions,
        snapshot: snapshot.pages(),
        stats,
        log_limit: LogLimit::default(),
    };
    let prefetcher = Prefetcher::new(plan, planned.loading_set.as_ref(), record.started());
    let learner = Learner::new(window, planned.working_set.as_ref(), &record.end_recording);
    let (end, learned) = vm::serve(guest, stream, config.demand, prefetcher, learner);

    // Let go of the VM before the slow part (the working-set file): a VMM that maps memory again
    // in the same process waits for this hang-up (docs/protocol.md).
    drop(uffd);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    log_end(service, &record, &end);
    if let Some(path) = &config.working_set {
        learned.save(path, &snapshot.identity());
    }
    if let Some(remote) = service.store.remote_of(&service.name).filter(|_| config.shares_learning()) {
        publish_learned(remote, &service.name, &learned, &snapshot.identity());
    }
    Ok(())
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
fn log_end(service: &SnapshotService, record: &Arc<VmRecord>, end: &vm::VmEnd) {
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
