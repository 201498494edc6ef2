//! Latency experiments: the real `uffd-server` and `vmm-shim` binaries, every configuration in
//! one run, figures as ratios against baselines measured in the same run.
//!
//! 1. Restore latency vs VM memory size: `copy` (SnapFaaS), `file` (Firecracker's File
//!    backend), uffd `none`, `reap`, `union`, and `warm` (the same input invoked again, all
//!    resident): time to the first guest instruction and to the first invocation's DONE.
//! 2. In-memory vs on-disk snapshot: the server holding the snapshot in RAM vs reading it from
//!    the file on demand with the page cache dropped, with and without a loading-set file;
//!    Firecracker's File backend for reference.
//! 3. Working-set stability: five inputs recorded, then ten new inputs whose working sets
//!    shift (shared fraction 100%, 70%, 40%), each restored fresh: time and demand faults per
//!    invocation for none / reap (first recorded run) / union (all runs, and it keeps learning
//!    from each VM).
//!
//! Run: `./x experiments [--full]` (`--quick`, the default, takes ~1 minute). Writes CSV files,
//! PNG plots and `summary.md` to `--out` (default `target/experiments`).

use anyhow::{Context, Result};
use clap::Parser;
use e2e::server_process::{run_binary, vmm_shim_restore, ServerProcess};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct Args {
    /// Every size from 128 MiB to 3 GiB in 128 MiB steps (default: 128, 512, 1024, 3072).
    #[arg(long)]
    full: bool,
    /// The default: a quick run.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    #[arg(long, default_value = "target/experiments")]
    out: PathBuf,
}

/// Inputs recorded into the working set before measuring, and inputs measured.
const RECORDED: [u64; 5] = [1, 2, 3, 4, 5];
const MEASURED: [u64; 3] = [101, 102, 103];

fn main() -> Result<()> {
    let args = Args::parse();
    e2e::require_kvm();
    e2e::require_userfaultfd();
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let sizes: Vec<u64> = if args.full { (1..=24).map(|i| i * 128).collect() } else { vec![128, 512, 1024, 3072] };
    let mut summary = String::from("# Latency experiments\n\n");
    writeln!(
        summary,
        "Command: `./x experiments{}`. Machine: 2 cores, nested KVM (kvm_pvm), shared and noisy: read the ratios.\n",
        if args.full { " --full" } else { "" }
    )?;
    summary += &size_experiment(&sizes, work.path(), &args.out)?;
    summary += &disk_experiment(work.path(), &args.out)?;
    summary += &stability_experiment(work.path(), &args.out)?;
    std::fs::write(args.out.join("summary.md"), &summary)?;
    println!("{summary}");
    println!("CSV, PNG plots and summary.md are in {}", args.out.display());
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `vmm-shim restore --json` of `inputs` with `extra` arguments.
fn restore(snapshot: &Path, extra: &[&str], inputs: &[u64]) -> Result<Value> {
    let inputs: Vec<String> = inputs.iter().map(u64::to_string).collect();
    let mut args = extra.to_vec();
    for input in &inputs {
        args.extend(["--input", input.as_str()]);
    }
    vmm_shim_restore(snapshot, &args)
}

/// (ms to first instruction, ms to first DONE, ms of the second invocation, faults of the first).
fn timings(report: &Value) -> (f64, f64, f64, f64) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let first = f(&report["first_instruction_us"]) / 1e3;
    let inv = &report["invocations"];
    (first, first + f(&inv[0]["us"]) / 1e3, f(&inv[1]["us"]) / 1e3, f(&inv[0]["faults"]))
}

/// Records `RECORDED` inputs into a working-set file with `uffd-server record`.
fn record(snapshot: &Path, ws: &Path) -> Result<()> {
    let server = ServerProcess::start_command("record", &[("vm", &snapshot.join("mem"))], &["--working-set", path(ws)]);
    for input in RECORDED {
        restore(snapshot, &["--mem-backend", "uffd", "--uffd-socket", path(&server.socket("vm"))], &[input])?;
    }
    server.wait_for_log("run merged into the working set", RECORDED.len());
    Ok(())
}

const CONFIGS: [&str; 5] = ["copy", "file", "uffd none", "uffd reap", "uffd union"];

/// One restore of `input` (then the same input again, for warm) under `config`.
fn measure(snapshot: &Path, ws: &Path, config: &str, input: u64) -> Result<Value> {
    match config {
        "copy" | "file" => restore(snapshot, &["--mem-backend", config], &[input, input]),
        _ => {
            let policy = config.trim_start_matches("uffd ");
            let copy = ws.with_extension("measured");
            std::fs::copy(ws, &copy)?; // online refinement must not change the baseline
            let args = ["--working-set", path(&copy), "--prefetch", policy];
            let server = ServerProcess::start(&[("vm", &snapshot.join("mem"))], &args);
            restore(snapshot, &["--mem-backend", "uffd", "--uffd-socket", path(&server.socket("vm"))], &[input, input])
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:28} {bar:40} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn size_experiment(sizes: &[u64], work: &Path, out: &Path) -> Result<String> {
    let bar = progress((sizes.len() * (1 + CONFIGS.len() * MEASURED.len())) as u64, "1: latency vs VM size");
    let mut csv = String::from("mem_mib,config,first_instruction_ms,first_done_ms,warm_ms\n");
    // config → (size, first_done_ms)
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut table = String::new();
    for &mib in sizes {
        let snapshot = work.join(format!("py-{mib}"));
        let mib_arg = mib.to_string();
        run_binary(
            "vmm-shim",
            &["snapshot", "--workload", "python-like", "--mem-mib", &mib_arg, "--out", path(&snapshot)],
        )?;
        let ws = work.join(format!("py-{mib}.ws"));
        record(&snapshot, &ws)?;
        bar.inc(1);
        let mut warm = Vec::new();
        let mut row = Vec::new();
        for config in CONFIGS {
            let (mut ready, mut done) = (Vec::new(), Vec::new());
            for input in MEASURED {
                let (r, d, w, _) = timings(&measure(&snapshot, &ws, config, input)?);
                ready.push(r);
                done.push(d);
                warm.push(w);
                bar.inc(1);
            }
            let (r, d) = (median(ready), median(done));
            writeln!(csv, "{mib},{config},{r:.3},{d:.3},")?;
            row.push((config, r, d));
            match series.iter_mut().find(|(c, _)| c == config) {
                Some((_, points)) => points.push((mib as f64, d)),
                None => series.push((config.to_string(), vec![(mib as f64, d)])),
            }
        }
        let w = median(warm);
        writeln!(csv, "{mib},warm,,,{w:.3}")?;
        match series.iter_mut().find(|(c, _)| c == "warm") {
            Some((_, points)) => points.push((mib as f64, w)),
            None => series.push(("warm".into(), vec![(mib as f64, w)])),
        }
        let union = row.iter().find(|(c, _, _)| *c == "uffd union").map_or(f64::NAN, |x| x.2);
        write!(table, "| {mib} |")?;
        for (_, r, d) in &row {
            write!(table, " {r:.1} / {d:.1} |")?;
        }
        let none = row.iter().find(|(c, _, _)| *c == "uffd none").map_or(f64::NAN, |x| x.2);
        writeln!(table, " {w:.1} | {:.2}× | {:.2}× |", union / w, none / union)?;
    }
    bar.finish();
    std::fs::write(out.join("latency_vs_size.csv"), &csv)?;
    plot(
        &out.join("latency_vs_size.png"),
        "Time to first invocation DONE vs VM size (python-like)",
        "VM memory (MiB)",
        "ms (log scale)",
        &series,
    )?;
    let first = |c: &str| series.iter().find(|(n, _)| n == c).and_then(|(_, p)| p.first().map(|x| x.1));
    let last = |c: &str| series.iter().find(|(n, _)| n == c).and_then(|(_, p)| p.last().map(|x| x.1));
    let flat = |c: &str| last(c).zip(first(c)).map_or(f64::NAN, |(l, f)| l / f);
    let mut md = String::from("## 1. Restore latency vs VM memory size\n\n");
    md += "python-like guest (37 MiB heap, 4096-page working set, 70% shared). Per size: five inputs recorded, three new inputs measured (medians). Cells: ms to the first guest instruction / ms to the first invocation's DONE. warm: the same input invoked again, all memory resident.\n\n";
    md += "| MiB | copy | file | uffd none | uffd reap | uffd union | warm | union / warm | none / union |\n|---|---|---|---|---|---|---|---|---|\n";
    md += &table;
    writeln!(md, "\nGrowth from the smallest to the largest size (first DONE): copy {:.2}×, file {:.2}×, none {:.2}×, reap {:.2}×, union {:.2}× (goal for union: ≤ 1.2×).\n\n![latency vs size](latency_vs_size.png)\n", flat("copy"), flat("file"), flat("uffd none"), flat("uffd reap"), flat("uffd union"))?;
    Ok(md)
}

/// Drops the page cache (root only); false if it could not.
fn drop_caches() -> bool {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn disk_experiment(work: &Path, out: &Path) -> Result<String> {
    let snapshot = work.join("disk");
    run_binary("vmm-shim", &["snapshot", "--workload", "python-like", "--out", path(&snapshot)])?;
    let mem = snapshot.join("mem");
    let ws = work.join("disk.ws");
    record(&snapshot, &ws)?;
    let ls = work.join("disk.ls");
    run_binary(
        "uffd-server",
        &["loading-set", "--snapshot", path(&mem), "--working-set", path(&ws), "--out", path(&ls)],
    )?;
    let configs: [(&str, Vec<&str>); 5] = [
        ("in-memory, union", vec!["--snapshot-storage", "memory", "--prefetch", "union"]),
        ("on-disk, none", vec!["--snapshot-storage", "disk", "--prefetch", "none"]),
        ("on-disk, union", vec!["--snapshot-storage", "disk", "--prefetch", "union"]),
        (
            "on-disk, union + loading set",
            vec!["--snapshot-storage", "disk", "--prefetch", "union", "--loading-set", path(&ls)],
        ),
        ("File backend (Firecracker)", vec![]),
    ];
    let bar = progress((configs.len() * MEASURED.len()) as u64, "2: in-memory vs on-disk");
    let mut dropped = true;
    let mut csv = String::from("config,input,first_done_ms\n");
    let mut rows = Vec::new();
    for (name, config) in &configs {
        let mut done = Vec::new();
        for input in MEASURED {
            let measured = ws.with_extension("measured");
            std::fs::copy(&ws, &measured)?;
            let report = if config.is_empty() {
                dropped &= drop_caches();
                restore(&snapshot, &["--mem-backend", "file"], &[input])?
            } else {
                let mut args = vec!["--working-set", path(&measured)];
                args.extend(config.iter().copied());
                // In-memory: the server has loaded the snapshot before any VM (it is long-running).
                let server = ServerProcess::start(&[("vm", &mem)], &args);
                if config.contains(&"disk") {
                    dropped &= drop_caches();
                }
                restore(&snapshot, &["--mem-backend", "uffd", "--uffd-socket", path(&server.socket("vm"))], &[input])?
            };
            let (_, d, _, _) = timings(&report);
            writeln!(csv, "{name},{input},{d:.3}")?;
            done.push(d);
            bar.inc(1);
        }
        rows.push((*name, median(done)));
    }
    bar.finish();
    std::fs::write(out.join("disk.csv"), &csv)?;
    let get = |n: &str| rows.iter().find(|(name, _)| *name == n).map_or(f64::NAN, |r| r.1);
    let mut md = String::from("## 2. In-memory vs on-disk snapshot\n\n");
    md += "python-like guest, five inputs recorded, three new inputs measured (medians), ms to the first invocation's DONE. ";
    md += if dropped {
        "The page cache was dropped before every on-disk and File-backend restore.\n\n"
    } else {
        "**The page cache could not be dropped (not root): on-disk figures are from a warm cache.**\n\n"
    };
    md += "| configuration | first DONE ms |\n|---|---|\n";
    for (name, ms) in &rows {
        writeln!(md, "| {name} | {ms:.1} |")?;
    }
    writeln!(
        md,
        "\nIn-memory vs on-disk (both union): {:.2}× faster (SnapFaaS: ≥ 2×). On disk, the loading set vs none: {:.2}×, vs union without it: {:.2}× (FaaSnap: up to 3.5×). In-memory union vs the File backend: {:.2}×.\n",
        get("on-disk, union") / get("in-memory, union"),
        get("on-disk, none") / get("on-disk, union + loading set"),
        get("on-disk, union") / get("on-disk, union + loading set"),
        get("File backend (Firecracker)") / get("in-memory, union")
    )?;
    Ok(md)
}

fn stability_experiment(work: &Path, out: &Path) -> Result<String> {
    let fractions = [("100", 1.0), ("70", 0.7), ("40", 0.4)];
    let policies = ["none", "reap", "union"];
    let inputs: Vec<u64> = (201..=210).collect();
    let bar = progress((fractions.len() * (1 + policies.len() * inputs.len())) as u64, "3: working-set stability");
    let mut csv = String::from("shared_percent,policy,invocation,input,ms,faults\n");
    let mut md = String::from("## 3. Working-set stability\n\n");
    md += "python-like guest; five inputs recorded with `uffd-server record` (REAP uses the first run, union all five), then ten new inputs, each restored fresh. `union` serves with online refinement: the set keeps learning from every VM. Cells: median ms of the ten first invocations (median demand faults the server served).\n\n| shared | none | reap | union | reap / union | none / union |\n|---|---|---|---|---|---|\n";
    let mut plotted: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (label, fraction) in fractions {
        let snapshot = work.join(format!("stab-{label}"));
        let fraction_arg = fraction.to_string();
        run_binary(
            "vmm-shim",
            &["snapshot", "--workload", "python-like", "--shared-fraction", &fraction_arg, "--out", path(&snapshot)],
        )?;
        let ws = work.join(format!("stab-{label}.ws"));
        record(&snapshot, &ws)?;
        bar.inc(1);
        let mut medians = Vec::new();
        for policy in policies {
            let learned = ws.with_extension(policy);
            std::fs::copy(&ws, &learned)?;
            let args = ["--working-set", path(&learned), "--prefetch", policy];
            let server = ServerProcess::start(&[("vm", &snapshot.join("mem"))], &args);
            let (mut times, mut faults, mut points) = (Vec::new(), Vec::new(), Vec::new());
            for (i, &input) in inputs.iter().enumerate() {
                let report = restore(
                    &snapshot,
                    &["--mem-backend", "uffd", "--uffd-socket", path(&server.socket("vm"))],
                    &[input],
                )?;
                let (_, done, _, _) = timings(&report);
                // Union learns from each VM when it ends: let the merge land before the next.
                server.wait_for_log("VM ended", i + 1);
                // Demand faults as the server counted them (getrusage does not see faults
                // resolved through a userfaultfd: the kernel does not account retried faults).
                let f = server.stats().vms.get(i).map_or(f64::NAN, |vm| vm.counters.faults as f64);
                writeln!(csv, "{label},{policy},{},{input},{done:.3},{f}", i + 1)?;
                times.push(done);
                faults.push(f);
                points.push(((i + 1) as f64, done));
                bar.inc(1);
            }
            medians.push((median(times), median(faults)));
            plotted.push((format!("{policy}, {label}% shared"), points));
        }
        let (n, r, u) = (medians[0], medians[1], medians[2]);
        writeln!(
            md,
            "| {label}% | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.2}× | {:.2}× |",
            n.0,
            n.1,
            r.0,
            r.1,
            u.0,
            u.1,
            r.0 / u.0,
            n.0 / u.0
        )?;
    }
    bar.finish();
    std::fs::write(out.join("stability.csv"), &csv)?;
    plot(
        &out.join("stability.png"),
        "First-invocation time of ten new inputs",
        "invocation",
        "ms (log scale)",
        &plotted,
    )?;
    md += "\n![stability](stability.png)\n";
    Ok(md)
}

/// A line plot of `series` with a logarithmic y axis (from 0.2 ms to 2 s in one figure).
fn plot(file: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter()).filter(|p| p.1.is_finite() && p.1 > 0.0);
    let (x_max, y_max) = points().fold((1.0f64, 1.0f64), |(x, y), &(px, py)| (x.max(px), y.max(py)));
    let y_min = points().map(|p| p.1).fold(f64::INFINITY, f64::min).clamp(0.01, y_max);
    let root = BitMapBackend::new(file, (960, 600)).into_drawing_area();
    root.fill(&WHITE).context("plot")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max * 1.05, (y_min * 0.8..y_max * 1.25).log_scale())
        .context("plot")?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().context("plot")?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .context("plot")?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).context("plot")?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("plot")?;
    root.present().context("plot")?;
    Ok(())
}
