//! The fault loop of one VM: wait for events, apply layout events, serve faults, and prefetch
//! whenever nothing is pending.
//!
//! One thread per VM, in `poll` on the VM's uffd and its VMM socket: the socket closing is the
//! only reliable sign that the VMM is gone (the uffd itself reports nothing when its process
//! dies). Faults are served in arrival order, before any prefetch. This thread reads every
//! event and issues every COPY of its VM, so a REMOVE is marked before anything is placed after
//! it: a removed page is never filled from the snapshot. While the prefetch plan has work, the
//! loop polls without waiting and places one small batch per idle turn, so a demand fault
//! waits for at most that one batch, never for the queue.

use crate::addr::{HostAddr, BASE_PAGE};
use crate::placer::{BatchPlacement, Filled, Placed, Placer};
use crate::regions::Region;
use crate::removed::RemovedRanges;
use crate::stats::VmStats;
use crate::uffd_io::{IoctlError, ReadError, UffdEvent};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use prefetch::loading_set::LoadingSet;
use prefetch::plan::{Batch, BatchKind};
use prefetch::prefetcher::PrefetchSchedule;
use prefetch::record::{RecordWindow, Recorder, Run};
use prefetch::working_set::WorkingSet;
use prefetch::PageIndex;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use userfaultfd::EventBuffer;

/// How faults are served.
#[derive(Clone, Copy, Debug)]
pub struct FaultConfig {
    /// Serve the aligned cluster of this many 4 KiB pages around each fault in one ioctl
    /// (power of two, 1..=512). Clusters never cross a region boundary.
    pub fault_around_pages: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig { fault_around_pages: DEFAULT_FAULT_AROUND_PAGES }
    }
}

/// 64 KiB clusters: measured for KVM guests here, 5.4 µs per page against 51 µs for single
/// pages, and 2 MiB clusters only reach 3.3 µs while copying 32× more per fault — memory a
/// sparse working set never touches.
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 16;

/// While prefetching, the VMM socket is looked at once every this many turns (~2 MiB of
/// prefetch): it only tells whether the VM is gone.
const SOCKET_CHECK_TURNS: u32 = 32;

/// Deferred prefetch batches (pages seen in fewer than half the runs) wait until the guest has
/// not demand-faulted for this long.
const QUIET_BEFORE_DEFERRED: Duration = Duration::from_millis(1);

/// How much of the plan a fault that overtook it pulls forward at once (see
/// `FaultLoop::pull_batch_forward`): ~100 µs of copying, the most another fault can wait.
pub const PULL_FORWARD_BURST_BYTES: u64 = 256 * 1024;

/// Why a VM's fault loop ended.
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
}

impl std::fmt::Display for VmEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEnd::VmmClosed => write!(f, "VMM closed its socket"),
            VmEnd::UffdHangup => write!(f, "userfaultfd hung up"),
            VmEnd::AddressSpaceGone => write!(f, "VMM address space gone"),
            VmEnd::Failed(why) => write!(f, "fault loop failed: {why}"),
        }
    }
}

/// Everything one VM's loop needs. Borrowed: the caller owns the VM's resources and outlives it.
pub struct FaultLoop<'a> {
    pub placer: Placer<'a>,
    pub socket: &'a UnixStream,
    pub config: FaultConfig,
    pub stats: &'a VmStats,
    /// When the VM attached (prefetch completion is timed from here).
    pub attached: Instant,
    /// Batches placed synchronously before any fault is served (the `eager` and `reap` policies).
    pub install_first: &'a [Batch],
    /// Batches placed in the background, between events (the `union` policy).
    pub prefetch: &'a [Batch],
    /// Prefetch batches of this rank or later wait until the guest is quiet (see
    /// `PrefetchSchedule::is_deferred`).
    pub prefetch_deferred_rank: Option<f64>,
    /// Record this run's first touches within the window (`record` mode).
    pub record: Option<RecordWindow>,
    /// Online refinement: demand faults on pages this set does not know are learned.
    pub learn_from: Option<&'a WorkingSet>,
    /// Set from outside (the control socket) to end the record window explicitly.
    pub end_recording: &'a AtomicBool,
    /// The bytes of `prefetch`'s batches, read in one go from a loading-set file.
    pub loading_set: Option<&'a LoadingSet>,
}

/// How a VM's loop ended, and what it recorded.
pub struct VmOutcome {
    pub end: VmEnd,
    /// `record` mode: the run.
    pub run: Option<Run>,
    /// Online refinement: (page, estimated first-touch rank, write) of pages new to the set.
    pub learned: Vec<(PageIndex, u32, bool)>,
}

struct LoopState {
    removed: RemovedRanges,
    schedule: Option<PrefetchSchedule>,
    faults: VecDeque<(HostAddr, bool)>,
    events: Vec<UffdEvent>,
    buf: EventBuffer,
    recorder: Option<Recorder>,
    learned: Vec<(PageIndex, u32, bool)>,
    demand_faults: u64,
    last_demand: Option<Instant>,
}

impl LoopState {
    /// The schedule, while it has batches left.
    fn prefetching(&mut self) -> Option<&mut PrefetchSchedule> {
        self.schedule.as_mut().filter(|s| !s.is_finished())
    }
}

enum Ready {
    Events,
    /// Nothing pending (only when polling without waiting).
    Idle,
    VmmClosed,
    UffdHangup,
}

impl FaultLoop<'_> {
    /// Serves the VM until it ends.
    pub fn run(&self) -> VmOutcome {
        let mut state = LoopState {
            removed: RemovedRanges::default(),
            schedule: (!self.prefetch.is_empty())
                .then(|| PrefetchSchedule::new(self.prefetch.to_vec(), self.prefetch_deferred_rank)),
            faults: VecDeque::new(),
            events: Vec::with_capacity(64),
            buf: EventBuffer::new(64),
            recorder: self.record.map(Recorder::new),
            learned: Vec::new(),
            demand_faults: 0,
            last_demand: None,
        };
        let end = self.install(&mut state).err().unwrap_or_else(|| self.serve_until_end(&mut state));
        VmOutcome { end, run: state.recorder.map(Recorder::finish), learned: state.learned }
    }

    /// Places `install_first` before serving any fault; faults arriving meanwhile wait.
    fn install(&self, state: &mut LoopState) -> Result<(), VmEnd> {
        self.install_first.iter().try_for_each(|batch| self.place_batch_now(state, batch))
    }

    /// Places a plan batch, reading events whenever a REMOVE is pending.
    fn place_batch_now(&self, state: &mut LoopState, batch: &Batch) -> Result<(), VmEnd> {
        self.place_batch_with(self.placer, state, batch, None)
    }

    fn place_batch_with(
        &self,
        placer: Placer<'_>,
        state: &mut LoopState,
        batch: &Batch,
        source: Option<&[u8]>,
    ) -> Result<(), VmEnd> {
        loop {
            let placement = BatchPlacement { placer, removed: &state.removed, stats: self.stats, source };
            match placement.place(batch) {
                Placed::Done => return Ok(()),
                Placed::Retry => {
                    self.read_events(state)?;
                }
                Placed::Stop => return Err(VmEnd::AddressSpaceGone),
            }
        }
    }

    fn serve_until_end(&self, state: &mut LoopState) -> VmEnd {
        let mut turn: u32 = 0;
        loop {
            turn = turn.wrapping_add(1);
            let step = match self.idle_work(state) {
                // While prefetching, a non-blocking read is the cheapest look for events: a
                // poll of uffd and socket before every 64 KiB batch measured up to 2× slower
                // prefetch here. The socket is looked at every SOCKET_CHECK_TURNS turns.
                Some(Duration::ZERO) if !turn.is_multiple_of(SOCKET_CHECK_TURNS) => match self.serve_events(state) {
                    Ok(0) => self.prefetch_one(state),
                    other => other.map(drop),
                },
                idle => {
                    let timeout = match idle {
                        None => PollTimeout::NONE,
                        // poll counts whole milliseconds: never round a wait down to a spin.
                        Some(wait) if !wait.is_zero() => {
                            PollTimeout::try_from(wait.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX)
                        }
                        Some(_) => PollTimeout::ZERO,
                    };
                    match self.wait(timeout) {
                        Ok(Ready::Events) => self.serve_events(state).map(drop),
                        Ok(Ready::Idle) if idle == Some(Duration::ZERO) => self.prefetch_one(state),
                        Ok(Ready::Idle) => Ok(()), // a deferred batch may be due now: look again
                        Ok(Ready::VmmClosed) => return VmEnd::VmmClosed,
                        Ok(Ready::UffdHangup) => return VmEnd::UffdHangup,
                        Err(end) => Err(end),
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// When the next prefetch batch may be placed: now (zero), after a wait (a deferred batch
    /// while the guest is still faulting), or never (None: nothing left to prefetch).
    fn idle_work(&self, state: &mut LoopState) -> Option<Duration> {
        let last_demand = state.last_demand;
        let schedule = state.prefetching()?;
        let next = schedule.next_batch()?;
        if !schedule.is_deferred(next) {
            return Some(Duration::ZERO);
        }
        let quiet_for = last_demand.map_or(QUIET_BEFORE_DEFERRED, |t| t.elapsed());
        Some(QUIET_BEFORE_DEFERRED.saturating_sub(quiet_for))
    }

    /// Reads pending events and serves the faults among them; returns how many were read.
    fn serve_events(&self, state: &mut LoopState) -> Result<usize, VmEnd> {
        let read = self.read_events(state)?;
        while let Some((addr, write)) = state.faults.pop_front() {
            self.serve_fault(state, addr, write)?;
        }
        Ok(read)
    }

    /// Places the next batch of the plan.
    fn prefetch_one(&self, state: &mut LoopState) -> Result<(), VmEnd> {
        let Some(batch) = state.prefetching().and_then(|s| s.next_batch()) else {
            return Ok(());
        };
        self.place_planned(state, batch)
    }

    /// Places plan batch `index` and records it; times the plan when it is the last.
    fn place_planned(&self, state: &mut LoopState, index: usize) -> Result<(), VmEnd> {
        self.place_planned_with(self.placer, state, index)
    }

    fn place_planned_with(&self, placer: Placer<'_>, state: &mut LoopState, index: usize) -> Result<(), VmEnd> {
        let Some(batch) = state.schedule.as_ref().map(|s| *s.batch(index)) else {
            return Ok(());
        };
        let source = self.loading_set.and_then(|ls| {
            let data = ls.data(index);
            if data.is_none() && batch.kind == BatchKind::Copy {
                tracing::warn!(
                    batch = index,
                    "loading-set batch failed its checksum; its pages come from the snapshot"
                );
            }
            data
        });
        self.place_batch_with(placer, state, &batch, source)?;
        if let Some(schedule) = state.schedule.as_mut() {
            schedule.placed(index);
            if schedule.is_finished() {
                VmStats::add(&self.stats.prefetch_done_us, self.attached.elapsed().as_micros().max(1) as u64);
            }
        }
        Ok(())
    }

    fn wait(&self, timeout: PollTimeout) -> Result<Ready, VmEnd> {
        // SAFETY: the raw fd belongs to the placer's uffd, which outlives this borrow.
        let uffd_fd = unsafe { BorrowedFd::borrow_raw(self.placer.uffd.as_raw_fd()) };
        let mut fds = [PollFd::new(uffd_fd, PollFlags::POLLIN), PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(Ready::Idle),
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(VmEnd::Failed(format!("poll: {e}"))),
            }
        }
        let socket = fds[1].revents().unwrap_or(PollFlags::empty());
        if socket.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Ok(Ready::VmmClosed);
        }
        if socket.contains(PollFlags::POLLIN) && self.vmm_closed_or_drained() {
            return Ok(Ready::VmmClosed);
        }
        let uffd = fds[0].revents().unwrap_or(PollFlags::empty());
        if uffd.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Ok(Ready::UffdHangup);
        }
        Ok(Ready::Events)
    }

    /// The protocol has nothing after the handshake: EOF means the VMM is gone; stray bytes are
    /// read and dropped so they cannot wake the loop forever.
    fn vmm_closed_or_drained(&self) -> bool {
        let mut buf = [0u8; 256];
        match nix::sys::socket::recv(self.socket.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(n) => {
                tracing::warn!(bytes = n, "unexpected bytes from the VMM after the handshake, ignored");
                false
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Reads all pending events: layout events take effect at once, faults are queued.
    fn read_events(&self, state: &mut LoopState) -> Result<usize, VmEnd> {
        state.events.clear();
        match self.placer.uffd.read_events(&mut state.buf, &mut state.events) {
            Ok(()) => {}
            Err(ReadError::Eof) => return Err(VmEnd::UffdHangup),
            Err(e) => return Err(VmEnd::Failed(e.to_string())),
        }
        let read = state.events.len();
        for event in state.events.drain(..) {
            match event {
                UffdEvent::Fault { addr, write } => state.faults.push_back((addr, write)),
                UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                    VmStats::add(&self.stats.remove_events, 1);
                    tracing::debug!(%start, %end, "range removed: it will read as zeros");
                    state.removed.insert(start, end);
                }
                UffdEvent::Remap { from, to, len } => {
                    // Firecracker never enables REMAP; serving a moved range would need a
                    // region map update we cannot validate. Refuse loudly.
                    tracing::error!(%from, %to, len, "VMM remapped guest memory; remapped pages are not served");
                }
                UffdEvent::Fork => tracing::warn!("VMM forked; the child's userfaultfd is not served"),
            }
        }
        Ok(read)
    }

    fn serve_fault(&self, state: &mut LoopState, addr: HostAddr, write: bool) -> Result<(), VmEnd> {
        let started = Instant::now();
        let Some(region) = self.placer.regions.find(addr) else {
            tracing::error!(%addr, "fault outside every region of the handshake; cannot serve it");
            return Ok(());
        };
        let unit = region.page_size.bytes();
        let page = addr.align_down(unit);
        let file_page = region.file_offset_of(addr).0 / BASE_PAGE;
        self.note_demand(state, file_page, write);
        if !self.pull_batch_forward(state, file_page, page, unit)? {
            loop {
                match self.place_around(&state.removed, region, page, write) {
                    Ok(()) => break,
                    Err(IoctlError::Again { .. }) => {
                        self.read_events(state)?;
                    }
                    Err(IoctlError::VmGone) => return Err(VmEnd::AddressSpaceGone),
                    Err(e) => {
                        tracing::error!(%addr, "cannot serve fault: {e}");
                        break;
                    }
                }
            }
        }
        VmStats::add(&self.stats.faults, 1);
        self.stats.latency.record(started.elapsed());
        Ok(())
    }

    /// A fault in a plan batch not placed yet: the guest has overtaken the plan. It gets that
    /// batch and the (not deferred) ones after it in plan order, up to [`PULL_FORWARD_BURST_BYTES`], placed
    /// without waking and then woken together: one wake-up per burst instead of one per batch
    /// (measured: a cross-CPU wake-up here costs more than copying a 32 KiB batch). The plan
    /// goes on after the burst. Returns whether the faulting page is served.
    fn pull_batch_forward(
        &self,
        state: &mut LoopState,
        file_page: PageIndex,
        page: HostAddr,
        unit: u64,
    ) -> Result<bool, VmEnd> {
        let Some(schedule) = state.prefetching() else {
            return Ok(false);
        };
        let Some(first) = schedule.batch_containing(file_page).filter(|&b| !schedule.is_placed(b)) else {
            return Ok(false);
        };
        schedule.follow(first);
        VmStats::add(&self.stats.faults_unreached_plan, 1);
        let quiet = Placer { wake: false, ..self.placer };
        let mut burst = vec![first];
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(index) = next {
            self.place_planned_with(quiet, state, index)?;
            bytes += state.schedule.as_ref().map_or(0, |s| s.batch(index).pages * BASE_PAGE);
            // The burst never runs into deferred batches: one-off pages of other inputs.
            next = state
                .prefetching()
                .filter(|_| bytes < PULL_FORWARD_BURST_BYTES)
                .and_then(|s| s.next_batch().filter(|&i| !s.is_deferred(i)));
            burst.extend(next);
        }
        if let Some(schedule) = state.schedule.as_ref() {
            let placement =
                BatchPlacement { placer: self.placer, removed: &state.removed, stats: self.stats, source: None };
            burst.iter().for_each(|&index| placement.wake(schedule.batch(index)));
        }
        // Placing skips removed ranges: a removed page still needs its zeros.
        Ok(!state.removed.overlaps(page, unit))
    }

    /// Bookkeeping of a demand fault on file page `page`: recording, the prefetch plan's view
    /// of it, online refinement.
    fn note_demand(&self, state: &mut LoopState, page: PageIndex, write: bool) {
        if let Some(recorder) = state.recorder.as_mut() {
            if self.end_recording.load(Ordering::Relaxed) {
                recorder.end();
            }
            recorder.record(page, write);
        }
        let mut rank_estimate = state.demand_faults;
        state.demand_faults += 1;
        state.last_demand = Some(Instant::now());
        if let Some(schedule) = state.schedule.as_ref() {
            rank_estimate += schedule.placed_pages();
            if !schedule.is_finished() {
                VmStats::add(&self.stats.faults_during_prefetch, 1);
            }
            if schedule.batch_containing(page).is_none() {
                VmStats::add(&self.stats.faults_outside_plan, 1);
            }
        }
        if let Some(set) = self.learn_from {
            if !set.pages.contains_key(&page) {
                state.learned.push((page, u32::try_from(rank_estimate).unwrap_or(u32::MAX), write));
            }
        }
    }

    /// Places the fault's cluster, falling back to the faulting page alone when part of the
    /// cluster is already present or removed, and waking the page if it is already there.
    fn place_around(
        &self,
        removed: &RemovedRanges,
        region: &Region,
        page: HostAddr,
        write: bool,
    ) -> Result<(), IoctlError> {
        let unit = region.page_size.bytes();
        let (start, len) = self.cluster(region, page);
        if len > unit && !removed.overlaps(start, len) {
            match self.place(removed, region, start, len, write) {
                Err(IoctlError::Exists) => {} // a neighbour is present: serve the page alone
                other => return other,
            }
        }
        match self.place(removed, region, page, unit, write) {
            Err(IoctlError::Exists) => {
                // Placed meanwhile by someone else, possibly without waking our thread.
                VmStats::add(&self.stats.already_present, 1);
                self.placer.uffd.wake(page, unit)
            }
            other => other,
        }
    }

    /// The aligned fault-around cluster containing `page`, clipped to its region.
    fn cluster(&self, region: &Region, page: HostAddr) -> (HostAddr, u64) {
        let size = (self.config.fault_around_pages * BASE_PAGE).max(region.page_size.bytes());
        let start = page.align_down(size).0.max(region.host.0);
        let end = (page.align_down(size).0 + size).min(region.host_end());
        (HostAddr(start), end - start)
    }

    /// Places `[start, start + len)`: zeros where removed, else the snapshot's content.
    fn place(
        &self,
        removed: &RemovedRanges,
        region: &Region,
        start: HostAddr,
        len: u64,
        write: bool,
    ) -> Result<(), IoctlError> {
        let filled = if removed.overlaps(start, len) {
            VmStats::add(&self.stats.removed_faults, 1);
            self.placer.zeros(region.page_size, start, len, write)?
        } else {
            self.placer.snapshot_range(region, start, len, write)?
        };
        let counter = match filled {
            Filled::Copied => &self.stats.copied_pages,
            Filled::ZeroMapped => &self.stats.zeropage_pages,
            Filled::ZeroCopied => &self.stats.zero_copied_pages,
        };
        VmStats::add(counter, len / BASE_PAGE);
        Ok(())
    }
}
