//! The README's main job until the latency experiments land: restore a built-in snapshot
//! through uffd-server and compare with an eager in-memory copy (SnapFaaS) in the same run.
//!
//! The built-in snapshot looks like a Python runtime after init: 128 MiB of guest memory of
//! which the first 37 MiB hold data and the rest is zero. The "invocation" touches every page
//! once from one thread, as a guest that reads its whole memory would.

use e2e::fake_vmm::{touch_pages, FakeVmm, GuestMemory};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const GUEST: usize = 128 * MIB;
const DATA: usize = 37 * MIB;

fn main() {
    e2e::require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = SnapshotFile::random(dir.path(), "data", DATA, 0.0, 7).bytes;
    bytes.resize(GUEST, 0);
    let snapshot = SnapshotFile::from_bytes(dir.path(), "python-like.mem", bytes);
    println!("built-in snapshot: {} MiB guest, {} MiB of data, the rest zero", GUEST / MIB, DATA / MIB);

    // Baseline: SnapFaaS's eager copy of the whole snapshot into fresh memory, then the touch.
    let eager = {
        let start = Instant::now();
        let memory = GuestMemory::map(&[GUEST], 0, false).expect("map");
        // SAFETY: the region is ours, mapped read-write, GUEST bytes long, and not registered
        // with any userfaultfd; no other reference to it exists.
        let dst = unsafe { std::slice::from_raw_parts_mut(memory.regions[0].addr as *mut u8, GUEST) };
        dst.copy_from_slice(&snapshot.bytes);
        let pages: Vec<usize> = memory.page_addrs().collect();
        touch_pages(&pages, 1, false);
        start.elapsed()
    };

    let mut rows = vec![("eager copy (SnapFaaS baseline)".to_string(), eager)];
    for fault_around in ["1", "16"] {
        let server = ServerProcess::start(&[("python-like", &snapshot.path)], &["--fault-around", fault_around]);
        let start = Instant::now();
        let vmm = FakeVmm::attach(&server.socket("python-like"), GUEST).expect("attach");
        vmm.touch_all(1, false);
        let elapsed = start.elapsed();
        vmm.assert_matches(&snapshot.bytes);
        drop(vmm);
        server.wait_for_log("VM ended", 1);
        let c = &server.stats().vms[0].counters;
        println!(
            "uffd-server --fault-around {fault_around:>2}: faults={} copied_pages={} zeropage_pages={} fault p50={}us p99={}us",
            c.faults, c.copied_pages, c.zeropage_pages, c.fault_latency_p50_us, c.fault_latency_p99_us
        );
        rows.push((format!("uffd-server lazy, --fault-around {fault_around}"), elapsed));
    }
    println!("\n| restore + touch all {} MiB | ms | vs eager copy |", GUEST / MIB);
    println!("|---|---|---|");
    for (name, time) in &rows {
        println!("| {name} | {:.1} | {:.2}× |", ms(*time), time.as_secs_f64() / eager.as_secs_f64());
    }
    println!("\nEvery byte of guest memory was checked against the snapshot.");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
