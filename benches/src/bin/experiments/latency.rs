//! Experiment 1: restore latency vs VM memory size.

use crate::harness::{measure, record, snapshot, CONFIGS, MEASURED};
use crate::report::{line_plot, progress, push_point, Labels, Series};
use anyhow::Result;
use benches::median;
use std::fmt::Write as _;
use std::path::Path;

pub fn run(sizes: &[u64], work: &Path, out: &Path) -> Result<String> {
    let bar = progress(sizes.len() * (1 + CONFIGS.len() * MEASURED.len()), "1: latency vs VM size");
    let mut csv = String::from("mem_mib,config,first_instruction_ms,first_done_ms,warm_ms\n");
    let mut series = Series::new(); // config → (MiB, first DONE ms)
    let mut table = String::new();
    for &mib in sizes {
        let snapshot = snapshot(work.join(format!("py-{mib}")), &["--mem-mib", &mib.to_string()])?;
        let ws = work.join(format!("py-{mib}.ws"));
        record(&snapshot, &ws)?;
        bar.inc(1);
        let mut warm = Vec::new();
        let mut row = Vec::new();
        for config in CONFIGS {
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
        for (_, r, d) in &row {
            write!(table, " {r:.1} / {d:.1} |")?;
        }
        let (union, none, reap) = (done_of("uffd union"), done_of("uffd none"), done_of("uffd reap"));
        writeln!(table, " {w:.1} | {:.2}× | {:.2}× | {:.2}× |", none / union, reap / union, done_of("copy") / union)?;
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
    md += "python-like guest (37 MiB heap, 4096-page working set, 70% shared, no compute). Per size: five inputs recorded, three new inputs measured (medians). Cells: ms from the start of the restore to the first guest instruction / to the first invocation's DONE. warm: the same input invoked again, all memory resident (invocation only).\n\n";
    md += "| MiB | copy | file | uffd none | uffd reap | uffd union | warm | none / union | reap / union | copy / union |\n|---|---|---|---|---|---|---|---|---|---|\n";
    md += &table;
    writeln!(
        md,
        "\nGrowth from the smallest to the largest size (first DONE): copy {:.2}×, file {:.2}×, none {:.2}×, reap {:.2}×, union {:.2}× (goal for union: ≤ 1.2×).\n\n![latency vs size](latency_vs_size.png)\n",
        growth("copy"),
        growth("file"),
        growth("uffd none"),
        growth("uffd reap"),
        growth("uffd union")
    )?;
    Ok(md)
}
