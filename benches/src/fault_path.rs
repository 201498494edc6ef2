//! Per-fault service time of uffd-server against the raw floor, in one run.
//!
//! The floor is the least any userfaultfd handler can do: a blocking `read` on the uffd that
//! answers each fault with one UFFDIO_COPY from memory. It runs twice: in a process of its own
//! (`raw-uffd-handler`, taking the VM over the same handshake as the server: the floor of any
//! memory server), and as a thread of the faulting process (no switch between address spaces,
//! which no memory server can have). Every handler serves the same random (no zero page)
//! snapshot to the same faulting thread, which touches each 4 KiB page once and times every
//! touch; rounds alternate so that machine noise hits all alike. The server runs with
//! `--fault-around 1`, so every handler places exactly one page per fault.
//!
//! Where the faulting thread and the handler run decides the figure (the same CPU ~10 µs, the
//! other ~45 µs here: a cross-CPU wake-up), so both are pinned, and each placement is measured
//! on its own: the handler on CPU 0 and the faulting thread on CPU 0 (same) or CPU 1 (cross).

use crate::{median, percentile};
use anyhow::{bail, Context, Result};
use e2e::fake_vmm::{FakeVmm, GuestMemory, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::time::Instant;
use userfaultfd::{Event, UffdBuilder};

/// Where the handler and the faulting thread run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the scheduler puts them.
    Unpinned,
    /// Both on CPU 0.
    SameCpu,
    /// The handler on CPU 0, the faulting thread on CPU 1.
    CrossCpu,
}

impl Placement {
    /// The CPUs of the handler and of the faulting thread, if pinned.
    fn cpus(self) -> Option<(usize, usize)> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCpu => Some((0, 0)),
            Placement::CrossCpu => Some((0, 1)),
        }
    }
}

/// Per-touch times in µs of every round, for each handler (round after round, each the same
/// number of touches).
#[derive(Default)]
pub struct FaultTimes {
    /// The raw loop as a thread of the faulting process.
    pub raw_us: Vec<f64>,
    /// The raw loop as a process of its own.
    pub raw_process_us: Vec<f64>,
    pub server_us: Vec<f64>,
    /// Touches per round and handler.
    pub touches_per_round: usize,
}

impl FaultTimes {
    /// Handler times `a`'s `q` quantile over `b`'s, round by round, and the median over the
    /// rounds. Handlers take turns within a round (~0.1 s), and this machine goes through
    /// spells that slow every handler alike: across CPUs, whole rounds run at ~13 or ~18 µs a
    /// fault. Pooling the rounds lets the number of slow rounds each handler drew decide a
    /// pooled quantile (1.00–1.29× across runs of the same build); the median of round ratios
    /// does not.
    pub fn ratio(&self, a: &[f64], b: &[f64], q: f64) -> f64 {
        let rounds = self.touches_per_round.max(1);
        let ratios: Vec<f64> =
            a.chunks(rounds).zip(b.chunks(rounds)).map(|(a, b)| percentile(a, q) / percentile(b, q)).collect();
        median(&ratios)
    }
}

/// `rounds` alternating rounds of `pages` faults for each handler, placed as `placement` says.
pub fn measure(pages: usize, rounds: usize, placement: Placement) -> Result<FaultTimes> {
    let dir = tempfile::tempdir()?;
    let snapshot = SnapshotFile::random(dir.path(), "fault-path.mem", pages * PAGE, 0.0, 42);
    let server = ServerProcess::start(&[("bench", &snapshot.path)], &["--fault-around", "1"]);
    let mut times = FaultTimes { touches_per_round: pages, ..FaultTimes::default() };
    for _ in 0..rounds {
        times.raw_us.extend(raw_round(&snapshot.bytes, placement)?);
        times.raw_process_us.extend(raw_process_round(&snapshot.path, snapshot.bytes.len(), placement)?);
        times.server_us.extend(server_round(&server, "bench", snapshot.bytes.len(), 1, placement)?);
    }
    Ok(times)
}

/// One VM of `len` bytes (one region) served by `raw-uffd-handler` from `memory_file`,
/// touching every page once: the time of each touch in µs.
pub fn raw_process_round(memory_file: &std::path::Path, len: usize, placement: Placement) -> Result<Vec<f64>> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("raw.sock");
    let cpu = placement.cpus().map_or_else(|| "any".to_string(), |(handler, _)| handler.to_string());
    let faults = (len / PAGE).to_string();
    let mut handler = std::process::Command::new(e2e::server_process::workspace_binary("raw-uffd-handler"))
        .arg(&socket)
        .arg(memory_file)
        .args([&faults, &cpu])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting raw-uffd-handler")?;
    let mut ready = String::new();
    if let Some(stdout) = handler.stdout.take() {
        std::io::BufReader::new(stdout).read_line(&mut ready)?;
    }
    if ready.trim() != "ready" {
        let _ = handler.kill();
        bail!("raw-uffd-handler did not start: {:?}", handler.wait()?);
    }
    let vmm = FakeVmm::attach_layout(&socket, &[len], 0, false).context("attaching to raw-uffd-handler")?;
    let times = touch_placed(&vmm.memory, 1, placement)?;
    let status = handler.wait()?;
    anyhow::ensure!(status.success(), "raw-uffd-handler failed: {status}");
    Ok(times)
}

/// One VM attached to snapshot `name` of `server` (`len` bytes, one region) touching every
/// `stride`-th page once: the time of each touch in µs.
pub fn server_round(
    server: &ServerProcess,
    name: &str,
    len: usize,
    stride: usize,
    placement: Placement,
) -> Result<Vec<f64>> {
    // FakeVmm waits for the server to let go of the VM before its memory is unmapped.
    let vmm = FakeVmm::attach_layout(&server.socket(name), &[len], 0, false).context("attaching to uffd-server")?;
    if let Some((handler, _)) = placement.cpus() {
        pin(newest_vm_thread(server.pid())?, handler)?;
    }
    touch_placed(&vmm.memory, stride, placement)
}

/// The thread id of the server's newest VM thread (`vm-ID`, the highest ID), waiting for it to
/// start (the handshake was sent; the server may not have accepted it yet).
fn newest_vm_thread(server_pid: u32) -> Result<i32> {
    // The highest VM id pinned so far, per server process.
    static PINNED: std::sync::Mutex<Vec<(u32, u64)>> = std::sync::Mutex::new(Vec::new());
    let pinned = || {
        let list = PINNED.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().find(|(pid, _)| *pid == server_pid).map_or(0, |&(_, id)| id)
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let newest = std::fs::read_dir(format!("/proc/{server_pid}/task"))?
            .flatten()
            .filter_map(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                let id: u64 = comm.trim().strip_prefix("vm-")?.parse().ok()?;
                Some((id, task.file_name().to_str()?.parse::<i32>().ok()?))
            })
            .max();
        if let Some((id, tid)) = newest.filter(|&(id, _)| id > pinned()) {
            let mut list = PINNED.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|(pid, _)| *pid != server_pid);
            list.push((server_pid, id));
            return Ok(tid);
        }
        if Instant::now() > deadline {
            bail!("the server started no thread for the VM");
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin(tid: i32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)?;
    Ok(())
}

/// Runs `f` on a thread pinned to `cpu`.
fn on_cpu<R: Send>(cpu: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<R> {
                pin(0, cpu)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a pinned thread panicked"))?
    })
}

/// Touches every `stride`-th page once from the faulting thread's CPU of `placement` (where
/// the scheduler likes, unpinned), returning the time of each touch in µs.
fn touch_placed(memory: &GuestMemory, stride: usize, placement: Placement) -> Result<Vec<f64>> {
    match placement.cpus() {
        Some((_, toucher)) => on_cpu(toucher, || touch_timed_every(memory, stride)),
        None => Ok(touch_timed_every(memory, stride)),
    }
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
pub fn raw_round(snapshot: &[u8], placement: Placement) -> Result<Vec<f64>> {
    let memory = GuestMemory::map(&[snapshot.len()], 0, false)?;
    let uffd = UffdBuilder::new().close_on_exec(true).user_mode_only(false).create()?;
    let region = memory.regions[0];
    uffd.register(region.addr as *mut _, region.size)?;
    let pages = snapshot.len() / PAGE;
    std::thread::scope(|scope| {
        let handler = scope.spawn(|| -> Result<()> {
            if let Some((cpu, _)) = placement.cpus() {
                pin(0, cpu)?;
            }
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
        let times = touch_placed(&memory, 1, placement)?;
        handler.join().map_err(|_| anyhow::anyhow!("the raw handler panicked"))??;
        Ok(times)
    })
}
