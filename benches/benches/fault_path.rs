//! Per-fault service time of uffd-server against the raw floor, in one run
//! (`benches::fault_path` has the method).
//!
//! Run: `./x bench --bench fault_path` (or `cargo bench -p benches --bench fault_path`).

use benches::{fault_path, percentile};

const PAGES: usize = 4096; // 16 MiB per round
const ROUNDS: usize = 7;

fn main() -> anyhow::Result<()> {
    e2e::require_userfaultfd();
    for (placement, what) in [
        (fault_path::Placement::SameCpu, "handler and faulting thread on one CPU"),
        (fault_path::Placement::CrossCpu, "handler and faulting thread on two CPUs"),
    ] {
        let times = fault_path::measure(PAGES, ROUNDS, placement)?;
        let (raw50, raw99) = (percentile(&times.raw_process_us, 0.5), percentile(&times.raw_process_us, 0.99));
        let (thread50, thread99) = (percentile(&times.raw_us, 0.5), percentile(&times.raw_us, 0.99));
        let (srv50, srv99) = (percentile(&times.server_us, 0.5), percentile(&times.server_us, 0.99));
        println!(
            "fault_path, {what}: {} faults per handler, 4 KiB COPY each, {ROUNDS} alternating rounds",
            times.raw_us.len()
        );
        println!("| handler | p50 µs | p99 µs |");
        println!("|---|---|---|");
        println!("| raw blocking read + UFFDIO_COPY, own process (floor) | {raw50:.2} | {raw99:.2} |");
        println!("| the same, a thread of the faulting process | {thread50:.2} | {thread99:.2} |");
        println!("| uffd-server (--fault-around 1) | {srv50:.2} | {srv99:.2} |");
        let (server, floor) = (&times.server_us, &times.raw_process_us);
        println!(
            "| ratio server / floor (median of the rounds' ratios) | {:.3}× | {:.3}× |\n",
            times.ratio(server, floor, 0.5),
            times.ratio(server, floor, 0.99)
        );
    }
    Ok(())
}
