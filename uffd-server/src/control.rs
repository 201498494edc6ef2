//! The control socket (`SOCKET_DIR/control.sock`): one command per connection, one JSON reply.
//!
//! ```text
//! stats\n                → StatsResponse: loaded snapshots, every live VM and the recent ended ones
//! end-recording <vm-id>\n → {"ok": true} | {"error": "..."}: that VM's record window ends now
//! handover\n              → a successor takes every socket and VM (`crate::recovery::handover`)
//! ```

use crate::registry::{Registry, VmReport};
use crate::source::chunk_pool::ChunkOrigin;
use crate::source::store::SnapshotStore;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Name of the control socket in the socket directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The reply to `stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Snapshots held in memory.
    pub snapshots_loaded: Vec<String>,
    /// Snapshots being loaded now (the server is ready once none is).
    #[serde(default)]
    pub snapshots_loading: Vec<String>,
    /// RAM they hold (a chunk that several stored snapshots share counted once).
    pub snapshot_resident_bytes: u64,
    /// RAM each snapshot holds (a shared chunk counted in each that holds it).
    #[serde(default)]
    pub resident_by_snapshot: Vec<(String, u64)>,
    /// Every live VM and the recently ended ones.
    pub vms: Vec<VmReport>,
    /// What was fetched from an object store, if snapshots are served from one.
    #[serde(default)]
    pub remote: Option<RemoteReport>,
}

/// Object-store traffic since the server started.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RemoteReport {
    /// Chunks fetched from the object store.
    pub chunk_gets: u64,
    /// Bytes of chunk objects received.
    pub chunk_bytes: u64,
    /// Chunk GETs that failed or returned a bad chunk (each retry).
    pub failed_gets: u64,
    /// Chunks read intact from the disk cache's files.
    pub disk_hits: u64,
    /// Chunks read back from those the disk cache held for its writer (in RAM).
    #[serde(default)]
    pub held_back_hits: u64,
}

impl RemoteReport {
    /// The counters of `store`'s object store, if it reads one.
    pub fn of(store: &SnapshotStore) -> Option<RemoteReport> {
        let pool = store.chunk_pool()?;
        let ChunkOrigin::Remote(remote) = pool.origin() else { return None };
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
        let counters = &remote.counters;
        Some(RemoteReport {
            chunk_gets: load(&counters.chunk_gets),
            chunk_bytes: load(&counters.chunk_bytes),
            failed_gets: load(&counters.failed_gets),
            disk_hits: load(&counters.disk_hits),
            held_back_hits: load(&counters.held_back_hits),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum CommandReply {
    Ok { ok: bool },
    Error { error: String },
}

/// Answers control connections until the listener fails; `handover` serves a successor's
/// `handover` request (and ends the process when it succeeds).
pub fn serve(
    listener: &UnixListener,
    store: &SnapshotStore,
    registry: &Registry,
    handover: &(dyn Fn(&UnixStream) + Sync),
) {
    std::thread::scope(|scope| {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("control connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // One thread per request: a client that never reads its reply holds up no one.
            let spawned = std::thread::Builder::new().name("control-request".into()).spawn_scoped(scope, move || {
                if let Err(e) = answer(&stream, store, registry, handover) {
                    tracing::warn!("control request failed: {e}");
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread for a control request: {e}");
            }
        }
    });
}

fn answer(
    stream: &UnixStream,
    store: &SnapshotStore,
    registry: &Registry,
    handover: &(dyn Fn(&UnixStream) + Sync),
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let uid = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?.uid();
    if !crate::sockets::may_control(uid) {
        let error = format!("uid {uid} may not use the control socket");
        serde_json::to_writer(stream, &CommandReply::Error { error })?;
        return Ok(());
    }
    let mut line = String::new();
    BufReader::new(stream.take(256)).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let mut out = stream;
    match (words.next(), words.next()) {
        (Some("stats"), None) => {
            let response = StatsResponse {
                snapshots_loaded: store.loaded(),
                snapshots_loading: store.loading(),
                snapshot_resident_bytes: store.resident_bytes(),
                resident_by_snapshot: store.resident_by_snapshot(),
                vms: registry.reports(),
                remote: RemoteReport::of(store),
            };
            serde_json::to_writer(&mut out, &response)?;
        }
        (Some("handover"), None) => handover(stream),
        (Some("end-recording"), Some(id)) => {
            let id_number = id.parse().ok();
            let reply = match id_number.and_then(|id| registry.find(id)) {
                Some(vm) => {
                    vm.end_recording.store(true, Ordering::Relaxed);
                    tracing::info!(vm = vm.id, "record window ended on request");
                    CommandReply::Ok { ok: true }
                }
                None if id_number.is_some_and(|id| registry.has_ended(id)) => {
                    CommandReply::Error { error: format!("VM {id} has ended already") }
                }
                None => CommandReply::Error { error: format!("no VM with id `{id}`") },
            };
            serde_json::to_writer(&mut out, &reply)?;
        }
        _ => {
            let error =
                format!("unknown command `{}`: expected `stats`, `end-recording <vm-id>` or `handover`", line.trim());
            serde_json::to_writer(&mut out, &CommandReply::Error { error })?;
        }
    }
    out.flush()
}

fn request(socket_dir: &Path, command: &str) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket_dir.join(CONTROL_SOCKET))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    Ok(stream)
}

/// The stats of a running server.
pub fn query_stats(socket_dir: &Path) -> io::Result<StatsResponse> {
    serde_json::from_reader(request(socket_dir, "stats")?).map_err(io::Error::other)
}

/// Ends the record window of VM `vm` of a server running `record`.
pub fn end_recording(socket_dir: &Path, vm: u64) -> io::Result<()> {
    match serde_json::from_reader(request(socket_dir, &format!("end-recording {vm}"))?).map_err(io::Error::other)? {
        CommandReply::Ok { .. } => Ok(()),
        CommandReply::Error { error } => Err(io::Error::other(error)),
    }
}
