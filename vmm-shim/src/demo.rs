//! `vmm-shim demo`: a built-in snapshot restored through `uffd-server` by a host thread, against
//! an eager in-memory copy (SnapFaaS) in the same run — the shape of lazy restore in seconds,
//! with no KVM guest and no snapshot to make first.
//!
//! The built-in snapshot looks like a Python runtime after init: 128 MiB of guest memory whose
//! first 37 MiB hold data (xorshift64 noise) and the rest zeros. The "invocation" reads every
//! page once from one thread; every byte is then checked against the snapshot.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm_shim::memory::{GuestMemory, PAGE};
use vmm_shim::uffd_backend::UffdAttachment;
use vmm_shim::workload::xorshift;

const MIB: usize = 1 << 20;
const GUEST: usize = 128 * MIB;
const DATA: usize = 37 * MIB;

/// Runs the demo and prints its table.
pub fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let snapshot = built_in_snapshot();
    let mem = dir.path().join("python-like.mem");
    std::fs::write(&mem, &snapshot).context("cannot write the built-in snapshot")?;
    println!("built-in snapshot: {} MiB guest, {} MiB of data, the rest zero", GUEST / MIB, DATA / MIB);

    // Baseline: SnapFaaS's eager copy of the whole snapshot into fresh memory, then the touch.
    let start = Instant::now();
    let memory = GuestMemory::map(&[GUEST], 0, false)?;
    memory.write_at(0, &snapshot)?;
    touch_every_page(&memory);
    let eager = start.elapsed();
    drop(memory);

    let mut rows = vec![("eager copy (SnapFaaS baseline)".to_string(), eager)];
    for fault_around in ["1", "16"] {
        let server = Server::start(&dir.path().join(format!("sockets-{fault_around}")), &mem, fault_around)?;
        let start = Instant::now();
        let memory = GuestMemory::map(&[GUEST], 0, false)?;
        let attachment = UffdAttachment::attach(&server.socket(), &memory)?;
        touch_every_page(&memory);
        let elapsed = start.elapsed();
        if memory.region_bytes(0) != snapshot.as_slice() {
            bail!("guest memory differs from the snapshot (--fault-around {fault_around})");
        }
        drop(attachment); // hang up (and wait for the server's hang-up) before unmapping
        drop(memory);
        let counters = server.ended_vm_counters()?;
        let field = |name: &str| counters.get(name).map_or_else(|| "?".into(), ToString::to_string);
        println!(
            "uffd-server --fault-around {fault_around:>2}: faults={} copied_pages={} zeropage_pages={} fault p50={}us p99={}us",
            field("faults"),
            field("copied_pages"),
            field("zeropage_pages"),
            field("fault_latency_p50_us"),
            field("fault_latency_p99_us")
        );
        rows.push((format!("uffd-server lazy, --fault-around {fault_around}"), elapsed));
    }
    println!("\n| restore + touch all {} MiB | ms | vs eager copy |", GUEST / MIB);
    println!("|---|---|---|");
    for (name, time) in &rows {
        println!("| {name} | {:.1} | {:.2}× |", time.as_secs_f64() * 1e3, time.as_secs_f64() / eager.as_secs_f64());
    }
    println!("\nEvery byte of guest memory was checked against the snapshot.");
    Ok(())
}

fn built_in_snapshot() -> Vec<u8> {
    let mut x = 7u64;
    let mut bytes: Vec<u8> = (0..DATA / 8)
        .flat_map(|_| {
            x = xorshift(x);
            x.to_le_bytes()
        })
        .collect();
    bytes.resize(GUEST, 0);
    bytes
}

/// Reads one byte of every page, in order, from this thread.
fn touch_every_page(memory: &GuestMemory) {
    let bytes = memory.region_bytes(0);
    for offset in (0..bytes.len()).step_by(PAGE) {
        std::hint::black_box(bytes[offset]);
    }
}

/// `uffd-server serve` of the built-in snapshot, from the same directory as this binary.
struct Server {
    child: Child,
    socket_dir: PathBuf,
    binary: PathBuf,
}

impl Server {
    fn start(socket_dir: &Path, mem: &Path, fault_around: &str) -> Result<Server> {
        let binary = std::env::current_exe()?.with_file_name("uffd-server");
        let child = Command::new(&binary)
            .arg("serve")
            .arg("--socket-dir")
            .arg(socket_dir)
            .arg("--snapshot")
            .arg(format!("python-like={}", mem.display()))
            .args(["--fault-around", fault_around])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} (build the workspace's binaries)", binary.display()))?;
        let mut server = Server { child, socket_dir: socket_dir.to_path_buf(), binary };
        // Ready once the snapshot is loaded (the sockets are bound before): timing a restore
        // from an earlier moment would time the server's start.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.stats().is_ok_and(|stats| stats["snapshots_loaded"][0] == "python-like") {
            if server.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!("uffd-server did not load the snapshot and listen on {}", server.socket().display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        let mut stats = Command::new(&self.binary);
        let out = stats.arg("stats").arg("--json").arg("--socket-dir").arg(&self.socket_dir).output()?;
        serde_json::from_slice(&out.stdout).context("uffd-server stats --json")
    }

    fn socket(&self) -> PathBuf {
        self.socket_dir.join("python-like.sock")
    }

    /// The counters of the server's first VM, once it has ended.
    fn ended_vm_counters(&self) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats()?;
            let vm = &stats["vms"][0];
            if !vm["ended"].is_null() {
                return Ok(vm["counters"].clone());
            }
            if Instant::now() > deadline {
                bail!("the VM did not end: {stats}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
