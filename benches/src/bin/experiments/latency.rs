//! Experiment 1: restore latency vs VM memory size (up to 16 GiB), and the server's start
//! (snapshot load) for a guest of 1 GiB and one of 16 GiB holding the same data.

use crate::harness::{measure, record, snapshot, CONFIGS, MEASURED};
use crate::report::{line_plot, progress, push_point, Labels, Series};
use anyhow::{Context, Result};
use benches::median;
use e2e::server_process::ServerProcess;
use std::fmt::Write as _;
use std::path::Path;

/// The largest guest the eager copy is measured for: it needs the guest's size in RAM and
/// reads it whole (~10 s at 16 GiB here); its growth shows well below that.
const COPY_MAX_MIB: u64 = 4096;

pub fn run(sizes: &[u64], work: &Path, out: &Path) -> Result<String> {
    let bar = progress(sizes.len() * (1 + CONFIGS.len() * MEASURED.len()), "1: latency vs VM size");
    let mut csv = String::from("mem_mib,config,first_instruction_ms,first_done_ms,warm_ms\n");
    let mut series = Series::new(); // config → (MiB, first DONE ms)
    let mut table = String::new();
    // union's first invocation alone (first instruction to DONE), per size.
    let mut union_invocation: Vec<(u64, f64)> = Vec::new();
    for &mib in sizes {
        let snapshot = snapshot(work.join(format!("py-{mib}")), &["--mem-mib", &mib.to_string()])?;
        let ws = work.join(format!("py-{mib}.ws"));
        record(&snapshot, &ws)?;
        bar.inc(1);
        let mut warm = Vec::new();
        let mut row = Vec::new();
        for config in CONFIGS {
            if config == "copy" && mib > COPY_MAX_MIB {
                bar.inc(MEASURED.len() as u64);
                continue;
            }
            let (mut ready, mut done) = (Vec::new(), Vec::new());
            for input in MEASURED {
                let timed = measure(&snapshot, &ws, config, input)?;
                ready.push(timed.first_instruction);
                done.push(timed.first_done);
                warm.push(timed.second_invocation);
                bar.inc(1);
            }
            let (r, d) = (median(&ready), median(&done));
            writeln!(csv, "{mib},{config},{r:.3},{d:.3},")?;
            row.push((config, r, d));
            push_point(&mut series, config, (mib as f64, d));
        }
        let w = median(&warm);
        writeln!(csv, "{mib},warm,,,{w:.3}")?;
        push_point(&mut series, "warm", (mib as f64, w));
        let done_of = |name: &str| row.iter().find(|(c, _, _)| *c == name).map_or(f64::NAN, |x| x.2);
        write!(table, "| {mib} |")?;
        for config in CONFIGS {
            match row.iter().find(|(c, _, _)| *c == config) {
                Some((_, r, d)) => write!(table, " {r:.1} / {d:.1} |")?,
                None => write!(table, " – |")?,
            }
        }
        let (union, none, reap) = (done_of("uffd union"), done_of("uffd none"), done_of("uffd reap"));
        let copy = done_of("copy");
        let copy = if copy.is_nan() { "–".to_string() } else { format!("{:.2}×", copy / union) };
        writeln!(table, " {w:.1} | {:.2}× | {:.2}× | {copy} |", none / union, reap / union)?;
        if let Some(&(_, ready, done)) = row.iter().find(|(c, _, _)| *c == "uffd union") {
            union_invocation.push((mib, done - ready));
        }
    }
    bar.finish();
    std::fs::write(out.join("latency_vs_size.csv"), &csv)?;
    let labels = Labels {
        title: "Time to first invocation DONE vs VM size (python-like)",
        x: "VM memory (MiB)",
        y: "ms (log scale)",
    };
    line_plot(&out.join("latency_vs_size.png"), &labels, &series)?;
    let growth = |c: &str| {
        let points = series.iter().find(|(n, _)| n == c).map(|(_, p)| p.as_slice()).unwrap_or_default();
        points.last().zip(points.first()).map_or(f64::NAN, |(l, f)| l.1 / f.1)
    };
    let mut md = String::from("## 1. Restore latency vs VM memory size\n\n");
    md += "python-like guest (37 MiB heap, 4096-page working set, 70% shared, no compute); the memory above the heap is zeros (holes in the memory file). Per size: five inputs recorded, three new inputs measured (medians). Cells: ms from the start of the restore to the first guest instruction / to the first invocation's DONE (the first instruction includes the VMM's KVM memory slot setup: ~8 ms at 16 GiB here, for every backend). warm: the same input invoked again, all memory resident (invocation only). `copy` is measured up to 4 GiB (it needs the guest's size in RAM).\n\n";
    md += "| MiB | copy | file | uffd none | uffd reap | uffd union | warm | none / union | reap / union | copy / union |\n|---|---|---|---|---|---|---|---|---|---|\n";
    md += &table;
    writeln!(
        md,
        "\nGrowth from the smallest to the largest size (first DONE; copy to the largest it was measured at): copy {:.2}×, file {:.2}×, none {:.2}×, reap {:.2}×, union {:.2}× (goal for union: ≤ 1.2×).\n\n![latency vs size](latency_vs_size.png)\n",
        growth("copy"),
        growth("file"),
        growth("uffd none"),
        growth("uffd reap"),
        growth("uffd union")
    )?;
    if let (Some(first), Some(last)) = (union_invocation.first(), union_invocation.last()) {
        writeln!(
            md,
            "union's first invocation alone (first instruction to DONE), which leaves out the VMM's memory slot setup: {:.1} ms at {} MiB, {:.1} ms at {} MiB: **{:.2}×**.\n",
            first.1,
            first.0,
            last.1,
            last.0,
            last.1 / first.1
        )?;
    }
    md += &load_time(work)?;
    Ok(md)
}

/// Server start (snapshot load) for a 1 GiB and a 16 GiB guest with the same ~900 MiB of
/// data: a load must cost in proportion to the data, not to the guest's size.
fn load_time(work: &Path) -> Result<String> {
    const DATA_MIB: &str = "900";
    const SIZES: [u64; 2] = [1024, 16384];
    const ROUNDS: usize = 3;
    let bar = progress(SIZES.len() * (1 + ROUNDS), "1: snapshot load vs VM size");
    let mut snapshots = Vec::new();
    for mib in SIZES {
        let dir = work.join(format!("data-{mib}"));
        snapshots.push(snapshot(dir, &["--mem-mib", &mib.to_string(), "--init-mib", DATA_MIB])?);
        bar.inc(1);
    }
    let mut loads: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    for _ in 0..ROUNDS {
        for (snapshot, loads) in snapshots.iter().zip(&mut loads) {
            let server = ServerProcess::start(&[("vm", &snapshot.join("mem"))], &[]);
            let ms = server.logged_number("snapshot loaded", "ms").context("the server logged no snapshot load")?;
            loads.push(ms);
            bar.inc(1);
        }
    }
    bar.finish();
    let (small, large) = (median(&loads[0]), median(&loads[1]));
    Ok(format!(
        "Server start: loading the snapshot of a 1 GiB and of a 16 GiB guest holding the same {DATA_MIB} MiB of data (python-like, `--init-mib {DATA_MIB}`; the rest zeros, holes in the file), {ROUNDS} alternating starts, medians: 1 GiB **{small:.0} ms**, 16 GiB **{large:.0} ms**: **{:.2}×** (goal: ≤ 2×).\n\n",
        large / small
    ))
}
