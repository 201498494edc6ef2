//! Serving a demand fault: the aligned fault-around cluster of the faulting page, in one
//! placement.
//!
//! Fault-around: measured for KVM guests here, a fault served one 4 KiB page at a time costs
//! ~51 µs per page, a 64 KiB aligned cluster ~5.4 µs per page, a 2 MiB cluster ~3.3 µs per
//! page; 64 KiB takes 9.4× of the 15× available while copying 32× less per fault than 2 MiB —
//! memory a sparse working set would never touch. A cluster never crosses its region; one that
//! touches a removed range shrinks to the faulting page, served zeros if it was removed.

use super::removed::RemovedRanges;
use super::{Fault, Guest, Step};
use crate::addr::{HostAddr, BASE_PAGE};
use crate::memory::pieces::Piece;
use crate::memory::placer::{Access, Outcome, Stop};
use crate::memory::uffd_io::IoctlError;
use crate::source::{PageSource, Zeros};
use crate::stats::count;

/// 64 KiB clusters (see the module comment).
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 16;

/// The demand stage. Owns nothing but its configuration: a fault is served whole, or the loop
/// asks again after reading events.
#[derive(Clone, Copy, Debug)]
pub struct Demand {
    /// Serve the aligned cluster of this many 4 KiB pages around each fault (power of two,
    /// 1..=512). Recording serves single pages, so that every touch is seen.
    pub fault_around_pages: u64,
}

impl Default for Demand {
    fn default() -> Self {
        Demand { fault_around_pages: DEFAULT_FAULT_AROUND_PAGES }
    }
}

impl Demand {
    /// Places the fault's cluster (what of it is missing) and wakes the faulting thread.
    pub fn serve(&self, guest: &Guest<'_>, removed: &RemovedRanges, fault: &Fault) -> Step {
        fail::fail_point!("demand-serve");
        let unit = fault.region.page_size.bytes();
        let cluster = self.cluster(fault);
        let (piece, source): (Piece, &dyn PageSource) = if !removed.overlaps(cluster.host, cluster.len) {
            (cluster, guest.snapshot)
        } else if removed.overlaps(fault.page, unit) {
            count(&guest.stats.removed_faults, 1);
            (Piece::of_region(&fault.region, fault.page, unit), &Zeros)
        } else {
            (Piece::of_region(&fault.region, fault.page, unit), guest.snapshot)
        };
        let access = if fault.write { Access::Write } else { Access::Read };
        let outcome = guest.placer.fill(piece, source, access);
        count_placed(guest, &outcome);
        if outcome.present > 0 {
            // Placed before us, by a placement that woke only the threads waiting then.
            count(&guest.stats.already_present, 1);
            guest.placer.wake(&piece);
        }
        match outcome.stop {
            None => Step::Done,
            Some(Stop::NeedEvents) => Step::NeedEvents,
            Some(Stop::Gone) => Step::Gone,
            Some(Stop::Failed(e)) => poison(guest, fault, &e),
        }
    }

    /// The aligned fault-around cluster holding the fault, clipped to its region.
    fn cluster(&self, fault: &Fault) -> Piece {
        let region = &fault.region;
        let size = (self.fault_around_pages * BASE_PAGE).max(region.page_size.bytes());
        let aligned = fault.page.align_down(size).0;
        let start = aligned.max(region.host.0);
        let end = (aligned + size).min(region.host_end());
        Piece::of_region(region, HostAddr(start), end - start)
    }
}

/// The fault's bytes cannot be had (the memory file changed or cannot be read): rather than
/// leave the faulting thread waiting for ever, or serve it other bytes, its page is poisoned —
/// the guest gets a memory error, which its VMM reports.
fn poison(guest: &Guest<'_>, fault: &Fault, why: &dyn std::fmt::Display) -> Step {
    let unit = fault.region.page_size.bytes();
    let poisoned = guest.placer.uffd().poison(fault.page, unit);
    if guest.log_limit.allow() {
        match &poisoned {
            Ok(_) => {
                tracing::error!(addr = %fault.page, "cannot serve fault ({why}): page poisoned, the guest gets a memory error")
            }
            Err(e) => {
                tracing::error!(addr = %fault.page, "cannot serve fault ({why}) nor poison it ({e}): the faulting thread waits")
            }
        }
    }
    match poisoned {
        Ok(_) => count(&guest.stats.poisoned_pages, unit / BASE_PAGE),
        Err(IoctlError::Again { .. }) => return Step::NeedEvents,
        Err(IoctlError::VmGone) => return Step::Gone,
        Err(_) => {}
    }
    Step::Done
}

fn count_placed(guest: &Guest<'_>, outcome: &Outcome) {
    count(&guest.stats.copied_pages, outcome.copied / BASE_PAGE);
    count(&guest.stats.zeropage_pages, outcome.zero_mapped / BASE_PAGE);
    count(&guest.stats.zero_copied_pages, outcome.zero_copied / BASE_PAGE);
}
