//! Experiment 3: working-set stability. Five inputs recorded, then ten new inputs whose
//! working sets shift (shared fraction 100%, 70%, 40%), each restored fresh: time and demand
//! faults per invocation for none / reap (first recorded run) / union (all runs, and it keeps
//! learning from each VM).

use crate::harness::{record, restore, server, snapshot, uffd_args};
use crate::report::{line_plot, progress, Labels, Series};
use anyhow::Result;
use benches::median;
use std::fmt::Write as _;
use std::path::Path;

pub fn run(work: &Path, out: &Path) -> Result<String> {
    let fractions = [("100", 1.0), ("70", 0.7), ("40", 0.4)];
    let policies = ["none", "reap", "union"];
    let inputs: Vec<u64> = (201..=210).collect();
    let bar = progress(fractions.len() * (1 + policies.len() * inputs.len()), "3: working-set stability");
    let mut csv = String::from("shared_percent,policy,invocation,input,ms,faults,untouched_pages\n");
    let mut waste_md = String::from("\nPlaced but untouched: heap pages in the guest after its first invocation that it never touched (median of the ten; `vmm-shim` counts resident pages with `mincore` against the pages the invocation touched). What a policy costs in memory, fault-around neighbours included (`none` places 64 KiB per fault).\n\n| shared | none | reap | union |\n|---|---|---|---|\n");
    let mut md = String::from("## 3. Working-set stability\n\n");
    md += "python-like guest; five inputs recorded with `uffd-server record` (REAP uses the first run, union all five), then ten new inputs, each restored fresh. `union` serves with online refinement: the set keeps learning from every VM. Cells: median ms from the start of the restore to the first invocation's DONE of the ten (median demand faults the server served).\n\n| shared | none | reap | union | reap / union | none / union |\n|---|---|---|---|---|---|\n";
    let mut plotted = Series::new();
    for (label, fraction) in fractions {
        let snapshot = snapshot(work.join(format!("stab-{label}")), &["--shared-fraction", &fraction.to_string()])?;
        let ws = work.join(format!("stab-{label}.ws"));
        record(&snapshot, &ws)?;
        bar.inc(1);
        let (mut medians, mut wasted) = (Vec::new(), Vec::new());
        for policy in policies {
            let server = server(&snapshot, &ws, policy, &[])?;
            let (mut times, mut faults, mut points, mut untouched) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, &input) in inputs.iter().enumerate() {
                let timed = restore(&snapshot, &uffd_args(&server), &[input])?;
                let done = timed.first_done;
                untouched.push(timed.untouched_pages);
                // Union learns from each VM when it ends: let the merge land before the next.
                server.wait_for_log("VM ended", i + 1);
                // Demand faults as the server counted them (getrusage does not see faults
                // resolved through a userfaultfd: the kernel does not account retried faults).
                let f = server.stats().vms.get(i).map_or(f64::NAN, |vm| vm.counters.faults as f64);
                writeln!(csv, "{label},{policy},{},{input},{done:.3},{f},{}", i + 1, timed.untouched_pages)?;
                times.push(done);
                faults.push(f);
                points.push(((i + 1) as f64, done));
                bar.inc(1);
            }
            medians.push((median(&times), median(&faults)));
            wasted.push(median(&untouched));
            plotted.push((format!("{policy}, {label}% shared"), points));
        }
        let [n, r, u] = [medians[0], medians[1], medians[2]];
        writeln!(waste_md, "| {label}% | {:.0} | {:.0} | {:.0} |", wasted[0], wasted[1], wasted[2])?;
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
    md += &waste_md;
    std::fs::write(out.join("stability.csv"), &csv)?;
    let labels = Labels { title: "First-invocation time of ten new inputs", x: "invocation", y: "ms (log scale)" };
    line_plot(&out.join("stability.png"), &labels, &plotted)?;
    md += "\n![stability](stability.png)\n\n";
    Ok(md)
}
