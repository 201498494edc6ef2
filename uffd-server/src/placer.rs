//! Placing memory into a VM: a host range filled from the snapshot, or with zeros, in one
//! ioctl. Demand faults, synchronous installs (eager, REAP) and prefetch batches all go
//! through here, so what a page is filled with is decided in one place.

use crate::addr::{HostAddr, PageSize, BASE_PAGE, HUGE_PAGE};
use crate::regions::{Region, RegionMap};
use crate::removed::RemovedRanges;
use crate::snapshot::Snapshot;
use crate::stats::VmStats;
use crate::uffd_io::{IoctlError, Userfaultfd};
use prefetch::plan::Batch;
use std::sync::OnceLock;

/// How a range was filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// UFFDIO_COPY of snapshot bytes.
    Copied,
    /// UFFDIO_ZEROPAGE: the shared zero page is mapped.
    ZeroMapped,
    /// UFFDIO_COPY of zeros (write faults, hugetlbfs).
    ZeroCopied,
}

/// 2 MiB of zeros, the source for zero pages that must be *copied* rather than mapped with
/// UFFDIO_ZEROPAGE. A zeroed allocation this large is fresh anonymous memory that is never
/// written, so it costs no RAM.
fn zeros(len: u64) -> &'static [u8] {
    static ZEROS: OnceLock<Box<[u8]>> = OnceLock::new();
    &ZEROS.get_or_init(|| vec![0u8; HUGE_PAGE as usize].into_boxed_slice())[..len as usize]
}

/// Everything needed to fill one VM's memory.
#[derive(Clone, Copy)]
pub struct Placer<'a> {
    pub uffd: &'a Userfaultfd,
    pub regions: &'a RegionMap,
    pub snapshot: &'a Snapshot,
    /// Wake threads waiting on a range as soon as it is filled. Off for a burst of batches
    /// woken together at its end (see `BatchPlacement::wake`).
    pub wake: bool,
}

impl Placer<'_> {
    /// Fills `[start, start + len)` of `region` with the snapshot's bytes, mapping zero pages
    /// where the whole range is zero in the snapshot.
    pub fn snapshot_range(
        &self,
        region: &Region,
        start: HostAddr,
        len: u64,
        write: bool,
    ) -> Result<Filled, IoctlError> {
        let offset = region.file_offset_of(start);
        if self.snapshot.is_zero(offset, len) {
            return self.zeros(region.page_size, start, len, write);
        }
        // Regions were validated against the snapshot's length: only a disk read can fail.
        self.snapshot.with_bytes(offset, len, |src| self.uffd.copy(src, start, self.wake)).map_err(|e| {
            tracing::error!(%offset, len, "reading the snapshot failed: {e}");
            IoctlError::Other(nix::errno::Errno::EIO)
        })??;
        Ok(Filled::Copied)
    }

    /// A read maps the zero page; a write would then take a second (CoW) fault, so it gets a
    /// copy of zeros instead (measured 2× cheaper). hugetlbfs has no ZEROPAGE.
    pub fn zeros(&self, page_size: PageSize, start: HostAddr, len: u64, write: bool) -> Result<Filled, IoctlError> {
        if write || page_size == PageSize::Huge {
            self.uffd.copy(zeros(len), start, self.wake)?;
            Ok(Filled::ZeroCopied)
        } else {
            self.uffd.zeropage(start, len, self.wake)?;
            Ok(Filled::ZeroMapped)
        }
    }
}

/// What placing a plan batch came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Every page of the batch is in: placed now, found present, or skipped as removed.
    Done,
    /// A memory-layout event (REMOVE) is pending and must be read first; place it again then
    /// (pages already in are found present, nothing is placed twice).
    Retry,
    /// The VM's address space is gone.
    Stop,
}

/// Places plan batches (file page ranges): prefetch, and the synchronous installs of `eager`
/// and `reap`. Runs on the VM's fault thread, which also reads the events, so a REMOVE is
/// always marked in `removed` before any later batch is placed.
pub struct BatchPlacement<'a> {
    pub placer: Placer<'a>,
    pub removed: &'a RemovedRanges,
    pub stats: &'a VmStats,
    /// The batch's bytes from a loading-set file (checked), used instead of the snapshot's.
    pub source: Option<&'a [u8]>,
}

/// Why placing stopped early.
enum Stopped {
    Retry,
    Gone,
}

impl BatchPlacement<'_> {
    /// Wakes every thread waiting in `batch` (after placing it without waking).
    pub fn wake(&self, batch: &Batch) {
        for (_, start, len) in self.host_pieces(batch) {
            if let Err(e) = self.placer.uffd.wake(start, len) {
                tracing::debug!(%start, len, "wake after a burst failed: {e}");
            }
        }
    }

    pub fn place(&self, batch: &Batch) -> Placed {
        for (region, start, len) in self.host_pieces(batch) {
            match self.place_piece(batch, &region, start, len) {
                Ok(()) => {}
                Err(Stopped::Retry) => return Placed::Retry,
                Err(Stopped::Gone) => return Placed::Stop,
            }
        }
        Placed::Done
    }

    /// The host pieces of a batch: its file range cut at region boundaries, widened to whole
    /// huge pages in hugetlbfs regions.
    fn host_pieces(&self, batch: &Batch) -> Vec<(Region, HostAddr, u64)> {
        let (file_start, file_end) = (batch.first_page * BASE_PAGE, batch.end_page() * BASE_PAGE);
        let mut pieces = Vec::new();
        for region in self.placer.regions.regions() {
            let (r_start, r_end) = (region.file_offset.0, region.file_offset.0 + region.size);
            let (start, end) = (file_start.max(r_start), file_end.min(r_end));
            if start >= end {
                continue;
            }
            let unit = region.page_size.bytes();
            let host = |file: u64| region.host.0 + (file - r_start);
            let host_start = HostAddr(host(start)).align_down(unit);
            let host_end = host(end).div_ceil(unit) * unit;
            pieces.push((*region, host_start, host_end.min(region.host_end()) - host_start.0));
        }
        pieces
    }

    fn place_piece(&self, batch: &Batch, region: &Region, start: HostAddr, len: u64) -> Result<(), Stopped> {
        if self.removed.overlaps(start, len) {
            // The guest gave (part of) it back; demand faults there are served zeros.
            VmStats::add(&self.stats.prefetch_removed_pages, len / BASE_PAGE);
            return Ok(());
        }
        match self.fill(batch, region, start, len) {
            Ok(_) => {
                VmStats::add(&self.stats.prefetched_pages, len / BASE_PAGE);
                Ok(())
            }
            // Part of it is present (a demand fault was first): place the rest page by page.
            Err(IoctlError::Again { copied }) if copied > 0 => {
                VmStats::add(&self.stats.prefetched_pages, copied / BASE_PAGE);
                self.place_pages(region, HostAddr(start.0 + copied), len - copied)
            }
            Err(IoctlError::Exists) => self.place_pages(region, start, len),
            Err(IoctlError::Again { .. }) => Err(Stopped::Retry),
            Err(IoctlError::VmGone | IoctlError::NotRegistered) => Err(Stopped::Gone),
            Err(e @ IoctlError::Other(_)) => {
                tracing::warn!(%start, len, "prefetch of a range failed, left to demand faults: {e}");
                Ok(())
            }
        }
    }

    /// Fills a piece from the loading set when it holds it (4 KiB regions: a hugetlbfs piece is
    /// widened beyond the batch), else from the snapshot.
    fn fill(&self, batch: &Batch, region: &Region, start: HostAddr, len: u64) -> Result<Filled, IoctlError> {
        let from_batch = region.file_offset_of(start).0.checked_sub(batch.first_page * BASE_PAGE);
        let bytes = from_batch.and_then(|at| self.source?.get(at as usize..(at + len) as usize));
        match bytes {
            Some(bytes) if region.page_size == PageSize::Base => {
                self.placer.uffd.copy(bytes, start, self.placer.wake)?;
                VmStats::add(&self.stats.loading_set_pages, len / BASE_PAGE);
                Ok(Filled::Copied)
            }
            _ => self.placer.snapshot_range(region, start, len, false),
        }
    }

    fn place_pages(&self, region: &Region, start: HostAddr, len: u64) -> Result<(), Stopped> {
        let unit = region.page_size.bytes();
        for page in (start.0..start.0 + len).step_by(unit as usize) {
            match self.placer.snapshot_range(region, HostAddr(page), unit, false) {
                Ok(_) => VmStats::add(&self.stats.prefetched_pages, unit / BASE_PAGE),
                Err(IoctlError::Exists) => VmStats::add(&self.stats.prefetch_present_pages, unit / BASE_PAGE),
                Err(IoctlError::Again { .. }) => return Err(Stopped::Retry),
                Err(IoctlError::VmGone | IoctlError::NotRegistered) => return Err(Stopped::Gone),
                Err(e @ IoctlError::Other(_)) => tracing::warn!(page, "prefetch of a page failed: {e}"),
            }
        }
        Ok(())
    }
}
