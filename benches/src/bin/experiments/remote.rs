//! Experiment 7: restoring from an object store (Ceph RGW on loopback, behind a proxy adding
//! 0.5 ms or 2 ms per round trip), against the same snapshot already in the server's RAM and in
//! the host's disk cache.
//!
//! `python-image` function 5 with a working set recorded over 5 inputs, imported, pushed with
//! its working set; each measurement from a fresh server ("another host"): cold (empty RAM,
//! empty disk cache), disk (empty RAM, disk cache filled by `uffd-server pull --all`), RAM (the
//! cold server's second VM: its chunks already in the pool). First invocation's DONE from the
//! restore's start, and the bytes the server fetched by the time the VM ended.

use crate::harness::{path, proc_memory, record, restore, uffd_args, MEASURED};
use crate::report::{bar_plot, progress, Labels};
use anyhow::{Context, Result};
use benches::delay_proxy::DelayProxy;
use benches::median;
use e2e::server_process::{run_binary, ServerProcess};
use snapstore::store::Store;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

const RTTS_MS: [f64; 2] = [0.5, 2.0];
const TIERS: [&str; 3] = ["RAM", "disk cache", "cold store"];
const POLICIES: [&str; 2] = ["none", "union"];

/// One configuration's results per run: first DONE (ms), bytes fetched, and the server's peak
/// RSS by the end of the run (bytes).
#[derive(Default)]
struct Runs {
    first_done: Vec<f64>,
    fetched: Vec<f64>,
    peak_rss: Vec<f64>,
}

pub fn run(work: &Path, out: &Path) -> Result<String> {
    let s3 = e2e::object_store::require_s3();
    let bucket = e2e::object_store::test_bucket(&s3, "experiment-7");
    let snapshot = work.join("python-image-5");
    if !snapshot.join("mem").exists() {
        run_binary(
            "vmm-shim",
            &["snapshot", "--workload", "python-image", "--function", "5", "--out", path(&snapshot)],
        )?;
    }
    let ws = work.join("remote.ws");
    record(&snapshot, &ws)?;
    let store = work.join("remote-store");
    e2e::server_process::import_to_store(&store, "vm", &snapshot.join("mem"))?;
    let url = bucket.address().to_string();
    run_binary(
        "uffd-server",
        &["push", "--store", path(&store), "--name", "vm", "--to", &url, "--working-set", path(&ws)],
    )?;
    let pulled = work.join("remote-pulled");
    run_binary("uffd-server", &["pull", "--from", &url, "--name", "vm", "--all", "--disk-cache", path(&pulled)])?;
    let set_bytes = working_set_chunk_bytes(&store, &ws)?;

    let upstream = std::env::var("AWS_ENDPOINT_URL")?
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .context("AWS_ENDPOINT_URL is not http://IP:PORT")?;
    let bar = progress(RTTS_MS.len() * MEASURED.len(), "7: object store");
    let mut md = String::from("## 7. Restore from an object store\n\n");
    md += "`python-image` function 5 (128 MiB guest, real python3 memory; docs/vmm-shim.md), working set recorded over inputs 1–5, imported (64 KiB zstd chunks), pushed with its working set to Ceph RGW on loopback; the server reaches RGW through a proxy that adds the round-trip time below (this kernel has no netem). Each run is a fresh server: **cold store** (empty RAM and disk cache), **disk cache** (empty RAM, disk cache filled by `uffd-server pull --all`), **RAM** (the cold server's second VM, same input). The server loads the named snapshot when it starts (manifest, plan, and the start of the working set's fetch); each VM starts once the server reports it loaded. First invocation's DONE from the restore's start, medians over inputs 101–103; **server peak RSS**: the server's VmHWM when the run ended (RAM: the cold server's, after its second VM); **fetched**: chunk bytes the server received by the time the VM ended (one invocation), against the working set's chunk bytes (the zstd chunks holding its pages: ";
    writeln!(md, "{:.2} MiB).\n", set_bytes / f64::from(1 << 20))?;
    let mut bars = Vec::new();
    let mut goals = String::new();
    for rtt in RTTS_MS {
        let proxy = DelayProxy::start(upstream, Duration::from_secs_f64(rtt / 1e3))?;
        let mut runs: Vec<Runs> = (0..TIERS.len() * POLICIES.len()).map(|_| Runs::default()).collect();
        for &input in &MEASURED {
            for (p, policy) in POLICIES.iter().enumerate() {
                measure(work, &proxy, &url, &snapshot, &pulled, policy, input, &mut runs, p)?;
            }
            bar.inc(1);
        }
        md += &table(rtt, &runs, set_bytes, &mut bars)?;
        goals += &check_goals(rtt, &runs, set_bytes);
    }
    bar.finish();
    let labels = Labels { title: "Restore from an object store: first DONE", x: "ms (median)", y: "" };
    bar_plot(&out.join("remote_restore.png"), &labels, &bars)?;
    md += "![restore from an object store](remote_restore.png)\n\n";
    md += &goals;
    Ok(md)
}

/// One input under one policy: cold (then RAM, on the same server) and disk-cache restores.
#[allow(clippy::too_many_arguments)]
fn measure(
    work: &Path,
    proxy: &DelayProxy,
    url: &str,
    snapshot: &Path,
    pulled: &Path,
    policy: &str,
    input: u64,
    runs: &mut [Runs],
    p: usize,
) -> Result<()> {
    let slot = |tier: usize| tier * POLICIES.len() + p;
    let cold_cache = work.join(format!("cache-cold-{policy}-{input}"));
    let _ = std::fs::remove_dir_all(&cold_cache);
    let cold = remote_server(proxy, url, &cold_cache, policy);
    record_run(&cold, snapshot, input, &mut runs[slot(2)])?;
    record_run(&cold, snapshot, input, &mut runs[slot(0)])?;
    drop(cold);
    let disk_cache = work.join(format!("cache-disk-{policy}-{input}"));
    let _ = std::fs::remove_dir_all(&disk_cache);
    let copied = std::process::Command::new("cp").arg("-a").arg(pulled).arg(&disk_cache).status()?;
    anyhow::ensure!(copied.success(), "copying the pulled disk cache failed");
    let warm = remote_server(proxy, url, &disk_cache, policy);
    record_run(&warm, snapshot, input, &mut runs[slot(1)])?;
    Ok(())
}

/// A fresh server of snapshot `vm` from the bucket at `url`, through `proxy` (`union` prefetches
/// the working set published with the snapshot: fetched into the server's disk cache at start).
fn remote_server(proxy: &DelayProxy, url: &str, cache: &Path, policy: &str) -> ServerProcess {
    let snapshot = format!("vm={url}/vm");
    // The same working set for every run: what one run learns is not shared with the next.
    let args = ["--snapshot", &snapshot, "--disk-cache", path(cache), "--prefetch", policy, "--no-share-learning"];
    let endpoint = proxy.url();
    ServerProcess::start_with_env("serve", &[], &args, &[("AWS_ENDPOINT_URL", endpoint.as_str())])
}

/// Restores `input` from `server`: its first DONE, and what the server fetched meanwhile.
fn record_run(server: &ServerProcess, snapshot: &Path, input: u64, runs: &mut Runs) -> Result<()> {
    let before = server.stats().remote.map_or(0, |r| r.chunk_bytes);
    runs.first_done.push(restore(snapshot, &uffd_args(server), &[input])?.first_done);
    let after = server.stats().remote.map_or(0, |r| r.chunk_bytes);
    runs.fetched.push((after - before) as f64);
    runs.peak_rss.push(proc_memory(server.pid(), "VmHWM")? as f64);
    Ok(())
}

/// Bytes of the stored chunks that hold the working set's pages.
fn working_set_chunk_bytes(store: &Path, ws: &Path) -> Result<f64> {
    let store = Store::open(store)?;
    let manifest = store.read_manifest("vm")?;
    let set = prefetch::format::load(ws, &manifest.identity)?;
    let chunk_pages = u64::from(manifest.chunk_size) / snapstore::PAGE;
    let chunks: BTreeSet<_> = set
        .select(0.0)
        .iter()
        .filter_map(|(page, _)| manifest.chunks.get(usize::try_from(page / chunk_pages).ok()?).copied().flatten())
        .collect();
    let mut bytes = 0;
    for id in chunks {
        bytes += store.chunk_header(&id)?.1;
    }
    Ok(bytes as f64)
}

fn table(rtt: f64, runs: &[Runs], set_bytes: f64, bars: &mut Vec<(String, f64)>) -> Result<String> {
    let ram_union = median(&runs[1].first_done);
    let mut md = format!("**{rtt} ms per round trip**\n\n| tier | policy | first DONE ms | vs RAM union | fetched MiB | vs working set | server peak RSS MiB |\n|---|---|---|---|---|---|---|\n");
    for (t, tier) in TIERS.iter().enumerate() {
        for (p, policy) in POLICIES.iter().enumerate() {
            let r = &runs[t * POLICIES.len() + p];
            let (done, fetched) = (median(&r.first_done), median(&r.fetched));
            let mib = f64::from(1 << 20);
            writeln!(
                md,
                "| {tier} | {policy} | {done:.1} | {:.2}× | {:.2} | {:.2}× | {:.1} |",
                done / ram_union,
                fetched / mib,
                fetched / set_bytes,
                median(&r.peak_rss) / mib
            )?;
            bars.push((format!("{rtt} ms RTT, {tier}, {policy}"), done));
        }
    }
    md.push('\n');
    Ok(md)
}

fn check_goals(rtt: f64, runs: &[Runs], set_bytes: f64) -> String {
    let done = |tier: usize, p: usize| median(&runs[tier * POLICIES.len() + p].first_done);
    let (ram, disk, cold_none, cold_union) = (done(0, 1), done(1, 1), done(2, 0), done(2, 1));
    let fetched = median(&runs[5].fetched) / set_bytes;
    let mut md = format!("Goals at {rtt} ms RTT (union): ");
    if rtt <= 0.5 {
        md += &format!("cold store ≤ 2× RAM: **{:.2}×**; ", cold_union / ram);
    }
    md += &format!(
        "cold `none` / cold `union` ≥ 5×: **{:.1}×**; fetched before the VM ended ≤ 1.2× the working set's chunks: **{fetched:.2}×**; disk cache ≤ 1.2× RAM: **{:.2}×**.\n\n",
        cold_none / cold_union,
        disk / ram
    );
    md
}
