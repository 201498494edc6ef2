//! `uffd-server`: serve guest memory of microVMs from in-memory snapshots over Firecracker's
//! UFFD socket protocol.

mod remote_commands;
mod serve_command;
mod store_commands;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use prefetch::loading_set::LoadingSet;
use prefetch::plan::PlanConfig;
use prefetch::policy::{plan_for, PrefetchPolicy};
use prefetch::record::RecordWindow;
use serve_command::{serve, ServeArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uffd_server::addr::FileOffset;
use uffd_server::config::Mode;
use uffd_server::control::{end_recording, query_stats};
use uffd_server::source::snapshot::{Snapshot, Storage};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve VMs restored from snapshots; one socket per snapshot: SOCKET_DIR/NAME.sock.
    Serve {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        prefetch: PrefetchArgs,
    },
    /// Serve on demand (no prefetch, one page per fault so that every touch is seen) and record
    /// each VM's first touches; when a VM ends, merge its run into the working-set file (union
    /// over runs, see docs/working-set-format.md).
    Record(RecordArgs),
    /// Write a loading-set file: the snapshot's working set planned as `serve --prefetch union`
    /// would, with each batch's bytes back to back, for one sequential read at restore.
    LoadingSet(LoadingSetArgs),
    /// End the record window of one VM of a running `record` server now (the VM goes on).
    EndRecording {
        /// The running server's --socket-dir.
        #[arg(long)]
        socket_dir: PathBuf,
        /// The VM's id (`uffd-server stats`).
        #[arg(long)]
        vm: u64,
    },
    /// Import a memory file into a chunk store: content-addressed, deduplicated, compressed
    /// chunks and a manifest (docs/snapshot-store-format.md).
    Import(store_commands::ImportArgs),
    /// Upload a stored snapshot to an object store (S3 API): missing chunks, then its working
    /// set, then its manifest (docs/object-store.md).
    Push(remote_commands::PushArgs),
    /// Fetch a snapshot's working set (or all of it) from an object store into a host's disk
    /// cache, ahead of its VMs.
    Pull(remote_commands::PullArgs),
    /// Fold the working-set runs hosts published for a snapshot in an object store into its
    /// working set (one compactor at a time; docs/object-store.md).
    Compact(remote_commands::CompactArgs),
    /// Inspect or maintain a chunk store.
    Store {
        #[command(subcommand)]
        command: store_commands::StoreCommand,
    },
    /// Print the counters of every VM of a running server (live and recently ended).
    Stats {
        /// The running server's --socket-dir.
        #[arg(long)]
        socket_dir: PathBuf,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `--prefetch`: what to bring in ahead of the guest.
#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Nothing: every page comes by demand fault (lazy).
    None,
    /// The whole snapshot, before the first fault is served (SnapFaaS).
    Eager,
    /// The first recorded run, synchronously before the first fault is served (REAP).
    Reap,
    /// The union over recorded runs, in the background in first-touch order (ours).
    Union,
}

impl From<PolicyArg> for PrefetchPolicy {
    fn from(arg: PolicyArg) -> Self {
        match arg {
            PolicyArg::None => PrefetchPolicy::None,
            PolicyArg::Eager => PrefetchPolicy::Eager,
            PolicyArg::Reap => PrefetchPolicy::Reap,
            PolicyArg::Union => PrefetchPolicy::Union,
        }
    }
}

/// `--snapshot-storage`: where a snapshot's bytes are served from.
#[derive(clap::Args)]
struct PrefetchArgs {
    /// The snapshot's working-set file (from `record`): prefetched from, and refined with the
    /// pages VMs fault on outside it. Needs exactly one --snapshot.
    #[arg(long)]
    working_set: Option<PathBuf>,
    /// A loading-set file (from `uffd-server loading-set`): `union` prefetches its batches
    /// from it, read in one go, instead of from the snapshot (for --snapshot-storage disk).
    #[arg(long)]
    loading_set: Option<PathBuf>,
    /// What to bring in ahead of the guest [default: union with --working-set, else none].
    #[arg(long, value_enum)]
    prefetch: Option<PolicyArg>,
    #[command(flatten)]
    plan: PlanArgs,
}

/// How a working set becomes a plan (shared by `serve` and `loading-set`).
#[derive(clap::Args)]
struct PlanArgs {
    /// Prefetch only pages seen in at least this fraction of recorded runs (0 = the union).
    #[arg(long, default_value_t = 0.0)]
    min_frequency: f64,
    /// Pages per prefetch ioctl. Small batches bound how long a demand fault can wait behind
    /// one (64 KiB places at ~90% of the bulk UFFDIO_COPY bandwidth here: docs/results.md).
    #[arg(long, default_value_t = 16)]
    prefetch_batch_pages: u64,
    /// Copy gaps of up to this many unneeded pages along, rather than splitting a batch.
    #[arg(long, default_value_t = 4)]
    bridge_gap_pages: u64,
}

impl PlanArgs {
    fn config(&self) -> Result<(f64, PlanConfig)> {
        if !(0.0..=1.0).contains(&self.min_frequency) {
            bail!("--min-frequency must be between 0 and 1, got {}", self.min_frequency);
        }
        let config = PlanConfig {
            bridge_gap_pages: self.bridge_gap_pages,
            max_batch_pages: self.prefetch_batch_pages.clamp(1, 512),
        };
        Ok((self.min_frequency, config))
    }
}

#[derive(clap::Args)]
struct LoadingSetArgs {
    /// The snapshot memory file.
    #[arg(long)]
    snapshot: PathBuf,
    /// Its working-set file.
    #[arg(long)]
    working_set: PathBuf,
    /// The loading-set file to write (atomically).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    plan: PlanArgs,
}

#[derive(clap::Args)]
struct RecordArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The working-set file to create or merge into (one snapshot per file).
    #[arg(long)]
    working_set: PathBuf,
    /// Stop recording a VM after this many first touches.
    #[arg(long)]
    record_max_faults: Option<usize>,
    /// Stop recording a VM this long after it attached.
    #[arg(long)]
    record_max_ms: Option<u64>,
}

fn main() -> Result<()> {
    // Test builds only (feature `failpoints`, which `./x test` turns on; a release build has no
    // lookups on its fault path): FAILPOINTS=name=action injects faults.
    let _failpoints = fail::FailScenario::setup();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if cfg!(feature = "failpoints") {
        if let Ok(failpoints) = std::env::var("FAILPOINTS") {
            tracing::warn!(failpoints, "failpoints configured (a test build)");
        }
    }
    match Cli::parse().command {
        Command::Serve { serve: args, prefetch } => {
            let (min_frequency, plan) = prefetch.plan.config()?;
            let planned = prefetch.working_set.is_some() || prefetch.loading_set.is_some();
            let default = if planned { PrefetchPolicy::Union } else { PrefetchPolicy::None };
            let policy = prefetch.prefetch.map_or(default, PrefetchPolicy::from);
            let mode = Mode::Serve { policy, min_frequency, plan };
            serve(args, (prefetch.working_set, prefetch.loading_set), mode)
        }
        Command::LoadingSet(args) => write_loading_set(&args),
        Command::Record(args) => {
            let window = RecordWindow {
                max_faults: args.record_max_faults,
                max_duration: args.record_max_ms.map(Duration::from_millis),
            };
            serve(args.serve, (Some(args.working_set), None), Mode::Record { window })
        }
        Command::Import(args) => store_commands::run_import(&args),
        Command::Push(args) => remote_commands::run_push(&args),
        Command::Pull(args) => remote_commands::run_pull(&args),
        Command::Compact(args) => remote_commands::run_compact(&args),
        Command::Store { command } => store_commands::run_store(&command),
        Command::Stats { socket_dir, json } => stats(&socket_dir, json),
        Command::EndRecording { socket_dir, vm } => {
            end_recording(&socket_dir, vm).with_context(|| format!("cannot end the recording of VM {vm}"))
        }
    }
}

/// The chunk store `serve` reads (a directory, or a bucket through a disk cache) and which of
/// its snapshots; for one remote snapshot served by a policy that needs a working set and given
/// none, the one published with it.
fn write_loading_set(args: &LoadingSetArgs) -> Result<()> {
    let (min_frequency, config) = args.plan.config()?;
    // From disk: only the planned pages are read, not the whole snapshot.
    let snapshot = Snapshot::load("snapshot", &args.snapshot, Storage::Disk)?;
    let set = prefetch::format::load(&args.working_set, &snapshot.identity())
        .with_context(|| format!("cannot use working set {}", args.working_set.display()))?;
    let plan = plan_for(&set, PrefetchPolicy::Union, min_frequency, |page| snapshot.is_zero_page(page), config);
    let mut scratch = Vec::new();
    let read = |offset: u64, buf: &mut [u8]| {
        let bytes =
            snapshot.pages().read(FileOffset(offset), buf.len() as u64, &mut scratch).map_err(std::io::Error::other)?;
        buf.copy_from_slice(bytes);
        Ok(())
    };
    LoadingSet::write(&args.out, snapshot.identity(), snapshot.stamp().digest(), &plan, read)
        .with_context(|| format!("cannot write loading set {}", args.out.display()))?;
    let (batches, pages) = (plan.batches.len(), plan.pages());
    println!("wrote {}: {batches} batches, {pages} pages ({} MiB)", args.out.display(), pages / 256);
    Ok(())
}

fn stats(socket_dir: &Path, json: bool) -> Result<()> {
    let response =
        query_stats(socket_dir).with_context(|| format!("cannot query the server at {}", socket_dir.display()))?;
    let mut out = std::io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&response)?)
    } else {
        print_stats(&mut out, &response)
    };
    match written {
        // `uffd-server stats | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_stats(out: &mut impl Write, response: &uffd_server::control::StatsResponse) -> std::io::Result<()> {
    let resident_mib = response.snapshot_resident_bytes >> 20;
    writeln!(out, "snapshots loaded: {:?} ({resident_mib} MiB resident)", response.snapshots_loaded)?;
    if let Some(remote) = &response.remote {
        writeln!(
            out,
            "object store: {} chunks fetched ({} MiB), {} failed GETs; disk cache: {} chunks read from files, {} from those held back for its writer",
            remote.chunk_gets,
            remote.chunk_bytes >> 20,
            remote.failed_gets,
            remote.disk_hits,
            remote.held_back_hits
        )?;
    }
    for vm in &response.vms {
        let state = vm.ended.as_deref().unwrap_or("running");
        writeln!(out, "vm {} snapshot {} pid {} {:.3}s {state}", vm.id, vm.snapshot, vm.peer_pid, vm.seconds)?;
        writeln!(out, "  {}", vm.counters.summary())?;
    }
    Ok(())
}

/// Parses `4096`, `64K`, `512M`, `16G` (binary units).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size (e.g. 512M, 16G)"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("16g"), Ok(16 << 30));
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}
