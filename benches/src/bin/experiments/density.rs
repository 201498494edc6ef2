//! Experiment 5: density. N VMs restored at once from one snapshot, each with its own input
//! (working sets 70% shared): p50/p99 time to the first invocation's DONE, and the CPU the
//! server and the VMMs used per VM.

use crate::harness::{record, restore_concurrently, server, snapshot, uffd_args};
use crate::report::{line_plot, progress, push_point, Labels, Series};
use anyhow::{Context, Result};
use benches::{median, percentile};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

const CONFIGS: [&str; 3] = ["copy", "uffd none", "uffd union"];
/// Restores per (configuration, N): small N is repeated in batches for a stable percentile.
const SAMPLES: usize = 16;

pub fn run(counts: &[usize], work: &Path, out: &Path) -> Result<String> {
    let snapshot = snapshot(work.join("density"), &[])?;
    let ws = work.join("density.ws");
    record(&snapshot, &ws)?;
    let batches = |n: usize| SAMPLES.div_ceil(n);
    let bar = progress(CONFIGS.len() * counts.iter().map(|&n| batches(n)).sum::<usize>(), "5: density");
    let mut csv = String::from("vms,config,batch,vm,first_done_ms\n");
    let mut table = String::new();
    let mut series = Series::new();
    let mut p50_at = Vec::new(); // (n, config, p50)
    for &n in counts {
        for config in CONFIGS {
            let mut done = Vec::new();
            let (mut server_cpu, mut vmm_cpu, mut wall) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            for batch in 0..batches(n) {
                let inputs: Vec<u64> = (0..n as u64).map(|i| 1000 + (batch * n) as u64 + i).collect();
                let server = match config.strip_prefix("uffd ") {
                    Some(policy) => Some(server(&snapshot, &ws, policy, &[])?),
                    None => None,
                };
                let args: Vec<String> = match &server {
                    Some(server) => uffd_args(server).to_vec(),
                    None => vec!["--mem-backend".into(), config.into()],
                };
                let server_before = server.as_ref().map(|s| s.cpu_time()).transpose()?.unwrap_or_default();
                let vmm_before = children_cpu_time();
                let started = Instant::now();
                let timed = restore_concurrently(&snapshot, &args, &inputs)?;
                wall += started.elapsed();
                vmm_cpu += children_cpu_time().saturating_sub(vmm_before);
                if let Some(server) = &server {
                    server.wait_for_log("VM ended", n);
                    server_cpu += server.cpu_time().context("server CPU time")?.saturating_sub(server_before);
                }
                for (vm, t) in timed.iter().enumerate() {
                    writeln!(csv, "{n},{config},{batch},{vm},{:.3}", t.first_done)?;
                    done.push(t.first_done);
                }
                bar.inc(1);
            }
            let vms = done.len() as f64;
            let (p50, p99) = (median(&done), percentile(&done, 0.99));
            let per_vm = |d: Duration| d.as_secs_f64() * 1e3 / vms;
            let server_ms = if config == "copy" { "–".to_string() } else { format!("{:.2}", per_vm(server_cpu)) };
            let base = p50_at.iter().find(|(m, c, _)| *m == counts[0] && c == &config).map_or(p50, |x| x.2);
            writeln!(
                table,
                "| {n} | {config} | {p50:.1} | {p99:.1} | {:.2}× | {server_ms} | {:.2} | {:.0} |",
                p50 / base,
                per_vm(vmm_cpu),
                wall.as_secs_f64() * 1e3 / batches(n) as f64
            )?;
            push_point(&mut series, &format!("{config} p50"), (n as f64, p50));
            push_point(&mut series, &format!("{config} p99"), (n as f64, p99));
            p50_at.push((n, config, p50));
        }
    }
    bar.finish();
    std::fs::write(out.join("density.csv"), &csv)?;
    let labels = Labels {
        title: "N concurrent restores of one snapshot",
        x: "VMs restored at once",
        y: "ms to first DONE (log scale)",
    };
    line_plot(&out.join("density.png"), &labels, &series)?;
    let p50 = |n: usize, c: &str| p50_at.iter().find(|(m, name, _)| *m == n && *name == c).map_or(f64::NAN, |x| x.2);
    let mut md = String::from("## 5. Density\n\n");
    writeln!(md, "N python-like VMs (128 MiB, no compute) restored at once from one snapshot, each with a new input (70% shared working sets); each uffd batch from a fresh server with the recorded working set. N < {SAMPLES} is repeated so that every cell has ≥ {SAMPLES} restores. Times from each VMM's start to its first invocation's DONE; CPU per VM: the server's (all its threads) and the VMM processes' (user + system). 2 cores: beyond N = 2, VMs share CPUs.\n")?;
    md += "| N | config | p50 ms | p99 ms | p50 vs N = 1 | server CPU ms/VM | VMM CPU ms/VM | batch wall ms |\n|---|---|---|---|---|---|---|---|\n";
    md += &table;
    md += "\n| N | none / union (p50) | copy / union (p50) |\n|---|---|---|\n";
    for &n in counts {
        writeln!(
            md,
            "| {n} | {:.2}× | {:.2}× |",
            p50(n, "uffd none") / p50(n, "uffd union"),
            p50(n, "copy") / p50(n, "uffd union")
        )?;
    }
    md += "\n![density](density.png)\n\n";
    Ok(md)
}

/// CPU time (user + system) of this process's children that have been waited for.
fn children_cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given and touches nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN covers terminated, waited-for children.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_usec).unwrap_or(0) * 1000)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
