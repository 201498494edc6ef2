//! Latency experiments: the real `uffd-server` and `vmm-shim` binaries, every configuration in
//! one run, figures as ratios against baselines measured in the same run.
//!
//! 1. Restore latency vs VM memory size (`latency`), and 1b. the first invocation vs warm as
//!    the function computes more (`compute`).
//! 2. In-memory vs on-disk snapshot, with and without a loading set (`disk`).
//! 3. Working-set stability (`stability`).
//! 4. Fault path: per-fault cost and prefetch bandwidth against their floors (`fault_path`).
//! 5. Density: N concurrent restores (`density`).
//! 6. The chunk store: dedup and compression vs chunk size, RAM per snapshot, fault path,
//!    prefetch and restore from it, on real runtime memory (`store`).
//! 7. Restoring from an object store (`remote`).
//! 8. The server's own end: a vCPU's stall across a handover and a crash, a soak (`restart`).
//!
//! Run: `./x experiments [--full]` (`--quick`, the default, takes ~5 minutes). Writes CSV
//! files, PNG plots and `summary.md` to `--out` (default `target/experiments`).

mod compute;
mod density;
mod disk;
mod fault_path;
mod harness;
mod latency;
mod remote;
mod report;
mod restart;
mod stability;
mod store;

use anyhow::Result;
use clap::Parser;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// Every size from 128 MiB to 3 GiB in 128 MiB steps and 4, 8, 16 GiB, more compute
    /// levels, more rounds, and 64 concurrent VMs.
    #[arg(long)]
    full: bool,
    /// The default: a quick run.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    #[arg(long, default_value = "target/experiments")]
    out: PathBuf,
    /// Run only these experiments (1, 1b, 2, 3, 4, 5, 6, 7, 8; repeatable); all by default.
    #[arg(long)]
    only: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    e2e::require_kvm();
    e2e::require_userfaultfd();
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let (work, out, full) = (work.path(), args.out.as_path(), args.full);
    let wanted = |id: &str| args.only.is_empty() || args.only.iter().any(|o| o == id);
    let mut summary = String::from("# Latency experiments\n\n");
    writeln!(
        summary,
        "Command: `./x experiments{}{}`. Machine: 2 cores, nested KVM (kvm_pvm), shared and noisy: read the ratios.\n",
        if full { " --full" } else { "" },
        args.only.iter().map(|o| format!(" --only {o}")).collect::<String>()
    )?;
    if wanted("1") {
        let sizes: Vec<u64> = if full {
            (1..=24).map(|i| i * 128).chain([4096, 8192, 16384]).collect()
        } else {
            vec![128, 512, 1024, 3072, 16384]
        };
        add_section(&mut summary, || latency::run(&sizes, work, out))?;
    }
    if wanted("1b") {
        let rounds: &[u64] = if full { &[0, 500, 1000, 2500, 5000, 10_000, 20_000] } else { &[0, 1000, 10_000] };
        // Each input under every config in turn; three times in the full run, twice to keep the
        // quick one within ~5 minutes.
        add_section(&mut summary, || compute::run(rounds, if full { 3 } else { 2 }, work, out))?;
    }
    if wanted("2") {
        add_section(&mut summary, || disk::run(work, out))?;
    }
    if wanted("3") {
        add_section(&mut summary, || stability::run(work, out))?;
    }
    if wanted("4") {
        add_section(&mut summary, || fault_path::run(full, work, out))?;
    }
    if wanted("5") {
        let counts: &[usize] = if full { &[1, 4, 16, 64] } else { &[1, 4, 16] };
        add_section(&mut summary, || density::run(counts, work, out))?;
    }
    if wanted("6") {
        add_section(&mut summary, || store::run(work, out))?;
    }
    if wanted("7") {
        add_section(&mut summary, || remote::run(work, out))?;
    }
    if wanted("8") {
        add_section(&mut summary, || restart::run(work, out))?;
    }
    std::fs::write(out.join("summary.md"), &summary)?;
    println!("{summary}");
    println!("CSV, PNG plots and summary.md are in {}", out.display());
    Ok(())
}

/// Runs one experiment and appends its section, then the host's steal time during it: this
/// nested VM loses its CPUs to the hypervisor ~100 ms at a time now and then (experiment 8
/// caught it: docs/results/README.md), which stalls every thread here at once. A section it
/// hit says so.
fn add_section(summary: &mut String, run: impl FnOnce() -> Result<String>) -> Result<()> {
    let (before, started) = (report::host_steal_ms(), std::time::Instant::now());
    summary.push_str(&run()?);
    // How long each section takes, so that the README's run time can be kept true.
    let took = started.elapsed().as_secs_f64();
    match (before, report::host_steal_ms()) {
        (Some(before), Some(after)) => {
            writeln!(summary, "Section run time: {took:.0} s; host steal time during it: {:.0} ms.\n", after - before)?
        }
        _ => writeln!(summary, "Section run time: {took:.0} s.\n")?,
    }
    Ok(())
}
