//! Working-set prefetch benchmarks, each against a baseline measured in the same run.
//!
//! 1. Prefetch bandwidth: the server prefetching a 256 MiB working set (`--prefetch union`,
//!    nothing touching it) against the bulk UFFDIO_COPY ceiling — a loop in this process that
//!    copies the same bytes into a registered region with no faulting thread.
//! 2. Time until a VM has touched its whole working set, for `none`, `reap` and `union`, with a
//!    stable working set and with one that shifts between inputs (70% and 40% shared). Five
//!    runs are recorded with `uffd-server record`; three new inputs are then measured under each
//!    policy, each from a fresh copy of the recorded file. "warm" is the same touch again with
//!    everything resident: the floor.
//!
//! Run: `./x bench --bench prefetch` (or `cargo bench -p benches --bench prefetch`).
//! `BENCH_ONLY=bandwidth|touch` runs one part; `BENCH_VERBOSE=1` prints each VM's counters.

use benches::{bandwidth, median};
use e2e::fake_vmm::{touch, FakeVmm, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::{Rng, SnapshotFile};
use std::path::Path;
use std::time::{Duration, Instant};
use vmm_shim::usize_of;

const MIB: usize = 1 << 20;

fn main() -> anyhow::Result<()> {
    e2e::require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    // BENCH_ONLY=bandwidth or BENCH_ONLY=touch runs one part.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "bandwidth" {
        bandwidth(dir.path())?;
    }
    if only.is_empty() || only == "touch" {
        working_set_touch(dir.path());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Bandwidth

fn bandwidth(dir: &Path) -> anyhow::Result<()> {
    let setup = bandwidth::Setup::new(dir, 256);
    const ROUNDS: usize = 5;
    let batches: [(u64, &str); 3] = [(16, "64 KiB"), (64, "256 KiB"), (512, "2 MiB")];
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        ("bulk UFFDIO_COPY, 64 KiB chunks (ceiling)".into(), vec![]),
        ("bulk UFFDIO_COPY, 2 MiB chunks (ceiling)".into(), vec![]),
    ];
    for (_, size) in batches {
        rows.push((format!("uffd-server prefetch, {size} batches: placing"), vec![]));
        rows.push((format!("uffd-server prefetch, {size} batches: attach to done, planning included"), vec![]));
    }
    // The first server run after the ceiling loops free their 512 MiB is measured slower,
    // whatever its batch size (an effect of the kernel's memory state, seen here): one
    // discarded warm-up run, and the order of the server runs rotates every round.
    setup.server_prefetch(64)?;
    for round in 0..ROUNDS {
        rows[0].1.push(setup.bulk_copy_ceiling(64 << 10)?);
        rows[1].1.push(setup.bulk_copy_ceiling(2 << 20)?);
        for i in (0..batches.len()).map(|i| (i + round) % batches.len()) {
            let (batch_pages, _) = batches[i];
            let ((placing, end_to_end), _) = setup.server_prefetch(batch_pages)?;
            rows[2 + 2 * i].1.push(placing);
            rows[3 + 2 * i].1.push(end_to_end);
        }
        eprintln!("bandwidth round {}/{ROUNDS} done", round + 1);
    }
    let ceiling = median(&rows[0].1).max(median(&rows[1].1));
    println!("\n## Prefetch bandwidth: 256 MiB, {ROUNDS} alternating rounds, medians\n");
    println!("| copier | GB/s | vs best ceiling |");
    println!("|---|---|---|");
    for (name, values) in &rows {
        println!("| {name} | {:.2} | {:.0}% |", median(values), median(values) / ceiling * 100.0);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Time to touch the working set

const GUEST: usize = 128 * MIB;
/// Working sets are made of 32 KiB chunks (heaps have locality): 512 chunks = 16 MiB per run.
const CHUNK_PAGES: u64 = 8;
const CHUNKS_PER_RUN: usize = 512;

/// The pages input `input` touches, in order: the shared chunks in a fixed order, and
/// input-specific chunks inserted at input-specific positions.
fn run_pages(input: u64, shared_fraction: f64) -> Vec<u64> {
    let all_chunks = (GUEST / PAGE) as u64 / CHUNK_PAGES;
    let mut fixed = Rng::new(7);
    let mut order: Vec<u64> = (0..all_chunks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, usize_of(fixed.next_u64() % (i as u64 + 1)));
    }
    let shared = vmm_shim::share(CHUNKS_PER_RUN, shared_fraction);
    let (common, rest) = order.split_at(shared);
    let mut rng = Rng::new(1000 + input);
    let mut chunks = common.to_vec();
    let mut pool = rest.to_vec();
    for _ in shared..CHUNKS_PER_RUN {
        let pick = pool.swap_remove(usize_of(rng.next_u64() % pool.len() as u64));
        let at = usize_of(rng.next_u64() % (chunks.len() as u64 + 1));
        chunks.insert(at, pick);
    }
    chunks.iter().flat_map(|c| c * CHUNK_PAGES..(c + 1) * CHUNK_PAGES).collect()
}

/// Touches `pages` in order from one thread (a vCPU); returns (cold, warm) times.
fn touch_run(server: &ServerProcess, pages: &[u64]) -> (Duration, Duration) {
    let vmm = FakeVmm::attach_layout(&server.socket("fn"), &[GUEST], 0, false).expect("attach");
    let base = vmm.memory.regions[0].addr;
    let timed = || {
        let start = Instant::now();
        for (i, &p) in pages.iter().enumerate() {
            touch(base + usize_of(p) * PAGE, false);
            if std::env::var_os("BENCH_VERBOSE").is_some() && (i == 0 || i == 8 || i == 64 || i == 512) {
                eprintln!("  touch {i} done at {:?}", start.elapsed());
            }
        }
        start.elapsed()
    };
    let cold = timed();
    (cold, timed())
}

fn working_set_touch(dir: &Path) {
    let snap = SnapshotFile::random(dir, "fn.mem", GUEST, 0.3, 52);
    let scenarios = [("stable (100% shared)", 1.0), ("shifting (70% shared)", 0.7), ("shifting (40% shared)", 0.4)];
    let policies: [(&str, &[&str]); 4] = [
        ("none", &["--prefetch", "none"]),
        ("reap", &["--prefetch", "reap"]),
        ("union", &["--prefetch", "union"]),
        ("union ≥½", &["--prefetch", "union", "--min-frequency", "0.5"]),
    ];
    println!(
        "\n## Time to touch the working set (16 MiB in 32 KiB chunks of a 128 MiB guest), medians of 3 new inputs\n"
    );
    println!("\"union ≥½\" is union with `--min-frequency 0.5`: only pages seen in at least half the runs.\n");
    println!("| working set | none ms | reap ms | union ms | union ≥½ ms | warm ms | none / union | reap / union | reap / union ≥½ |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, shared) in scenarios {
        let recorded = dir.join("recorded.ws");
        let _ = std::fs::remove_file(&recorded);
        {
            let ws = recorded.to_str().expect("utf-8");
            let server = ServerProcess::start_command("record", &[("fn", &snap.path)], &["--working-set", ws]);
            for input in 1..=5 {
                touch_run(&server, &run_pages(input, shared));
            }
            server.wait_for_log("run merged into the working set", 5);
        }
        let mut times: [Vec<f64>; 5] = Default::default();
        for input in 101..=103 {
            let pages = run_pages(input, shared);
            for (i, (policy, policy_args)) in policies.iter().enumerate() {
                let ws = dir.join("measured.ws");
                std::fs::copy(&recorded, &ws).expect("copy working set");
                let mut args = vec!["--working-set", ws.to_str().expect("utf-8")];
                args.extend_from_slice(policy_args);
                let server = ServerProcess::start(&[("fn", &snap.path)], &args);
                let (cold, warm) = touch_run(&server, &pages);
                if std::env::var_os("BENCH_VERBOSE").is_some() {
                    server.wait_for_log("VM ended", 1);
                    eprintln!("{name} {policy} input {input}: {:?}", server.stats().vms[0].counters);
                }
                times[i].push(ms(cold));
                times[4].push(ms(warm));
            }
        }
        let [none, reap, union, majority, warm] = times.map(|t| median(&t));
        println!(
            "| {name} | {none:.1} | {reap:.1} | {union:.1} | {majority:.1} | {warm:.1} | {:.2}× | {:.2}× | {:.2}× |",
            none / union,
            reap / union,
            reap / majority
        );
        eprintln!("{name} done");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
