//! One attached VM, from its handshake to its end.
//!
//! [`handshake`] and [`crate::memory::regions`] turn the VMM's message into a validated region
//! map; then the
//! [`fault_loop`] — the only reader of the VM's events — drives three stages, each owning its
//! state and returning a [`Step`]: [`demand`] serves faults, [`prefetcher`] places the plan
//! ahead of the guest, [`learner`] records first touches. Ranges the guest gave back are kept
//! in [`removed`].
//!
//! A panic never freezes a guest unseen: one in the prefetch or learning stage is contained and
//! leaves the VM served on demand; one anywhere else ends that VM with a logged error, and the
//! server's other VMs go on.

pub mod blocked_read;
pub mod demand;
pub mod fault_loop;
pub mod handshake;
pub mod learner;
pub mod prefetcher;
pub mod removed;
pub mod spare_cpu;

use crate::addr::{HostAddr, BASE_PAGE};
use crate::log_limit::LogLimit;
use crate::memory::placer::Placer;
use crate::memory::regions::{Region, RegionMap};
use crate::source::PageSource;
use crate::stats::VmStats;
use fault_loop::FaultLoop;
use learner::{Learned, Learner};
use prefetch::PageIndex;
use prefetcher::Prefetcher;
use removed::RemovedRanges;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// How the fault loop learns that the VMM is gone or the server wants the VM stopped.
#[derive(Debug, Default)]
pub struct VmmLink {
    /// The VMM's connection: it closing means the VMM is gone. None for a VM recovered after
    /// a crash (the server's end died with it).
    pub socket: Option<UnixStream>,
    /// Readable once the VMM process has exited.
    pub pidfd: Option<OwnedFd>,
    /// Set when the server stops (handover, SIGTERM): the loop ends at its next safe point.
    pub stop: Option<Arc<crate::recovery::StopSignal>>,
}

impl VmmLink {
    /// Whether the VMM's end can be seen without the uffd (which reports nothing of it): a
    /// socket or a pidfd.
    pub fn shows_its_end(&self) -> bool {
        self.socket.is_some() || self.pidfd.is_some()
    }
}

/// What every stage places into: one VM's memory, and where its bytes come from.
pub struct Guest<'a> {
    /// Places pieces through the VM's uffd.
    pub placer: Placer<'a>,
    /// The VM's regions.
    pub regions: &'a RegionMap,
    /// The snapshot's bytes.
    pub snapshot: &'a dyn PageSource,
    /// The VM's counters.
    pub stats: &'a VmStats,
    /// Bounds the log lines this VM's VMM can trigger.
    pub log_limit: LogLimit,
}

impl Guest<'_> {
    /// Wakes every thread waiting anywhere in the VM's memory: after a takeover, a thread may
    /// sleep on a fault its predecessor read and never served; woken, it faults again.
    pub fn wake_all(&self) {
        for region in self.regions.regions() {
            if let Err(e) = self.placer.uffd().wake(region.host, region.size) {
                tracing::debug!(host = %region.host, "wake of a region failed: {e}");
            }
        }
    }
}

/// What a stage's step came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its work is done.
    Done,
    /// A memory-layout event is pending: the loop reads events, then asks again.
    NeedEvents,
    /// The VMM's address space is gone.
    Gone,
}

/// A demand fault, located in its region.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// The faulting page (aligned to the region's page size).
    pub page: HostAddr,
    /// Whether the access was a write.
    pub write: bool,
    /// The region holding it.
    pub region: Region,
    /// The 4 KiB file page of the faulting address.
    pub file_page: PageIndex,
}

impl Fault {
    /// Locates a fault at `addr`; None when no region holds it.
    pub fn locate(regions: &RegionMap, addr: HostAddr, write: bool) -> Option<Fault> {
        let region = *regions.find(addr)?;
        let file_page = region.file_offset_of(addr).0 / BASE_PAGE;
        Some(Fault { page: addr.align_down(region.page_size.bytes()), write, region, file_page })
    }
}

/// Why a VM's service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The VMM closed its socket (it exited, or was killed).
    VmmClosed,
    /// The uffd reported POLLHUP/POLLERR.
    UffdHangup,
    /// The VMM's address space is gone (ESRCH from an ioctl).
    AddressSpaceGone,
    /// The loop could not go on (a poll or read failure).
    Failed(String),
    /// Serving panicked outside the stages that can be dropped.
    Panicked(String),
    /// The server stopped serving it at a safe point, for a successor to take it over.
    Stopped,
}

impl VmEnd {
    /// Whether the end is an error of ours rather than the VMM going away.
    pub fn is_error(&self) -> bool {
        matches!(self, VmEnd::Failed(_) | VmEnd::Panicked(_))
    }
}

impl std::fmt::Display for VmEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEnd::VmmClosed => write!(f, "VMM closed its socket"),
            VmEnd::UffdHangup => write!(f, "userfaultfd hung up"),
            VmEnd::AddressSpaceGone => write!(f, "VMM address space gone"),
            VmEnd::Failed(why) => write!(f, "fault loop failed: {why}"),
            VmEnd::Panicked(why) => write!(f, "serving the VM panicked: {why}"),
            VmEnd::Stopped => write!(f, "stopped for a successor"),
        }
    }
}

/// What serving a VM left behind.
pub struct Served {
    /// What it taught us.
    pub learned: Learned,
    /// Its removed ranges, with its journal.
    pub removed: RemovedRanges,
    /// How far its plan was placed (None: no plan, or the stage was dropped).
    pub progress: Option<prefetcher::PlanProgress>,
}

/// Serves one VM until it ends: its stages in a fault loop, a panic contained. Returns how it
/// ended and what it left behind.
pub fn serve(
    guest: Guest<'_>,
    link: &VmmLink,
    demand: demand::Demand,
    stages: (Option<Prefetcher<'_>>, Option<Learner<'_>>),
    removed: RemovedRanges,
) -> (VmEnd, Served) {
    let (prefetcher, learner) = stages;
    let mut fault_loop = FaultLoop::new(guest, link, demand, prefetcher, learner, removed);
    let end = match contain(|| fault_loop.run()) {
        Ok(end) => end,
        Err(panic) => {
            crate::stats::count(&fault_loop.guest().stats.stage_panics, 1);
            VmEnd::Panicked(panic)
        }
    };
    (end, fault_loop.finish())
}

/// Runs `f`, turning a panic into its message.
pub(crate) fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}
