//! Experiment 2: the snapshot held in memory by the server vs read from disk on demand (page
//! cache dropped), with and without a loading-set file; Firecracker's File backend as well.

use crate::harness::{drop_caches, path, record, restore, server, snapshot, uffd_args, MEASURED};
use crate::report::{bar_plot, progress, Labels};
use anyhow::Result;
use benches::median;
use e2e::server_process::run_binary;
use std::fmt::Write as _;
use std::path::Path;

const SHARED: [(&str, f64); 2] = [("100", 1.0), ("70", 0.7)];

pub fn run(work: &Path, out: &Path) -> Result<String> {
    let bar = progress(SHARED.len() * (1 + CONFIGS.len() * MEASURED.len()), "2: in-memory vs on-disk");
    let mut dropped = true;
    let mut csv = String::from("shared_percent,config,input,first_done_ms\n");
    let mut medians = Vec::new(); // per share: (config, median ms)
    for (label, fraction) in SHARED {
        let rows = measure_share(work, (label, fraction), &mut csv, &mut dropped, &bar)?;
        medians.push((label, rows));
    }
    bar.finish();
    std::fs::write(out.join("disk.csv"), &csv)?;
    let bars: Vec<(String, f64)> = medians
        .iter()
        .flat_map(|(label, rows)| rows.iter().map(move |(c, ms)| (format!("{c}, {label}%"), *ms)))
        .collect();
    let labels = Labels {
        title: "In-memory vs on-disk snapshot: ms to the first invocation's DONE",
        x: "ms (median of three new inputs)",
        y: "configuration, working set shared",
    };
    bar_plot(&out.join("disk.png"), &labels, &bars)?;

    let mut md = String::from("## 2. In-memory vs on-disk snapshot\n\n");
    md += "python-like guest with a stable (100% shared) and a shifting (70%) working set; five inputs recorded, three new inputs measured (medians), ms from the start of the restore to the first invocation's DONE. ";
    md += if dropped {
        "The page cache was dropped before every on-disk and File-backend restore.\n\n"
    } else {
        "**The page cache could not be dropped (not root): on-disk figures are from a warm cache.**\n\n"
    };
    md += "| configuration | 100% shared | 70% shared |\n|---|---|---|\n";
    for (i, (config, _)) in CONFIGS.iter().enumerate() {
        writeln!(md, "| {config} | {:.1} | {:.1} |", medians[0].1[i].1, medians[1].1[i].1)?;
    }
    md += "\n| ratio | 100% shared | 70% shared | reference |\n|---|---|---|---|\n";
    let ratios: [(&str, &str, &str, &str); 4] = [
        ("in-memory vs on-disk (both union)", "on-disk, union", "in-memory, union", "SnapFaaS: ≥ 2×"),
        ("on disk: loading set vs none", "on-disk, none", "on-disk, union + loading set", "FaaSnap: up to 3.5×"),
        ("on disk: loading set vs union without it", "on-disk, union", "on-disk, union + loading set", ""),
        ("in-memory union vs the File backend", "File backend (Firecracker)", "in-memory, union", ""),
    ];
    for (name, slower, faster, reference) in ratios {
        write!(md, "| {name} |")?;
        for (_, rows) in &medians {
            let get = |n: &str| rows.iter().find(|(c, _)| *c == n).map_or(f64::NAN, |r| r.1);
            write!(md, " {:.2}× |", get(slower) / get(faster))?;
        }
        writeln!(md, " {reference} |")?;
    }
    md += "\n![in-memory vs on-disk](disk.png)\n\n";
    Ok(md)
}

/// How a configuration restores: from a server (prefetch policy, snapshot on disk or in
/// memory, with the loading set or not), or from the memory file directly (the File backend).
enum Restore {
    Server { policy: &'static str, on_disk: bool, loading_set: bool },
    FileBackend,
}

const CONFIGS: [(&str, Restore); 5] = [
    ("in-memory, union", Restore::Server { policy: "union", on_disk: false, loading_set: false }),
    ("on-disk, none", Restore::Server { policy: "none", on_disk: true, loading_set: false }),
    ("on-disk, union", Restore::Server { policy: "union", on_disk: true, loading_set: false }),
    ("on-disk, union + loading set", Restore::Server { policy: "union", on_disk: true, loading_set: true }),
    ("File backend (Firecracker)", Restore::FileBackend),
];

/// Every configuration for one working-set share: (configuration, median ms).
fn measure_share(
    work: &Path,
    (label, fraction): (&str, f64),
    csv: &mut String,
    dropped: &mut bool,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<(&'static str, f64)>> {
    let snapshot = snapshot(work.join(format!("disk-{label}")), &["--shared-fraction", &fraction.to_string()])?;
    let mem = snapshot.join("mem");
    let ws = work.join(format!("disk-{label}.ws"));
    record(&snapshot, &ws)?;
    let ls = work.join(format!("disk-{label}.ls"));
    run_binary(
        "uffd-server",
        &["loading-set", "--snapshot", path(&mem), "--working-set", path(&ws), "--out", path(&ls)],
    )?;
    bar.inc(1);
    let mut rows = Vec::new();
    for (name, config) in &CONFIGS {
        let mut done = Vec::new();
        for input in MEASURED {
            let timed = match config {
                Restore::FileBackend => {
                    *dropped &= drop_caches();
                    restore(&snapshot, &["--mem-backend", "file"], &[input])?
                }
                &Restore::Server { policy, on_disk, loading_set } => {
                    let mut options = vec!["--snapshot-storage", if on_disk { "disk" } else { "memory" }];
                    if loading_set {
                        options.extend(["--loading-set", path(&ls)]);
                    }
                    // In memory: the server has loaded the snapshot before any VM comes (it is
                    // long-running); on disk: nothing of it is cached.
                    let server = server(&snapshot, &ws, policy, &options)?;
                    if on_disk {
                        *dropped &= drop_caches();
                    }
                    restore(&snapshot, &uffd_args(&server), &[input])?
                }
            };
            writeln!(csv, "{label},{name},{input},{:.3}", timed.first_done)?;
            done.push(timed.first_done);
            bar.inc(1);
        }
        rows.push((*name, median(&done)));
    }
    Ok(rows)
}
