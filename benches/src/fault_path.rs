//! Per-fault service time of uffd-server against the raw floor, in one run.
//!
//! The floor is the least any userfaultfd handler can do: a thread in a blocking `read` on the
//! uffd that answers each fault with one UFFDIO_COPY from memory. Both handlers serve the same
//! random (no zero page) snapshot to the same faulting thread, which touches each 4 KiB page
//! once and times every touch; rounds alternate so that machine noise hits both alike.
//! The server runs with `--fault-around 1`, so both place exactly one page per fault.

use anyhow::{bail, Context, Result};
use e2e::fake_vmm::{FakeVmm, GuestMemory, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::time::Instant;
use userfaultfd::{Event, UffdBuilder};

/// Per-touch times in µs of every round, for each handler.
pub struct FaultTimes {
    pub raw_us: Vec<f64>,
    pub server_us: Vec<f64>,
}

/// `rounds` alternating rounds of `pages` faults for each handler.
pub fn measure(pages: usize, rounds: usize) -> Result<FaultTimes> {
    let dir = tempfile::tempdir()?;
    let snapshot = SnapshotFile::random(dir.path(), "fault-path.mem", pages * PAGE, 0.0, 42);
    let server = ServerProcess::start(&[("bench", &snapshot.path)], &["--fault-around", "1"]);
    let mut times = FaultTimes { raw_us: Vec::new(), server_us: Vec::new() };
    for _ in 0..rounds {
        times.raw_us.extend(raw_round(&snapshot.bytes)?);
        times.server_us.extend(server_round(&server, "bench", snapshot.bytes.len(), 1)?);
    }
    Ok(times)
}

/// One VM attached to snapshot `name` of `server` (`len` bytes, one region) touching every
/// `stride`-th page once: the time of each touch in µs.
pub fn server_round(server: &ServerProcess, name: &str, len: usize, stride: usize) -> Result<Vec<f64>> {
    // FakeVmm waits for the server to let go of the VM before its memory is unmapped.
    let vmm = FakeVmm::attach_layout(&server.socket(name), &[len], 0, false).context("attaching to uffd-server")?;
    Ok(touch_timed_every(&vmm.memory, stride))
}

/// Touches every page once, returning the time of each touch in µs.
fn touch_timed(memory: &GuestMemory) -> Vec<f64> {
    touch_timed_every(memory, 1)
}

/// Touches every `stride`-th page once, returning the time of each touch in µs.
fn touch_timed_every(memory: &GuestMemory, stride: usize) -> Vec<f64> {
    memory
        .page_addrs()
        .step_by(stride)
        .map(|addr| {
            let start = Instant::now();
            e2e::fake_vmm::touch(addr, false);
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

/// The floor: blocking read + one UFFDIO_COPY per fault, on a thread of this process.
pub fn raw_round(snapshot: &[u8]) -> Result<Vec<f64>> {
    let memory = GuestMemory::map(&[snapshot.len()], 0, false)?;
    let uffd = UffdBuilder::new().close_on_exec(true).user_mode_only(false).create()?;
    let region = memory.regions[0];
    uffd.register(region.addr as *mut _, region.size)?;
    let pages = snapshot.len() / PAGE;
    std::thread::scope(|scope| {
        let handler = scope.spawn(|| -> Result<()> {
            for _ in 0..pages {
                let Ok(Some(Event::Pagefault { addr, .. })) = uffd.read_event() else {
                    bail!("the raw handler read an unexpected uffd event")
                };
                let page = addr as usize & !(PAGE - 1);
                let offset = page - region.addr;
                // SAFETY: `page` is a missing page of a region registered on `uffd`; the source
                // is a live 4 KiB slice of the snapshot.
                unsafe { uffd.copy(snapshot[offset..].as_ptr().cast(), page as *mut _, PAGE, true) }?;
            }
            Ok(())
        });
        let times = touch_timed(&memory);
        handler.join().map_err(|_| anyhow::anyhow!("the raw handler panicked"))??;
        Ok(times)
    })
}
