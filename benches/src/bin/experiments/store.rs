//! Experiment 6: the chunk store, on real runtime memory (`vmm-shim snapshot --workload
//! python-image|node-image`: guest heaps made of a real `python3`/`node` process's memory,
//! each function a different import set and app on the runtime's layout; docs/vmm-shim.md).
//!
//! a. Dedup and compression against chunk size, 4 KiB … 2 MiB (in this process, with the
//!    store's own hash and codecs), and decompression speed per codec.
//! b. Density: the RAM a server holds for 1 runtime + 20 functions, from the store and from
//!    the memory files, and what each added function costs.
//! c. The fault path from the store (LZ4 in RAM, and raw) against the memory file and the raw
//!    loop, 4 KiB and 64 KiB faults; prefetch bandwidth from the store against the ceiling.
//! d. Restore (union, first DONE) from the store against the memory file.

use crate::harness::{self, path, proc_memory, record, restore, uffd_args, MEASURED};
use crate::report::{bar_plot, line_plot, progress, Labels, Series};
use anyhow::{Context, Result};
use benches::{bandwidth, fault_path, median, percentile};
use e2e::server_process::{import_to_store, run_binary, ServerProcess};
use e2e::snapshot_file::SnapshotFile;
use snapstore::chunk::{compress, decompress_into};
use snapstore::{ChunkId, Codec};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const CHUNK_SIZES: [usize; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];
const PAGE: usize = 4096;
const CHUNK_AXIS: &str = "chunk size, log2 KiB (2 = 4 KiB, 6 = 64 KiB, 11 = 2 MiB)";

/// `vmm-shim snapshot` of `workload` function `function`: its memory file.
fn image(work: &Path, workload: &str, function: u16) -> Result<PathBuf> {
    let dir = work.join(format!("{workload}-{function}"));
    if !dir.join("mem").exists() {
        let f = function.to_string();
        run_binary("vmm-shim", &["snapshot", "--workload", workload, "--function", &f, "--out", path(&dir)])?;
    }
    Ok(dir.join("mem"))
}

pub fn run(work: &Path, out: &Path) -> Result<String> {
    let bar = progress(31 + 4, "6: chunk store");
    let mut python = Vec::new();
    for function in 0..=20 {
        python.push(image(work, "python-image", function)?);
        bar.inc(1);
    }
    let mut mixed: Vec<PathBuf> = python[..10].to_vec();
    for function in 0..10 {
        mixed.push(image(work, "node-image", function)?);
        bar.inc(1);
    }
    let mut md = String::from("## 6. Chunk store: dedup, compression, density, fault path\n\n");
    md += "Data sets (how they are made: docs/vmm-shim.md): **python 1+20** is `python-image` functions 0 (the bare runtime) to 20; **python+node 10+10** is `python-image` 0–9 and `node-image` 0–9. Each is a 128 MiB (python) or 256 MiB (node) guest whose heap is a real process's memory.\n\n";
    md += &chunk_sizes(&[("python 1+20", &python), ("python+node 10+10", &mixed)], out)?;
    bar.inc(1);
    md += &codec_speed(&python)?;
    md += "### 6b. Density: a runtime and its functions in one server\n\nEach server serves every snapshot of the set, all loaded. **held**: what the server counts as snapshot RAM (memory files: their non-zero pages; store: its chunk pool, each chunk once). **RSS growth**: the server's VmRSS minus that of a server holding one 1 MiB snapshot (manifests, zero-page indexes and allocator slack included). **added function**: the bytes a function's import wrote, as a fraction of what the runtime's (the set's first) wrote.\n\n";
    let mut held = Vec::new();
    md += &density(work, "python 1+20", &python, &mut held)?;
    md += &density(work, "python+node 10+10", &mixed, &mut held)?;
    let labels = Labels { title: "RAM a server holds for all the snapshots of a set", x: "MiB", y: "" };
    bar_plot(&out.join("store_density.png"), &labels, &held)?;
    md += "![density](store_density.png)\n\n";
    bar.inc(1);
    md += &fault_path(work, &python, out)?;
    bar.inc(1);
    md += &restore_from_store(work)?;
    bar.inc(1);
    bar.finish();
    Ok(md)
}

/// Bytes of one data set at one chunk size.
#[derive(Default, Clone, Copy)]
struct Sizes {
    data: u64,
    unique: u64,
    lz4: u64,
    zstd: u64,
    chunks: u64,
}

/// Non-zero pages' bytes of `file`, read a chunk at a time.
fn for_each_chunk(file: &Path, chunk: usize, mut f: impl FnMut(&[u8])) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    for piece in bytes.chunks(chunk) {
        if !snapstore::is_zero(piece) {
            f(piece);
        }
    }
    Ok(())
}

fn measure_sizes(files: &[PathBuf], chunk: usize) -> Result<Sizes> {
    let mut seen = HashSet::new();
    let mut sizes = Sizes::default();
    for file in files {
        for_each_chunk(file, chunk, |piece| {
            sizes.chunks += 1;
            sizes.data += piece.chunks(PAGE).filter(|p| !snapstore::is_zero(p)).count() as u64 * PAGE as u64;
            if seen.insert(ChunkId::of(piece)) {
                let stored = |codec| compress(piece, codec).map_or(piece.len(), |c| c.len().min(piece.len())) as u64;
                sizes.unique += piece.len() as u64;
                sizes.lz4 += stored(Codec::Lz4);
                sizes.zstd += stored(Codec::Zstd);
            }
        })?;
    }
    Ok(sizes)
}

fn chunk_sizes(sets: &[(&str, &[PathBuf])], out: &Path) -> Result<String> {
    let mut md = String::from("### 6a. Chunk size\n\nPer data set and chunk size: the non-zero pages' bytes (**data**), the distinct non-zero chunks' bytes (**unique**, chunks that are all zero are not stored), and those chunks compressed one by one. Manifest: 32 bytes per chunk of every snapshot (zero chunks included).\n\n");
    md += "| data set | chunk | data MiB | unique MiB | dedup | zstd MiB | LZ4 MiB | zstd ratio | LZ4 ratio | data / (zstd + manifests) |\n|---|---|---|---|---|---|---|---|---|---|\n";
    let mut csv = String::from("set,chunk_kib,data,unique,lz4,zstd,manifest\n");
    let mut series = Series::new();
    for (name, files) in sets {
        let mut points = Vec::new();
        for chunk in CHUNK_SIZES {
            let s = measure_sizes(files, chunk)?;
            let manifests: u64 =
                files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len()) / chunk as u64 * 32).sum();
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            let overall = s.data as f64 / (s.zstd + manifests) as f64;
            writeln!(
                md,
                "| {name} | {} KiB | {:.1} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.2}× | {:.2}× | **{overall:.2}×** |",
                chunk >> 10,
                mib(s.data),
                mib(s.unique),
                s.data as f64 / s.unique as f64,
                mib(s.zstd),
                mib(s.lz4),
                s.unique as f64 / s.zstd as f64,
                s.unique as f64 / s.lz4 as f64,
            )?;
            writeln!(csv, "{name},{},{},{},{},{},{manifests}", chunk >> 10, s.data, s.unique, s.lz4, s.zstd)?;
            points.push((f64::from((chunk >> 10).trailing_zeros()), overall));
        }
        series.push((name.to_string(), points));
    }
    std::fs::write(out.join("store_chunk_size.csv"), csv)?;
    let labels = Labels {
        title: "Store reduction vs chunk size: data / (zstd chunks + manifests)",
        x: CHUNK_AXIS,
        y: "× (log scale)",
    };
    line_plot(&out.join("store_chunk_size.png"), &labels, &series)?;
    md += "\n![chunk size](store_chunk_size.png)\n\n";
    Ok(md)
}

/// Decompression speed of the python set's 64 KiB chunks, per codec.
fn codec_speed(files: &[PathBuf]) -> Result<String> {
    let mut pieces = Vec::new();
    let mut seen = HashSet::new();
    for file in &files[..4] {
        for_each_chunk(file, 64 << 10, |piece| {
            if piece.len() == 64 << 10 && seen.insert(ChunkId::of(piece)) {
                pieces.push(piece.to_vec());
            }
        })?;
    }
    let mut md = String::from("Decompression of distinct 64 KiB chunks of python 1+20 (functions 0–3), one core, median of 5 passes:\n\n| codec | ratio | decompress GB/s | µs per 64 KiB chunk |\n|---|---|---|---|\n");
    let mut out = vec![0u8; 64 << 10];
    for codec in [Codec::Lz4, Codec::Zstd] {
        let packed: Vec<Vec<u8>> = pieces.iter().map(|p| compress(p, codec).unwrap_or_default()).collect();
        let ratio = (pieces.len() * (64 << 10)) as f64 / packed.iter().map(Vec::len).sum::<usize>() as f64;
        let mut passes = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for p in &packed {
                decompress_into(codec, p, &mut out).context("decompress")?;
            }
            passes.push(start.elapsed().as_secs_f64());
        }
        let secs = median(&passes);
        let bytes = (packed.len() * (64 << 10)) as f64;
        writeln!(
            md,
            "| {codec:?} | {ratio:.2}× | {:.2} | {:.1} |",
            bytes / secs / 1e9,
            secs * 1e6 / packed.len() as f64
        )?;
    }
    md += "\n";
    Ok(md)
}

fn import(store: &Path, name: &str, memfile: &Path) -> Result<u64> {
    let said = import_to_store(store, name, memfile)?;
    let written = said.rsplit(" new, ").next().and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok());
    written.context("import did not say what it wrote")
}

/// The density tables of one data set; pushes the RAM each server held onto `held` (MiB).
fn density(work: &Path, set: &str, files: &[PathBuf], held: &mut Vec<(String, f64)>) -> Result<String> {
    let store = work.join(format!("density-store-{}", set.replace(['+', ' '], "-")));
    let written: Vec<u64> =
        files.iter().enumerate().map(|(i, file)| import(&store, &format!("fn{i}"), file)).collect::<Result<_>>()?;
    let stats = snapstore::maintain::stats(&snapstore::store::Store::open(&store)?)?;
    let names: Vec<(String, &Path)> = files.iter().enumerate().map(|(i, f)| (format!("fn{i}"), f.as_path())).collect();
    let named: Vec<(&str, &Path)> = names.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    let baseline = SnapshotFile::random(work, "tiny.mem", 1 << 20, 0.0, 7);
    let measure = |server: &ServerProcess| -> Result<(u64, u64)> {
        Ok((server.stats().snapshot_resident_bytes, proc_memory(server.pid(), "VmRSS")?))
    };
    let (_, base_rss) = measure(&ServerProcess::start(&[("tiny", &baseline.path)], &[]))?;
    let (raw_held, raw_rss) = measure(&ServerProcess::start(&named, &[]))?;
    let (store_held, store_rss) = measure(&ServerProcess::start_store(&store, &[]))?;
    let (flat_held, flat_rss) = measure(&ServerProcess::start_store(&store, &["--store-ram-codec", "none"]))?;
    let apparent: u64 = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut md =
        format!("**{set}**\n\n| server | held MiB | RSS growth MiB | vs memory files (held) |\n|---|---|---|---|\n");
    writeln!(
        md,
        "| memory files (sum of their sizes: {:.0} MiB) | {:.1} | {:.1} | 1.00× |",
        mib(apparent),
        mib(raw_held),
        mib(raw_rss.saturating_sub(base_rss))
    )?;
    for (name, held, rss) in
        [("store, LZ4 in RAM (default)", store_held, store_rss), ("store, chunks raw in RAM", flat_held, flat_rss)]
    {
        writeln!(
            md,
            "| {name} | {:.1} | {:.1} | {:.3}× |",
            mib(held),
            mib(rss.saturating_sub(base_rss)),
            held as f64 / raw_held as f64
        )?;
    }
    for (name, bytes) in [("memory files", raw_held), ("store, LZ4", store_held), ("store, raw chunks", flat_held)] {
        held.push((format!("{set}: {name}"), mib(bytes)));
    }
    let runtime = written[0] as f64;
    let added: Vec<f64> = written[1..].iter().map(|&w| w as f64 / runtime).collect();
    writeln!(
        md,
        "\nStore on disk (zstd): {:.1} MiB for {:.1} MiB of non-zero pages ({:.2}× dedup, {:.2}× compression of the distinct chunks). An added function costs **{:.0}%** of the first snapshot's stored bytes at the median (max {:.0}%). Goal: RAM held ≤ distinct compressed bytes + 5%: the pool holds {:.1} MiB (LZ4), the server's RSS grew **{:.2}×** that.\n\n",
        mib(stats.total.stored),
        mib(stats.total.data),
        stats.total.data as f64 / stats.total.unique as f64,
        stats.total.unique as f64 / stats.total.stored as f64,
        median(&added) * 100.0,
        added.iter().copied().fold(0.0, f64::max) * 100.0,
        mib(store_held),
        store_rss.saturating_sub(base_rss) as f64 / store_held as f64
    )?;
    Ok(md)
}

/// A memory file of only non-zero pages of the python images (real content), `pages` long.
fn data_pages_file(work: &Path, python: &[PathBuf], pages: usize) -> Result<SnapshotFile> {
    let mut bytes = Vec::with_capacity(pages * PAGE);
    'files: for file in python {
        let all = std::fs::read(file)?;
        for page in all.chunks(PAGE).filter(|p| !snapstore::is_zero(p)) {
            if bytes.len() >= pages * PAGE {
                break 'files;
            }
            bytes.extend_from_slice(page);
        }
    }
    bytes.resize(pages * PAGE, 1);
    Ok(SnapshotFile::from_bytes(work, "runtime-data.mem", bytes))
}

fn fault_path(work: &Path, python: &[PathBuf], out: &Path) -> Result<String> {
    let snapshot = data_pages_file(work, python, 4096)?;
    let store = work.join("fault-store");
    import(&store, "bench", &snapshot.path)?;
    let len = snapshot.bytes.len();
    let mut md = String::from("### 6c. Fault path and prefetch from the store\n\nOne thread touches the pages of a 16 MiB memory file made of the python images' non-zero pages (real content), served by the raw loop (4 KiB only), `uffd-server` from the memory file, and from the store with chunks LZ4 in RAM or raw (LZ4: the first VM's faults decompress and keep a plain copy of each chunk they use, the later VMs' find it); 4 KiB faults (`--fault-around 1`, every page) and 64 KiB faults (`--fault-around 16`, the first page of each 64 KiB); 5 alternating rounds.\n\n| fault | raw loop p50 µs | memory file p50 µs | store raw p50 µs | store LZ4 p50 µs | **LZ4 / memory file** | LZ4 / store raw | LZ4 p99 µs | LZ4, first VM only: p50 µs (vs store raw) |\n|---|---|---|---|---|---|---|---|---|\n");
    let mut series = Series::new();
    for (label, around, stride) in [("4 KiB", "1", 1), ("64 KiB", "16", 16)] {
        let file = ServerProcess::start(&[("bench", &snapshot.path)], &["--fault-around", around]);
        let flat = ServerProcess::start_store(&store, &["--fault-around", around, "--store-ram-codec", "none"]);
        let lz4 = ServerProcess::start_store(&store, &["--fault-around", around]);
        let (mut raw, mut f, mut r, mut l) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut first_vm = Vec::new();
        for round in 0..5 {
            if stride == 1 {
                raw.extend(fault_path::raw_round(&snapshot.bytes, fault_path::Placement::Unpinned)?);
            }
            f.extend(fault_path::server_round(&file, "bench", len, stride, fault_path::Placement::Unpinned)?);
            r.extend(fault_path::server_round(&flat, "bench", len, stride, fault_path::Placement::Unpinned)?);
            let times = fault_path::server_round(&lz4, "bench", len, stride, fault_path::Placement::Unpinned)?;
            if round == 0 {
                first_vm.clone_from(&times);
            }
            l.extend(times);
        }
        let p50 = median;
        let raw_p50 = if raw.is_empty() { "–".into() } else { format!("{:.2}", p50(&raw)) };
        writeln!(
            md,
            "| {label} | {raw_p50} | {:.2} | {:.2} | {:.2} | **{:.3}×** | {:.3}× | {:.1} | {:.2} ({:.2}×) |",
            p50(&f),
            p50(&r),
            p50(&l),
            p50(&l) / p50(&f),
            p50(&l) / p50(&r),
            percentile(&l, 0.99),
            p50(&first_vm),
            p50(&first_vm) / p50(&r)
        )?;
        if stride == 16 {
            for (name, values) in [("memory file", &f), ("store raw", &r), ("store LZ4", &l)] {
                series.push((
                    format!("{name}, 64 KiB"),
                    (1..=99).map(|p| (f64::from(p), percentile(values, f64::from(p) / 100.0))).collect(),
                ));
            }
        }
    }
    let labels =
        Labels { title: "Per-fault service time, 64 KiB faults, real content", x: "percentile", y: "µs (log scale)" };
    line_plot(&out.join("store_fault_path.png"), &labels, &series)?;
    md += "\nGoal: store ≤ 1.2× the uncompressed store at p50.\n\n![store fault path](store_fault_path.png)\n\n";
    let setup = bandwidth::Setup::of(work, data_pages_file(work, python, 16384)?);
    let bw_store = work.join("bandwidth-store");
    import(&bw_store, "bench", &setup.snapshot.path)?;
    let from_store = ["--store", path(&bw_store), "--snapshot", "bench"];
    let from_flat_store = ["--store", path(&bw_store), "--snapshot", "bench", "--store-ram-codec", "none"];
    setup.server_prefetch(16)?; // warm-up, discarded
    let (mut ceiling, mut file, mut stored, mut flat) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        ceiling.push(setup.bulk_copy_ceiling(64 << 10)?.max(setup.bulk_copy_ceiling(2 << 20)?));
        file.push(setup.server_prefetch(16)?.0 .0);
        stored.push(setup.server_prefetch_from(16, &from_store)?.0 .0);
        flat.push(setup.server_prefetch_from(16, &from_flat_store)?.0 .0);
    }
    let c = median(&ceiling);
    let share = |v: &[f64]| format!("{:.2} GB/s (**{:.0}%**)", median(v), median(v) / c * 100.0);
    writeln!(
        md,
        "Prefetch placing a 64 MiB working set of real content (every page, 64 KiB batches), 3 rounds, medians: ceiling {c:.2} GB/s; from the memory file {}; from the store, LZ4 in RAM (the plan's chunks decompressed at load) {}; from the store, chunks raw in RAM {}. Goal: ≥ 80% of the ceiling.\n",
        share(&file),
        share(&stored),
        share(&flat)
    )?;
    Ok(md)
}

fn restore_from_store(work: &Path) -> Result<String> {
    let snapshot = work.join("python-image-5");
    let ws = work.join("store-restore.ws");
    record(&snapshot, &ws)?;
    let store = work.join("restore-store");
    import(&store, "vm", &snapshot.join("mem"))?;
    let (mut file, mut stored, mut flat) = (Vec::new(), Vec::new(), Vec::new());
    let from_store = |input: u64, ram_codec: &str| -> Result<f64> {
        let copy = ws.with_extension("store-copy");
        std::fs::copy(&ws, &copy)?;
        let args = ["--store", path(&store), "--snapshot", "vm", "--working-set", path(&copy), "--prefetch", "union"];
        let server = ServerProcess::start(&[], &[&args[..], &["--store-ram-codec", ram_codec]].concat());
        Ok(restore(&snapshot, &uffd_args(&server), &[input])?.first_done)
    };
    for _ in 0..3 {
        for &input in &MEASURED {
            let server = harness::server(&snapshot, &ws, "union", &[])?;
            file.push(restore(&snapshot, &uffd_args(&server), &[input])?.first_done);
            stored.push(from_store(input, "lz4")?);
            flat.push(from_store(input, "none")?);
        }
    }
    let mut md = String::from("### 6d. Restore from the store\n\n`python-image` function 5, working set recorded over 5 inputs, `--prefetch union`, each restore from a fresh server (its first VM), first invocation's DONE from the restore's start; inputs 101–103 three times, alternating between the servers. Pages outside the working set come from chunks that are still compressed (LZ4) and are decompressed on the fault; with chunks raw in RAM they are not:\n\n");
    writeln!(
        md,
        "| source | first DONE ms (median) | vs memory file |\n|---|---|---|\n| memory file | {:.2} | 1.000× |\n| store, LZ4 in RAM (default) | {:.2} | **{:.3}×** |\n| store, chunks raw in RAM | {:.2} | {:.3}× |\n\nGoal: ≤ 1.05×.\n",
        median(&file),
        median(&stored),
        median(&stored) / median(&file),
        median(&flat),
        median(&flat) / median(&file)
    )?;
    Ok(md)
}
