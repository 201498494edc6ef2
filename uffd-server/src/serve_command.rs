//! `uffd-server serve` and `record`: the arguments that say what to serve and how, turned into
//! a [`ServerConfig`], and the server run with it.

use crate::{parse_bytes, remote_commands, store_commands};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uffd_server::config::{Mode, ServerConfig, StoreOrigin};
use uffd_server::server::Server;
use uffd_server::source::snapshot::Storage;
use uffd_server::vm::demand::{Demand, DEFAULT_FAULT_AROUND_PAGES};

#[derive(Clone, Copy, ValueEnum)]
pub enum StorageArg {
    /// Read into RAM once (zero pages indexed and given back).
    Memory,
    /// Read from the file on each fault.
    Disk,
}

impl From<StorageArg> for Storage {
    fn from(arg: StorageArg) -> Self {
        match arg {
            StorageArg::Memory => Storage::Memory,
            StorageArg::Disk => Storage::Disk,
        }
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Directory for the sockets (created if missing): NAME.sock per snapshot, control.sock,
    /// and the lock a second server on it is refused by.
    #[arg(long)]
    socket_dir: PathBuf,
    /// The socket of the (single) snapshot at exactly this path, instead of SOCKET_DIR/NAME.sock:
    /// what a Firecracker configuration names.
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// Where each VM is journaled so that a restarted server takes it back (tmpfs: it must
    /// outlive the process, not the machine). Default: SOCKET_DIR/journal.
    #[arg(long)]
    journal_dir: Option<PathBuf>,
    /// Journal nothing: VMs are lost if this server stops, crashes or hands over.
    #[arg(long, conflicts_with = "journal_dir")]
    no_journal: bool,
    /// Take every socket and live VM over from the server running on --socket-dir (an upgrade
    /// without a frozen guest); it exits once this one serves them.
    #[arg(long)]
    takeover: bool,
    /// A snapshot memory file (Firecracker layout), as NAME=PATH; NAME=s3://BUCKET/PREFIX/NAME,
    /// a snapshot in an object store; or NAME, a snapshot of --store or --remote. Repeatable.
    #[arg(long = "snapshot", value_name = "NAME=PATH|NAME=s3://…|NAME")]
    snapshots: Vec<String>,
    /// A chunk store (`uffd-server import`): serves its snapshots named by --snapshot NAME, or
    /// all of them if none is named.
    #[arg(long)]
    store: Option<PathBuf>,
    #[command(flatten)]
    remote: remote_commands::RemoteServeArgs,
    /// How stored chunks are held in RAM: lz4 (where it saves ≥ 1/8) or none.
    #[arg(long, value_enum, default_value = "lz4")]
    store_ram_codec: store_commands::CodecArg,
    /// RAM for decompressed copies of the LZ4 chunks VMs have used (the hot ones: later faults
    /// and prefetches read them in place), within --cache-bytes.
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    store_inflate_bytes: u64,
    /// A directory of snapshots: each NAME.mem file, and each NAME/ directory holding `mem`.
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// RAM budget for snapshots held in memory (e.g. 8G, 512M); idle ones are evicted beyond it.
    #[arg(long, default_value = "16G", value_parser = parse_bytes)]
    cache_bytes: u64,
    /// Hold snapshots in RAM (memory) or read them from their files on each fault (disk).
    #[arg(long, value_enum, default_value = "memory")]
    snapshot_storage: StorageArg,
    /// Serve the aligned cluster of this many 4 KiB pages around each fault (power of two, 1..=512).
    #[arg(long, default_value_t = DEFAULT_FAULT_AROUND_PAGES)]
    fault_around: u64,
    /// Only let peers with this uid attach (SO_PEERCRED). Repeatable; default: anyone who can
    /// open the 0600 sockets.
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// How long a connecting VMM may take to send its handshake.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// How long a VM waits for its snapshot to load (a slow or hung disk) before it is refused.
    #[arg(long, default_value_t = 60_000)]
    load_wait_ms: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn chunk_store(
    args: &ServeArgs,
    mut names: Vec<String>,
    remote_specs: &[(String, String)],
    working_set: &mut Option<PathBuf>,
    mode: &Mode,
) -> Result<Option<uffd_server::config::ChunkStoreConfig>> {
    let remote = remote_commands::remote_store(&args.remote, remote_specs)?;
    let named = !names.is_empty() || !remote_specs.is_empty();
    let origin = match (&args.store, remote) {
        (Some(_), Some(_)) => bail!("serve from --store or from an object store, not both"),
        (None, None) => return Ok(None),
        (Some(root), None) => {
            if names.is_empty() {
                let store = snapstore::store::Store::open(root)?;
                names = store.names().with_context(|| format!("cannot list store {}", root.display()))?;
            }
            StoreOrigin::Local(root.clone())
        }
        (None, Some((remote, named))) => {
            names.extend(named);
            if names.is_empty() {
                names = remote_commands::remote_names(&remote)?;
            }
            let needs_set = matches!(mode, Mode::Serve { policy, .. } if policy.needs_working_set());
            if needs_set && working_set.is_none() && names.len() == 1 {
                *working_set = remote_commands::fetch_working_set(&remote, &names[0])?;
            }
            StoreOrigin::Remote(remote)
        }
    };
    Ok(Some(uffd_server::config::ChunkStoreConfig {
        origin,
        names,
        load_remote_at_start: named,
        ram_codec: args.store_ram_codec.into(),
        inflate_bytes: args.store_inflate_bytes,
    }))
}

pub fn serve(
    args: ServeArgs,
    (working_set, loading_set): (Option<PathBuf>, Option<PathBuf>),
    mode: Mode,
) -> Result<()> {
    if !args.fault_around.is_power_of_two() || args.fault_around > 512 {
        bail!("--fault-around must be a power of two between 1 and 512, got {}", args.fault_around);
    }
    let mut snapshots = Vec::new();
    let (mut stored, mut remote_specs) = (Vec::new(), Vec::new());
    for spec in &args.snapshots {
        match spec.split_once('=') {
            Some((name, url)) if url.starts_with("s3://") => remote_specs.push((name.to_string(), url.to_string())),
            Some((name, path)) => snapshots.push((name.to_string(), PathBuf::from(path))),
            None if args.store.is_some() || args.remote.remote.is_some() => stored.push(spec.clone()),
            None => bail!("--snapshot `{spec}`: expected NAME=PATH (or NAME with --store or --remote)"),
        }
    }
    let mut working_set = working_set;
    let chunk_store = chunk_store(&args, stored, &remote_specs, &mut working_set, &mode)?;
    if let Some(dir) = &args.snapshot_dir {
        snapshots.extend(scan_snapshot_dir(dir)?);
    }
    let journal_dir = match (args.no_journal, &args.journal_dir) {
        (true, _) => None,
        (false, Some(dir)) => Some(dir.clone()),
        (false, None) => Some(args.socket_dir.join("journal")),
    };
    let config = ServerConfig {
        journal_dir,
        takeover: args.takeover,
        socket_path: args.socket_path,
        socket_dir: args.socket_dir,
        snapshots,
        chunk_store,
        cache_bytes: args.cache_bytes,
        storage: args.snapshot_storage.into(),
        // Recording serves single pages: with fault-around, touches of a fault's neighbours
        // would never fault and the working set would miss them.
        demand: Demand { fault_around_pages: if matches!(mode, Mode::Record { .. }) { 1 } else { args.fault_around } },
        allow_uids: args.allow_uids,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        load_wait: Duration::from_millis(args.load_wait_ms),
        metrics_listen: args.metrics_listen,
        working_set,
        loading_set,
        mode,
    };
    let server = Server::bind(config.clone()).context("cannot start the server")?;
    for (name, path) in &config.snapshots {
        tracing::info!(
            snapshot = name,
            memory_file = %path.display(),
            socket = %config.socket_path(name).display(),
            "serving"
        );
    }
    server.run().context("server stopped")
}

fn scan_snapshot_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read --snapshot-dir {}", dir.display()))? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
            continue;
        };
        let valid = !stem.is_empty() && stem.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid {
            tracing::warn!(path = %path.display(), "--snapshot-dir: skipped, its name is not a valid snapshot name");
            continue;
        }
        if path.is_dir() && path.join("mem").is_file() {
            found.push((stem, path.join("mem")));
        } else if path.is_file() && path.extension().is_some_and(|e| e == "mem") {
            found.push((stem, path));
        }
    }
    found.sort();
    Ok(found)
}
