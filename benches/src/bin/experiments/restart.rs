//! Experiment 8: the server's own end. How long a faulting vCPU stalls across a planned
//! handover (`serve --takeover`) and across a crash (`kill -9`, then a new server that takes
//! the VMs back from their journals), for 1, 16 and 64 VMs; a soak of restore cycles against
//! one server with its RSS and fd count sampled; and the cost of journaling a REMOVE (on the
//! fault loop's way; a crash in it loses nothing, since the events file holds what was read).
//!
//! The VMs are in-process test VMMs (`e2e::fake_vmm`: real uffds, Firecracker's handshake),
//! one host thread each standing in for a vCPU: it touches its guest's pages one by one — each
//! a demand fault — and when it has touched them all drops them (MADV_DONTNEED: a REMOVE) and
//! starts over, so it faults for the whole run. The snapshot is random bytes: nothing here
//! depends on its contents.

use crate::harness::proc_memory;
use crate::report::{bar_plot, Labels};
use anyhow::{ensure, Result};
use e2e::fake_vmm::{touch, FakeVmm, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Guest memory per VM: 4096 pages.
const VM_BYTES: usize = 16 << 20;
/// Faulting before the event, and after it.
const BEFORE: Duration = Duration::from_millis(400);
const AFTER: Duration = Duration::from_millis(600);

/// What one vCPU saw.
#[derive(Clone, Copy, Default)]
struct Stalls {
    /// Its longest fault before the event (the machine's noise under this load).
    before: Duration,
    /// Its longest fault that ended after the event began.
    after: Duration,
    /// The first fault that ended after the event began: when it ended, and how long it took
    /// (after a crash: the fault the outage held up).
    first_after: Option<(Instant, Duration)>,
}

/// Faults through `vmm`'s memory until `stop`; `event` is set when the event begins.
fn fault_continuously(vmm: &FakeVmm, stop: &AtomicBool, event: &OnceLock<Instant>) -> Stalls {
    let mut stalls = Stalls::default();
    let pages: Vec<usize> = vmm.memory.page_addrs().collect();
    while !stop.load(Ordering::Relaxed) {
        for &addr in &pages {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let started = Instant::now();
            touch(addr, false);
            let ended = Instant::now();
            let took = ended - started;
            match event.get() {
                Some(&at) if ended > at => {
                    stalls.after = stalls.after.max(took);
                    stalls.first_after.get_or_insert((ended, took));
                }
                _ => stalls.before = stalls.before.max(took),
            }
        }
        for (i, region) in vmm.memory.regions.iter().enumerate() {
            let _ = vmm.dontneed(i, 0, region.size);
        }
    }
    stalls
}

/// One measurement: `vms` VMs faulting, then `event` (a handover or a crash) on the server;
/// each VM's stalls, and when the new server process started.
/// What the servers' logs say: the new one's time from `main` to serving, and the old one's
/// from the handover request to the successor's confirmation.
struct Logged {
    ready_ms: f64,
    handed_ms: f64,
}

fn measure(snap: &SnapshotFile, vms: usize, crash: bool) -> Result<(Vec<Stalls>, Instant, Logged)> {
    let mut server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", "1"]);
    let attached: Vec<FakeVmm> =
        (0..vms).map(|_| FakeVmm::attach(&server.socket("vm"), VM_BYTES)).collect::<std::io::Result<_>>()?;
    // Every VM journaled before the clock starts: a crash loses a connection that is not yet
    // (docs/design.md), and 64 VMs connecting at once on 2 busy cores take a while to be.
    let journals = server.socket_dir.join("journal");
    let deadline = Instant::now() + Duration::from_secs(30);
    let journaled = || {
        let entries = std::fs::read_dir(&journals).into_iter().flatten().flatten();
        entries.filter(|entry| entry.path().extension().is_some_and(|x| x == "journal")).count()
    };
    while journaled() < vms {
        ensure!(Instant::now() < deadline, "the VMs were not all journaled in time:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(1));
    }
    let (stop, event) = (AtomicBool::new(false), OnceLock::new());
    let (stalls, spawned) = std::thread::scope(|scope| {
        let threads: Vec<_> =
            attached.iter().map(|vmm| scope.spawn(|| fault_continuously(vmm, &stop, &event))).collect();
        std::thread::sleep(BEFORE);
        let spawned = if crash {
            // The event begins once the server is gone: no fault ends after it until the new
            // server serves.
            server.kill_hard();
            let _ = event.set(Instant::now());
            server.restart(&[])
        } else {
            let _ = event.set(Instant::now());
            let spawned = Instant::now();
            let status = server.take_over();
            assert!(status.success(), "the predecessor failed its handover:\n{}", server.log());
            spawned
        };
        std::thread::sleep(AFTER);
        stop.store(true, Ordering::Relaxed);
        let stalls: Vec<Stalls> = threads.into_iter().map(|t| t.join().unwrap_or_default()).collect();
        (stalls, spawned)
    });
    ensure!(
        stalls.iter().all(|s| s.first_after.is_some()),
        "a VM never faulted again after the event:\n{}",
        server.log()
    );
    let log = server.log();
    let logged_ms = |key: &str| {
        log.rsplit(key)
            .next()
            .filter(|_| log.contains(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|us| us.parse::<f64>().ok())
            .map_or(f64::NAN, |us| us / 1e3)
    };
    let logged = Logged { ready_ms: logged_ms("ready_us="), handed_ms: logged_ms("handed_us=") };
    drop(attached);
    Ok((stalls, spawned, logged))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(work: &Path, out: &Path) -> Result<String> {
    let snap = SnapshotFile::random(work, "restart.mem", VM_BYTES, 0.3, 88);
    let mut csv =
        String::from("event,vms,stall_p50_ms,stall_max_ms,noise_max_ms,pause_from_start_max_ms,handed_ms,ready_ms\n");
    let mut md = String::from(
        "## 8. Restart: handover and crash recovery\n\n\
         Each VM's vCPU (a host thread) faults continuously through 16 MiB of guest memory, dropping \
         it with MADV_DONTNEED after each pass (REMOVE events); after 400 ms the server is handed \
         over (`serve --takeover`) or killed with SIGKILL and started again (it takes the VMs back \
         from their journals). Stall, p50 and max over the VMs: after a handover, a vCPU's longest fault \
         from the successor's start on (the stall hides among them); after a crash, its first fault \
         after the old process died (the one the outage held up). Noise: the longest fault in the \
         400 ms before, same run. Pause: after a crash, from the new process's start to the end of \
         the last VM's stall; after a handover, the old process's log from the request to the \
         successor's confirmation (every VM stopped, sent and taken over). \
         ready: the new process's own log, from `main` to serving (snapshot loaded, VMs taken back, \
         sockets bound).\n\n\
         | event | VMs | stall p50 | stall max | noise max | pause | new server ready |\n|---|---|---|---|---|---|---|\n",
    );
    let mut bars = Vec::new();
    for vms in [1, 16, 64] {
        for crash in [false, true] {
            let (stalls, spawned, logged) = measure(&snap, vms, crash)?;
            let Logged { ready_ms, handed_ms } = logged;
            // A handover's stall hides among the faults after it began; a crash's is the first.
            let stall = |s: &Stalls| if crash { s.first_after.map_or(Duration::ZERO, |f| f.1) } else { s.after };
            let mut after: Vec<f64> = stalls.iter().map(|s| ms(stall(s))).collect();
            after.sort_by(f64::total_cmp);
            let p50 = benches::median(&after);
            let max = after.last().copied().unwrap_or(0.0);
            let noise = stalls.iter().map(|s| ms(s.before)).fold(0.0, f64::max);
            let from_start = stalls
                .iter()
                .filter_map(|s| s.first_after)
                .map(|(ended, _)| ms(ended.saturating_duration_since(spawned)))
                .fold(0.0, f64::max);
            let event = if crash { "crash" } else { "handover" };
            let pause = if crash { format!("{from_start:.1} ms") } else { format!("{handed_ms:.1} ms (handover)") };
            writeln!(csv, "{event},{vms},{p50:.3},{max:.3},{noise:.3},{from_start:.3},{handed_ms:.3},{ready_ms:.3}")?;
            writeln!(
                md,
                "| {event} | {vms} | {p50:.1} ms | {max:.1} ms | {noise:.1} ms | {pause} | {ready_ms:.1} ms |"
            )?;
            bars.push((format!("{event}, {vms} VMs: stall p50"), p50));
        }
    }
    std::fs::write(out.join("restart.csv"), &csv)?;
    bar_plot(
        &out.join("restart.png"),
        &Labels { title: "A vCPU's stall across a handover or a crash (p50 over VMs)", x: "ms", y: "" },
        &bars,
    )?;
    md += &soak(&snap, 10_000, out)?;
    md += &journal_append_cost(work)?;
    Ok(md)
}

/// `cycles` restores against one server (attach, fault 64 pages, detach), its RSS and open fds
/// sampled every 1000.
fn soak(snap: &SnapshotFile, cycles: usize, out: &Path) -> Result<String> {
    let server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", "1"]);
    let mut samples = Vec::new();
    let mut csv = String::from("cycle,rss_kib,fds\n");
    for cycle in 1..=cycles {
        let vmm = FakeVmm::attach(&server.socket("vm"), VM_BYTES)?;
        let base = vmm.memory.regions[0].addr;
        for page in 0..64 {
            touch(base + page * 37 * PAGE, false);
        }
        drop(vmm);
        if cycle % 1000 == 0 {
            let rss = proc_memory(server.pid(), "VmRSS")? / 1024;
            let fds = server.open_fds();
            writeln!(csv, "{cycle},{rss},{fds}")?;
            samples.push((cycle, rss, fds));
        }
    }
    std::fs::write(out.join("restart-soak.csv"), &csv)?;
    let (first, last) = (samples.get(1).copied().unwrap_or_default(), samples.last().copied().unwrap_or_default());
    let mut md = format!(
        "\nSoak: {cycles} restore cycles against one server (attach, 64 faults, detach). Sampled every \
         1000 cycles (`restart-soak.csv`); from cycle {} (after the 1024 ended VMs the stats keep) to {}: \
         RSS {} → {} KiB ({:+.1}%), open fds {} → {}.\n",
        first.0,
        last.0,
        first.1,
        last.1,
        (last.1 as f64 / first.1.max(1) as f64 - 1.0) * 100.0,
        first.2,
        last.2
    );
    let _ = writeln!(md);
    Ok(md)
}

/// What journaling one REMOVE costs the fault loop (a crash during it loses nothing: the
/// REMOVE is in the VM's events file, where the read put it).
fn journal_append_cost(work: &Path) -> Result<String> {
    use uffd_server::addr::HostAddr;
    use uffd_server::recovery::journal::{JournalDir, JournalHeader, JOURNAL_FORMAT};
    let mut md = String::from("\nJournaling one REMOVE (`VmJournal::note_removed`, 10,000 appends):");
    for (place, dir) in [
        ("disk (/tmp)", work.join("journal")),
        ("tmpfs (/dev/shm)", Path::new("/dev/shm").join(format!("uffd-journal-{}", std::process::id()))),
    ] {
        let journal_dir = JournalDir::open(&dir)?;
        let header = JournalHeader {
            format: JOURNAL_FORMAT,
            snapshot: "vm".into(),
            identity: prefetch::identity::SnapshotIdentity { len: 0, fingerprint: 0 },
            peer_pid: 1,
            peer_start_ticks: 1,
            uffd: (0, 1),
            regions: vec![[0x7f00_0000_0000, 1 << 30, 0, 4096]],
        };
        let mut journal = journal_dir.create(&header)?;
        let mut took: Vec<f64> = (0..10_000u64)
            .map(|i| {
                let started = Instant::now();
                let _ = journal.note_removed(HostAddr(i << 21), HostAddr((i << 21) + (1 << 21)));
                started.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        took.sort_by(f64::total_cmp);
        journal.remove();
        let _ = std::fs::remove_dir(&dir);
        write!(
            md,
            " {place}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs;",
            benches::median(&took),
            benches::percentile(&took, 0.99),
            took.last().copied().unwrap_or(0.0)
        )?;
    }
    md.pop();
    md += ".\n\n";
    Ok(md)
}
