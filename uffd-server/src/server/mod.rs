//! The server: one listening socket per snapshot (Firecracker knows only a socket path), one
//! thread per attached VM, and a control socket that reports every VM's counters.
//!
//! [`attach`] turns a connection into a VM, [`adopt`] takes back the VMs a predecessor left
//! (crash or handover), [`serve_vm`] serves either until it ends, [`lifecycle`] binds, readies
//! and stops the server as a whole.
//!
//! A connection's failure — a bad handshake, a refused peer, a VMM that dies — is logged with
//! that VM's id and peer pid and ends that connection only; nothing here can stop the others.

mod adopt;
mod attach;
mod lifecycle;
mod serve_vm;

pub use attach::AttachError;

use crate::config::{ServerConfig, ServerError, StoreOrigin};
use crate::control::CONTROL_SOCKET;
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::plan_cache::PlanCache;
use crate::recovery::handover::Collector;
use crate::recovery::journal::JournalDir;
use crate::recovery::StopSignal;
use crate::registry::Registry;
use crate::sockets;
use crate::source::chunk_pool::{ChunkOrigin, ChunkPool};
use crate::source::store::SnapshotStore;
use attach::serve_connection;
use snapstore::store::Store;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A server with its configuration checked, its socket directory locked and its store
/// opened, ready to run.
pub struct Server {
    config: ServerConfig,
    store: Arc<SnapshotStore>,
    registry: Arc<Registry>,
    /// The socket directory's lock (none yet when taking over: the predecessor passes its own).
    lock: Option<OwnedFd>,
    journal: Option<JournalDir>,
}

/// What every part of a running server shares to stop together.
#[derive(Debug)]
struct Lifecycle {
    /// Raised to stop accepting and stop every VM at a safe point.
    stop: Arc<StopSignal>,
    /// VMs stopped for a successor.
    handover: Collector<serve_vm::Carried>,
    /// Claimed by whichever ends the process first, a handover or a stop signal: the other
    /// then leaves it alone (a SIGTERM must not remove the sockets a successor now owns).
    ending: std::sync::atomic::AtomicBool,
    /// Accept loops and VM threads still running.
    accept_loops: AtomicUsize,
    vm_threads: AtomicUsize,
}

impl Server {
    /// Validates the configuration, checks and locks the socket directory (a second server on
    /// it refuses to start) and opens the snapshot store. Sockets are bound by [`Server::run`],
    /// once the snapshots are loaded.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        sockets::prepare_dir(&config.socket_dir, config.access())?;
        let lock = if config.takeover { None } else { Some(sockets::lock_dir(&config.socket_dir)?) };
        let journal = match &config.journal_dir {
            Some(dir) => Some(JournalDir::open(dir).map_err(|e| ServerError::Journal(e.to_string()))?),
            None => None,
        };
        let mut store =
            SnapshotStore::new(config.snapshots.clone(), config.cache_bytes, config.storage, config.load_wait);
        if let Some(chunks) = &config.chunk_store {
            let (origin, fetch_threads) = open_origin(&chunks.origin)?;
            let pool = Arc::new(ChunkPool::new(origin, chunks.ram_codec, chunks.inflate_bytes, fetch_threads));
            store = store
                .with_stored(pool, &chunks.names, chunks.load_remote_at_start)
                .map_err(|e| ServerError::Snapshot(Box::new(e)))?;
        }
        Ok(Server { config, store: Arc::new(store), registry: Arc::default(), lock, journal })
    }

    /// Loads the snapshots that fit in the budget (in parallel), takes back the VMs a
    /// predecessor left (journals after a crash, or a handover), binds the sockets, tells
    /// systemd it is ready, and serves until it is stopped: SIGTERM/SIGINT (journals kept for
    /// a restart) or a handover to a successor.
    pub fn run(mut self) -> Result<(), ServerError> {
        let io_error = |e: io::Error| ServerError::Io(e.to_string());
        // Every thread inherits the mask; the signal thread alone takes them.
        let signals = lifecycle::block_stop_signals().map_err(|e| ServerError::Io(e.to_string()))?;
        let lifecycle = Arc::new(Lifecycle {
            stop: Arc::new(StopSignal::new().map_err(io_error)?),
            handover: Collector::default(),
            ending: std::sync::atomic::AtomicBool::new(false),
            accept_loops: AtomicUsize::new(0),
            vm_threads: AtomicUsize::new(0),
        });
        let services: Vec<Arc<SnapshotService>> = self
            .config
            .names()
            .into_iter()
            .map(|name| {
                Arc::new(SnapshotService {
                    plans: PlanCache::new(&self.config),
                    name: name.to_string(),
                    config: self.config.clone(),
                    store: Arc::clone(&self.store),
                    registry: Arc::clone(&self.registry),
                    refusals_logged: Mutex::default(),
                    journal: self.journal.clone(),
                    lifecycle: Arc::clone(&lifecycle),
                })
            })
            .collect();
        let started = Instant::now();
        let preloads = preload(&self.store, &services).map_err(io_error)?;
        if let (Some(journal), false) = (&self.journal, self.config.takeover) {
            adopt::recover_journaled(journal, &services);
        }
        for thread in preloads {
            let _ = thread.join();
        }
        let sockets = if self.config.takeover {
            adopt::take_over(&self.config, &services)?
        } else {
            lifecycle::Sockets::bind(&self.config, self.lock.take())?
        };
        tracing::info!(ready_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), "serving");
        self.serve(sockets, &services, &lifecycle, &signals)
    }

    fn serve(
        self,
        sockets: lifecycle::Sockets,
        services: &[Arc<SnapshotService>],
        lifecycle: &Arc<Lifecycle>,
        signals: &nix::sys::signal::SigSet,
    ) -> Result<(), ServerError> {
        let io_error = |e: io::Error| ServerError::Io(e.to_string());
        let lifecycle::Sockets { lock, control, snapshots, metrics } = sockets;
        let handover_fds =
            lifecycle::HandoverFds::of(&lock, &control, &snapshots, metrics.as_ref()).map_err(io_error)?;
        let socket_files: Vec<PathBuf> = snapshots.iter().map(|(name, _)| self.config.socket_path(name)).collect();
        start_accepting(services, snapshots).map_err(io_error)?;
        if let Some(listener) = metrics {
            let server = tiny_http::Server::from_listener(listener, None)
                .map_err(|e| ServerError::Metrics("(listener)".into(), e.to_string()))?;
            tracing::info!(listen = %server.server_addr(), "serving Prometheus metrics on GET /metrics");
            let metrics = Arc::new(Metrics::new(Arc::clone(&self.registry), Arc::clone(&self.store)));
            let serve = move || crate::metrics::serve(&server, &metrics);
            std::thread::Builder::new().name("metrics".into()).spawn(serve).map_err(io_error)?;
        }
        let handover = {
            let (lifecycle, services, config) = (Arc::clone(lifecycle), services.to_vec(), self.config.clone());
            let store = Arc::clone(&self.store);
            move |stream: &std::os::unix::net::UnixStream| {
                // A failed handover: every VM served again, every socket accepted again.
                let resume = |vms| {
                    adopt::take_back(&services, &config, vms);
                    match handover_fds.listeners() {
                        Ok(listeners) => {
                            if let Err(e) = start_accepting(&services, listeners) {
                                tracing::error!("cannot accept again after a failed handover: {e}");
                            }
                        }
                        Err(e) => tracing::error!("cannot accept again after a failed handover: {e}"),
                    }
                };
                // The successor finds the files written now when it needs them (DiskCache).
                let flush = || store.flush_disk_cache(lifecycle::FLUSH_WAIT);
                lifecycle::hand_over(stream, &lifecycle, &handover_fds, &resume, &flush);
            }
        };
        let (store, registry) = (Arc::clone(&self.store), Arc::clone(&self.registry));
        let control = move || crate::control::serve(&control, &store, &registry, &handover);
        std::thread::Builder::new().name("control".into()).spawn(control).map_err(io_error)?;
        lifecycle::notify_systemd_ready();
        // Until SIGTERM/SIGINT; a handover ends the process from the control thread.
        let signal = lifecycle::wait_for_stop_signal(signals);
        if lifecycle.ending.swap(true, Ordering::SeqCst) {
            // The sockets are the successor's now; the handover ends the process.
            tracing::info!("{signal} during a handover: the handover ends this process");
            loop {
                std::thread::park();
            }
        }
        tracing::info!("{signal}: stopping; VMs keep their journals for the next start");
        lifecycle.stop_all();
        for path in &socket_files {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(self.config.socket_dir.join(CONTROL_SOCKET));
        // Under the lock: a server started next indexes the disk cache once this one is done.
        self.store.flush_disk_cache(lifecycle::FLUSH_WAIT);
        drop(lock);
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
    /// Where its VMs are journaled, if anywhere.
    journal: Option<JournalDir>,
    /// The server's stop signal, and where stopped VMs go for a successor.
    lifecycle: Arc<Lifecycle>,
}

/// Starts loading every snapshot that fits in the budget, each on a thread of its own, and
/// returns the threads to wait for before serving: those of an object store's snapshots are
/// not waited for (the bucket may be slow or down; the disk cache may hold their manifests).
/// VMs of a snapshot still loading wait for it (at most the load wait); the others do not.
fn preload(store: &Arc<SnapshotStore>, services: &[Arc<SnapshotService>]) -> io::Result<Vec<JoinHandle<()>>> {
    let (names, remote) = (store.preload_names(), store.remote_preload_names());
    store.begin_preload(&names);
    store.begin_preload(&remote);
    let mut threads = Vec::new();
    for (name, background) in names.into_iter().map(|n| (n, false)).chain(remote.into_iter().map(|n| (n, true))) {
        let Some(service) = services.iter().find(|s| s.name == name).map(Arc::clone) else { continue };
        let load = move || {
            if let Err(e) = service.store.finish_preload(&name, &|snapshot| service.prepare(snapshot)) {
                tracing::error!("{e}; VMs of this snapshot will be refused until it loads");
            }
            release_freed_memory();
        };
        let thread = std::thread::Builder::new().name("preload".into()).spawn(load)?;
        if !background {
            threads.push(thread);
        }
    }
    Ok(threads)
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

/// Starts an accept loop for each of `listeners` (snapshot name, socket).
fn start_accepting(services: &[Arc<SnapshotService>], listeners: Vec<(String, UnixListener)>) -> io::Result<()> {
    for (name, listener) in listeners {
        let Some(service) = services.iter().find(|s| s.name == name).map(Arc::clone) else { continue };
        service.lifecycle.accept_loops.fetch_add(1, Ordering::SeqCst);
        let accept = move || accept_loop(&listener, &service);
        if let Err(e) = std::thread::Builder::new().name(format!("accept-{name}")).spawn(accept) {
            // The count went up for a loop that never ran.
            if let Some(service) = services.first() {
                service.lifecycle.accept_loops.fetch_sub(1, Ordering::SeqCst);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Accepts the snapshot's VMMs, each on a thread of its own, until the server stops.
fn accept_loop(listener: &UnixListener, service: &Arc<SnapshotService>) {
    let lifecycle = &service.lifecycle;
    loop {
        // Stopping leaves every connection not accepted yet in the backlog, for a successor.
        match lifecycle::wait_readable(listener, &lifecycle.stop) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::error!(snapshot = service.name, "poll of the listener failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends are transient: back off instead of spinning.
                tracing::error!(snapshot = service.name, "accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = service.registry.next_id();
        spawn_vm_thread(service, id, move |service| serve_connection(id, stream, service));
    }
    lifecycle.accept_loops.fetch_sub(1, Ordering::SeqCst);
}

/// Runs `serve` for VM `id` on a thread of its own, counted until it ends.
fn spawn_vm_thread(service: &Arc<SnapshotService>, id: u64, serve: impl FnOnce(&SnapshotService) + Send + 'static) {
    let lifecycle = Arc::clone(&service.lifecycle);
    lifecycle.vm_threads.fetch_add(1, Ordering::SeqCst);
    let service = Arc::clone(service);
    let spawned = std::thread::Builder::new().name(format!("vm-{id}")).spawn(move || {
        let span = tracing::info_span!("vm", id, snapshot = service.name.as_str());
        let _enter = span.enter();
        serve(&service);
        service.lifecycle.vm_threads.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        lifecycle.vm_threads.fetch_sub(1, Ordering::SeqCst);
        tracing::error!(id, "cannot start a thread for the VM: {e}");
    }
}
