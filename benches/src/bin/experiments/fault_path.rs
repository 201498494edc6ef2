//! Experiment 4: the fault path. Per-fault service time of uffd-server against a raw
//! blocking-read uffd loop, and prefetch bandwidth against the bulk UFFDIO_COPY ceiling, each
//! in the same run (`benches::fault_path`, `benches::bandwidth`; the benches run more rounds).

use crate::report::{line_plot, progress, Labels, Series};
use anyhow::Result;
use benches::{bandwidth, fault_path, median, percentile};
use std::fmt::Write as _;
use std::path::Path;

/// Faults per handler and round.
const PAGES: usize = 4096;

pub fn run(full: bool, work: &Path, out: &Path) -> Result<String> {
    let (fault_rounds, bandwidth_rounds, mib) = if full { (15, 5, 256) } else { (9, 3, 128) };
    let bar = progress(3 + bandwidth_rounds, "4: fault path, bandwidth");
    let same = fault_path::measure(PAGES, fault_rounds, fault_path::Placement::SameCpu)?;
    bar.inc(1);
    let cross = fault_path::measure(PAGES, fault_rounds, fault_path::Placement::CrossCpu)?;
    bar.inc(1);
    let setup = bandwidth::Setup::new(work, mib);
    // The first server run after big allocations is measured slower whatever its settings (a
    // kernel memory-state effect seen here): one discarded warm-up run.
    setup.server_prefetch(16)?;
    bar.inc(1);
    let mut first_batch_us = Vec::new();
    let mut rows: [(&str, Vec<f64>); 4] = [
        ("bulk UFFDIO_COPY, 64 KiB chunks (ceiling)", vec![]),
        ("bulk UFFDIO_COPY, 2 MiB chunks (ceiling)", vec![]),
        ("uffd-server prefetch, 64 KiB batches (up to 256 KiB per copy while the guest is quiet): placing", vec![]),
        ("uffd-server prefetch: attach to done, planning included", vec![]),
    ];
    for _ in 0..bandwidth_rounds {
        rows[0].1.push(setup.bulk_copy_ceiling(64 << 10)?);
        rows[1].1.push(setup.bulk_copy_ceiling(2 << 20)?);
        let ((placing, end_to_end), first_batch) = setup.server_prefetch(16)?;
        first_batch_us.push(first_batch);
        rows[2].1.push(placing);
        rows[3].1.push(end_to_end);
        bar.inc(1);
    }
    bar.finish();

    let mut csv = String::from("handler,percentile,us\n");
    let mut series = Series::new();
    for (name, values) in [
        ("raw uffd loop, own process, one CPU", &same.raw_process_us),
        ("raw uffd loop, faulting process, one CPU", &same.raw_us),
        ("uffd-server, one CPU", &same.server_us),
        ("raw uffd loop, own process, two CPUs", &cross.raw_process_us),
        ("raw uffd loop, faulting process, two CPUs", &cross.raw_us),
        ("uffd-server, two CPUs", &cross.server_us),
    ] {
        let points: Vec<(f64, f64)> = (1..=99).map(|p| (p as f64, percentile(values, p as f64 / 100.0))).collect();
        for (p, us) in &points {
            writeln!(csv, "{name},{p},{us:.3}")?;
        }
        series.push((name.to_string(), points));
    }
    std::fs::write(out.join("fault_path.csv"), &csv)?;
    let labels = Labels { title: "Per-fault service time, 4 KiB per fault", x: "percentile", y: "µs (log scale)" };
    line_plot(&out.join("fault_path.png"), &labels, &series)?;

    let q = |v: &[f64], p| percentile(v, p);
    let mut md = String::from("## 4. Fault path\n\n");
    writeln!(
        md,
        "One thread touches {PAGES} pages of a random snapshot once each and times every touch, {fault_rounds} alternating rounds ({} faults each), served by:\n\n- the raw loop (blocking `read` + one UFFDIO_COPY per fault) in a process of its own, taking the VM over the same handshake as the server: **the floor** of any memory server;\n- the same loop as a thread of the faulting process, which skips the switch between address spaces no memory server can skip;\n- `uffd-server --fault-around 1`.\n\nThe handler is pinned to CPU 0 and the faulting thread to CPU 0 (one CPU) or CPU 1 (two CPUs): where they run decides the figure, so each placement is its own ratio. Times are pooled over the rounds; each ratio is the median of the rounds' own ratios, since whole rounds fall into faster or slower spells of the machine (across CPUs ~13 or ~18 µs a fault) that slow every handler of the round alike.\n",
        same.raw_us.len()
    )?;
    md += "| placement | handler | p50 µs | p90 µs | p99 µs |\n|---|---|---|---|---|\n";
    for (placement, times) in [("one CPU", &same), ("two CPUs", &cross)] {
        let (floor, thread, srv) = (&times.raw_process_us, &times.raw_us, &times.server_us);
        for (name, v) in
            [("raw loop, own process (floor)", floor), ("raw loop, faulting process", thread), ("uffd-server", srv)]
        {
            writeln!(md, "| {placement} | {name} | {:.2} | {:.2} | {:.2} |", q(v, 0.5), q(v, 0.9), q(v, 0.99))?;
        }
        for (name, a, b) in [
            ("**server / floor**", srv, floor),
            ("floor / raw loop in the faulting process (the address-space switch)", floor, thread),
        ] {
            let [p50, p90, p99] = [0.5, 0.9, 0.99].map(|p| times.ratio(a, b, p));
            writeln!(md, "| {placement} | {name} | {p50:.3}× | {p90:.3}× | {p99:.3}× |")?;
        }
    }
    md += "\nGoal: ≤ 1.1× the floor.\n\n![fault path](fault_path.png)\n\n";
    writeln!(
        md,
        "Prefetch bandwidth: the server prefetching a {mib} MiB working set (every page, nothing touching it) against a bulk UFFDIO_COPY loop over the same bytes; {bandwidth_rounds} rounds after one discarded warm-up, medians.\n"
    )?;
    md += "| copier | GB/s | vs best ceiling |\n|---|---|---|\n";
    let ceiling = median(&rows[0].1).max(median(&rows[1].1));
    for (name, values) in &rows {
        writeln!(md, "| {name} | {:.2} | {:.0}% |", median(values), median(values) / ceiling * 100.0)?;
    }
    writeln!(
        md,
        "\nFrom the VM's attach (handshake validated) to the plan's first batch placed: {:.0} µs (median; the {}-page plan is made when the snapshot loads).\n\nGoals: placing ≥ 90% of the best ceiling, attach to done ≥ 85%.\n",
        median(&first_batch_us),
        (mib << 20) / 4096
    )?;
    Ok(md)
}
