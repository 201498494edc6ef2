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
use prefetch::prefetcher::{BatchPlacer, Placed};
use std::sync::{OnceLock, RwLock};

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
        // Regions were validated against the snapshot's length, so the range is always there.
        let src = self
            .snapshot
            .bytes(offset, len)
            .ok_or(IoctlError::Other(nix::errno::Errno::EFAULT))?;
        self.uffd.copy(src, start, true)?;
        Ok(Filled::Copied)
    }

    /// A read maps the zero page; a write would then take a second (CoW) fault, so it gets a
    /// copy of zeros instead (measured 2× cheaper). hugetlbfs has no ZEROPAGE.
    pub fn zeros(&self, page_size: PageSize, start: HostAddr, len: u64, write: bool) -> Result<Filled, IoctlError> {
        if write || page_size == PageSize::Huge {
            self.uffd.copy(zeros(len), start, true)?;
            Ok(Filled::ZeroCopied)
        } else {
            self.uffd.zeropage(start, len, true)?;
            Ok(Filled::ZeroMapped)
        }
    }
}

/// Places plan batches (file page ranges) for the prefetcher and for synchronous installs.
///
/// A batch is placed while holding the read side of `removed`; the fault loop holds the write
/// side while it reads events. So no batch can land between a REMOVE being read (after which
/// the VMM zaps the range) and the range being marked: a removed page never gets snapshot
/// bytes. Batches are small, so the fault loop waits for at most one of them.
pub struct BatchPlacement<'a> {
    pub placer: Placer<'a>,
    pub removed: &'a RwLock<RemovedRanges>,
    pub stats: &'a VmStats,
}

/// Why placing stopped early.
enum Stopped {
    Retry,
    Gone,
}

impl BatchPlacement<'_> {
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

    fn place_piece(&self, region: &Region, start: HostAddr, len: u64) -> Result<(), Stopped> {
        let removed = self.removed.read().unwrap_or_else(|p| p.into_inner());
        if removed.overlaps(start, len) {
            // The guest gave (part of) it back; demand faults there are served zeros.
            VmStats::add(&self.stats.prefetch_removed_pages, len / BASE_PAGE);
            return Ok(());
        }
        match self.placer.snapshot_range(region, start, len, false) {
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

impl BatchPlacer for BatchPlacement<'_> {
    /// Places every piece of `batch`. On Retry the caller places the whole batch again later:
    /// pieces already in are then found present, nothing is placed twice.
    fn place(&self, batch: &Batch) -> Placed {
        for (region, start, len) in self.host_pieces(batch) {
            match self.place_piece(&region, start, len) {
                Ok(()) => {}
                Err(Stopped::Retry) => return Placed::Retry,
                Err(Stopped::Gone) => return Placed::Stop,
            }
        }
        Placed::Done
    }
}
