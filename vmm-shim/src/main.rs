//! `vmm-shim`: snapshot a CPL3 test guest, and restore it with memory from a uffd memory server,
//! a MAP_PRIVATE file mapping or an eager copy.

mod demo;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vmm_shim::restore::{restore, MemBackend, RestoreOptions};
use vmm_shim::snapshot;
use vmm_shim::workload::Workload;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the guest to READY (after its runtime init) and save memory + state to --out.
    Snapshot {
        /// hello, python-like, node-like (xorshift heaps), python-image or node-image (real
        /// runtime memory: docs/vmm-shim.md); the options below override it.
        #[arg(long, default_value = "hello")]
        workload: String,
        /// For python-image and node-image: the function on top of the runtime (0: none).
        #[arg(long, default_value_t = 0)]
        function: u16,
        #[arg(long)]
        mem_mib: Option<u64>,
        /// MiB of heap the runtime init writes.
        #[arg(long)]
        init_mib: Option<u64>,
        /// Pages one invocation touches.
        #[arg(long)]
        ws_pages: Option<u64>,
        /// Fraction of an invocation's working set shared by all inputs (0..=1).
        #[arg(long)]
        shared_fraction: Option<f64>,
        /// Rounds of xorshift64 an invocation computes after each page it touches (~2.5 ns
        /// each): the function's own work.
        #[arg(long)]
        compute_rounds: Option<u64>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a snapshot and run invocations, each checksum checked against the memory file.
    Restore {
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long, value_enum)]
        mem_backend: MemBackend,
        /// The memory server's socket (uffd backend).
        #[arg(long)]
        uffd_socket: Option<PathBuf>,
        /// Invocations to run; inputs 1..=K unless --input is given.
        #[arg(long, default_value_t = 1)]
        invoke: u64,
        /// Input seeds of the invocations (repeatable).
        #[arg(long)]
        input: Vec<u64>,
        /// After each invocation, drop guest range START_MIB:LEN_MIB with MADV_DONTNEED (what a
        /// balloon does); later invocations must read zeros there (the file backend: the file).
        #[arg(long, value_parser = parse_range_mib)]
        balloon_range: Option<(u64, u64)>,
        /// vCPUs running invocations at once (inputs dealt round-robin): 1 or 2.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Milliseconds the VMM spends after guest memory is set up (for `uffd`: after the
        /// handshake) before it creates the vCPUs, as a real VMM's snapshot load does:
        /// Firecracker v1.16.1 spends ~8–13 ms between its UFFD handshake and resuming the
        /// guest here, time a memory server can place pages in. 0: resume at once.
        #[arg(long, default_value_t = 0)]
        vmm_load_ms: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a built-in 128 MiB snapshot through uffd-server with a host thread (no KVM),
    /// against an eager in-memory copy, and print the table.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Snapshot {
            workload,
            function,
            mem_mib,
            init_mib,
            ws_pages,
            shared_fraction,
            compute_rounds,
            seed,
            out,
        } => {
            let preset = Workload::preset(&workload, function).with_context(|| {
                format!("unknown workload `{workload}`: use hello, python-like, node-like, python-image or node-image")
            })?;
            let w = Workload {
                mem_mib: mem_mib.unwrap_or(preset.mem_mib),
                init_mib: init_mib.unwrap_or(preset.init_mib),
                ws_pages: ws_pages.unwrap_or(preset.ws_pages),
                shared_fraction: shared_fraction.unwrap_or(preset.shared_fraction),
                compute_rounds: compute_rounds.unwrap_or(preset.compute_rounds),
                seed: seed.unwrap_or(preset.seed),
                image: preset.image,
            };
            if !(0.0..=1.0).contains(&w.shared_fraction)
                || w.mem_mib < 2
                || w.mem_mib > 32768
                || w.init_mib >= w.mem_mib.min(3072)
            {
                bail!("invalid workload {w:?}: need 2 ≤ mem-mib ≤ 32768, init-mib < min(mem-mib, 3072), 0 ≤ shared-fraction ≤ 1");
            }
            let state = snapshot::take(&w, &out).with_context(|| format!("cannot snapshot into {}", out.display()))?;
            println!("snapshot of {:?} written to {}", state.workload, out.display());
            Ok(())
        }
        Command::Restore {
            snapshot,
            mem_backend,
            uffd_socket,
            invoke,
            input,
            balloon_range,
            vcpus,
            vmm_load_ms,
            json,
        } => {
            let inputs: Vec<u64> = if input.is_empty() { (1..=invoke).collect() } else { input };
            let options = RestoreOptions {
                backend: mem_backend,
                socket: uffd_socket.as_deref(),
                inputs: &inputs,
                balloon: balloon_range,
                vcpus,
                vmm_load: std::time::Duration::from_millis(vmm_load_ms),
            };
            let report =
                restore(&snapshot, &options).with_context(|| format!("restore of {} failed", snapshot.display()))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("backend {:?}, {} MiB guest", report.backend, report.mem_mib);
                println!("{:<28} {:>12}", "phase", "µs");
                println!("{:<28} {:>12.0}", "guest memory", report.memory_us);
                println!("{:<28} {:>12.0}", "handshake (uffd)", report.handshake_us);
                println!("{:<28} {:>12.0}", "VMM load (--vmm-load-ms)", report.vmm_load_us);
                println!("{:<28} {:>12.0}", "VM creation", report.vm_create_us);
                println!("{:<28} {:>12.0}", "first guest instruction", report.first_instruction_us);
                for inv in &report.invocations {
                    println!(
                        "{:<28} {:>12.0}   {} pages, {} faults, checksum {:#018x} ok",
                        format!("invocation input={} vcpu={}", inv.input, inv.vcpu),
                        inv.us,
                        inv.pages,
                        inv.faults,
                        inv.checksum
                    );
                }
                println!("{:<28} {:>12.0}", "total", report.total_us);
            }
            Ok(())
        }
    }
}

/// `START_MIB:LEN_MIB` → (start, len) in bytes.
fn parse_range_mib(s: &str) -> Result<(u64, u64), String> {
    let (start, len) = s.split_once(':').ok_or_else(|| format!("`{s}`: expected START_MIB:LEN_MIB"))?;
    let mib = |v: &str| v.trim().parse::<u64>().map(|v| v << 20).map_err(|_| format!("`{v}` is not a number of MiB"));
    Ok((mib(start)?, mib(len)?))
}
