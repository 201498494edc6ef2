//! Prefetch bandwidth: the server prefetching a whole snapshot as its working set
//! (`--prefetch union`, nothing touching it) against the bulk UFFDIO_COPY ceiling — a loop in
//! this process copying the same bytes into a registered region with no faulting thread.

use anyhow::{ensure, Context, Result};
use e2e::fake_vmm::{FakeVmm, GuestMemory, PAGE};
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::{write_working_set, SnapshotFile};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use userfaultfd::UffdBuilder;

/// A random snapshot (no zero page) and a working set of every page of it.
pub struct Setup {
    pub snapshot: SnapshotFile,
    pub working_set: PathBuf,
}

impl Setup {
    pub fn new(dir: &Path, mib: usize) -> Setup {
        Setup::of(dir, SnapshotFile::random(dir, "bandwidth.mem", mib << 20, 0.0, 51))
    }

    /// `snapshot` (it should have no zero page) and a working set of every page of it.
    pub fn of(dir: &Path, snapshot: SnapshotFile) -> Setup {
        let working_set = dir.join("bandwidth.ws");
        write_working_set(&working_set, &snapshot, &[(0..snapshot.pages() as u64).collect()]);
        Setup { snapshot, working_set }
    }

    /// GB/s of UFFDIO_COPY in `chunk`-byte calls over the whole snapshot: the ceiling.
    pub fn bulk_copy_ceiling(&self, chunk: usize) -> Result<f64> {
        let bytes = &self.snapshot.bytes;
        let memory = GuestMemory::map(&[bytes.len()], 0, false)?;
        let uffd = UffdBuilder::new().close_on_exec(true).user_mode_only(false).create()?;
        let region = memory.regions[0];
        uffd.register(region.addr as *mut _, region.size)?;
        let start = Instant::now();
        for offset in (0..bytes.len()).step_by(chunk) {
            let len = chunk.min(bytes.len() - offset);
            // SAFETY: the destination is a missing page range of a region registered on
            // `uffd`, the source a live slice of `len` bytes.
            unsafe { uffd.copy(bytes[offset..].as_ptr().cast(), (region.addr + offset) as *mut _, len, true) }?;
        }
        Ok(bytes.len() as f64 / start.elapsed().as_secs_f64() / 1e9)
    }

    /// GB/s of the server's background prefetch of the whole snapshot in batches of
    /// `batch_pages`: (placing only, and from the VM's attach including loading the working
    /// set and planning); and µs from the VM's attach to its first batch placed.
    pub fn server_prefetch(&self, batch_pages: u64) -> Result<((f64, f64), f64)> {
        self.server_prefetch_from(batch_pages, &[])
    }

    /// As [`Setup::server_prefetch`], the server serving snapshot `bench` from wherever
    /// `source` says (e.g. `--store DIR --snapshot bench`); from the memory file if empty.
    pub fn server_prefetch_from(&self, batch_pages: u64, source: &[&str]) -> Result<((f64, f64), f64)> {
        let batch = batch_pages.to_string();
        let ws = self.working_set.to_str().context("working-set path is not UTF-8")?;
        let mut args = vec!["--working-set", ws, "--prefetch", "union", "--prefetch-batch-pages", &batch];
        args.extend_from_slice(source);
        let files: &[(&str, &Path)] = if source.is_empty() { &[("bench", &self.snapshot.path)] } else { &[] };
        let server = ServerProcess::start(files, &args);
        let len = self.snapshot.bytes.len();
        let _vmm = FakeVmm::attach_layout(&server.socket("bench"), &[len], 0, false).context("attach")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stats = server.stats();
            if let Some(vm) = stats.vms.first().filter(|vm| vm.counters.prefetch_done_us > 0) {
                let c = &vm.counters;
                ensure!(
                    c.prefetched_pages == self.snapshot.pages() as u64,
                    "the server prefetched {} of {} pages",
                    c.prefetched_pages,
                    self.snapshot.pages()
                );
                let bytes = (c.prefetched_pages * PAGE as u64) as f64;
                let placing_us = c.prefetch_done_us.saturating_sub(c.prefetch_plan_us).max(1);
                let rates = (bytes / (placing_us as f64 * 1e3), bytes / (c.prefetch_done_us as f64 * 1e3));
                return Ok((rates, c.prefetch_first_batch_us as f64));
            }
            ensure!(Instant::now() < deadline, "prefetch did not finish in 60 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
