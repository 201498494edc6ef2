//! Per-fault service time of uffd-server against the raw floor, in one run.
//!
//! The floor is the least any userfaultfd handler can do: a thread in a blocking `read` on the
//! uffd that answers each fault with one UFFDIO_COPY from memory. Both handlers serve the same
//! random (no zero page) snapshot to the same faulting thread, which touches each 4 KiB page
//! once and times every touch; rounds alternate so that machine noise hits both alike.
//! The server runs with `--fault-around 1`, so both place exactly one page per fault.
//!
//! Run: `./x bench --bench fault_path` (or `cargo bench -p benches --bench fault_path`).

use e2e::fake_vmm::{FakeVmm, GuestMemory, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::time::{Duration, Instant};
use userfaultfd::{Event, UffdBuilder};

const PAGES: usize = 4096; // 16 MiB per round
const ROUNDS: usize = 7;

/// Touches every page once, returning the time of each touch.
fn touch_timed(memory: &GuestMemory) -> Vec<Duration> {
    memory
        .page_addrs()
        .map(|addr| {
            let start = Instant::now();
            e2e::fake_vmm::touch(addr, false);
            start.elapsed()
        })
        .collect()
}

/// The floor: blocking read + one UFFDIO_COPY per fault, on a thread of this process.
fn raw_round(snapshot: &[u8]) -> Vec<Duration> {
    let memory = GuestMemory::map(&[snapshot.len()], 0, false).expect("map");
    let uffd = UffdBuilder::new().close_on_exec(true).user_mode_only(false).create().expect("uffd");
    let region = memory.regions[0];
    uffd.register(region.addr as *mut _, region.size).expect("register");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..PAGES {
                let Ok(Some(Event::Pagefault { addr, .. })) = uffd.read_event() else {
                    panic!("unexpected uffd event")
                };
                let page = addr as usize & !(PAGE - 1);
                let offset = page - region.addr;
                // SAFETY: `page` is a missing page of a region registered on `uffd`; the source
                // is a live 4 KiB slice of the snapshot.
                unsafe { uffd.copy(snapshot[offset..].as_ptr().cast(), page as *mut _, PAGE, true) }.expect("copy");
            }
        });
        touch_timed(&memory)
    })
}

/// The product: the same pages served by the uffd-server process.
fn server_round(server: &ServerProcess, len: usize) -> Vec<Duration> {
    // FakeVmm waits for the server to let go of the VM before its memory is unmapped.
    let vmm = FakeVmm::attach_layout(&server.socket("bench"), &[len], 0, false).expect("attach");
    touch_timed(&vmm.memory)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
}

fn main() {
    e2e::require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = SnapshotFile::random(dir.path(), "bench.mem", PAGES * PAGE, 0.0, 42);
    let server = ServerProcess::start(&[("bench", &snapshot.path)], &["--fault-around", "1"]);
    let (mut raw, mut served) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        raw.extend(raw_round(&snapshot.bytes));
        served.extend(server_round(&server, snapshot.bytes.len()));
        eprintln!("round {}/{ROUNDS} done", round + 1);
    }
    raw.sort();
    served.sort();
    let (raw50, raw99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
    let (srv50, srv99) = (percentile(&served, 0.5), percentile(&served, 0.99));
    println!("fault_path: {} faults per handler, 4 KiB COPY each, {ROUNDS} alternating rounds", raw.len());
    println!("| handler | p50 µs | p99 µs |");
    println!("|---|---|---|");
    println!("| raw blocking read + UFFDIO_COPY (floor) | {raw50:.2} | {raw99:.2} |");
    println!("| uffd-server (poll + read, --fault-around 1) | {srv50:.2} | {srv99:.2} |");
    println!("| ratio server / floor | {:.3}× | {:.3}× |", srv50 / raw50, srv99 / raw99);
}
