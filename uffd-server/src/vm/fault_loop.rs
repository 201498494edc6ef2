//! The fault loop of one VM: the only reader of its events, and the driver of its stages.
//!
//! One thread per VM, in `poll` on the VM's uffd and its VMM socket: the socket closing is the
//! only reliable sign that the VMM is gone (the uffd itself reports nothing when its process
//! dies). Each turn does the first of:
//! 1. place the next batch of a synchronous plan (`eager`, `reap`): faults wait;
//! 2. serve the oldest queued fault — a fault read is always served before the loop waits, so
//!    none is left unanswered while it sleeps;
//! 3. place the next prefetch batch if the plan has one due and no event is pending;
//! 4. wait for an event (or for a deferred batch to come due).
//!
//! Every event is read here, and every COPY of the VM is issued from this thread, so a REMOVE
//! is marked before anything is placed after it: a removed page is never filled from the
//! snapshot. A stage that meets a pending event returns [`Step::NeedEvents`]; the loop reads the
//! events and asks it again.

use super::demand::Demand;
use super::learner::Learner;
use super::prefetcher::{Prefetcher, Pulled};
use super::removed::RemovedRanges;
use super::{contain, Fault, Guest, Step, VmEnd, VmmLink};
use crate::addr::HostAddr;
use crate::memory::uffd_io::{ReadError, UffdEvent};
use crate::stats::count;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};
use userfaultfd::EventBuffer;

/// While prefetching, the VMM socket is looked at once every this many turns (~2 MiB of
/// prefetch): it only tells whether the VM is gone.
const SOCKET_CHECK_TURNS: u32 = 32;

/// Events read at once.
const EVENTS_PER_READ: usize = 64;

/// What a wait found.
enum Ready {
    Events,
    /// Nothing pending before the timeout.
    Idle,
    VmmClosed,
    UffdHangup,
    /// The server asked its VMs to stop.
    StopRequested,
}

/// A stage whose panic is contained.
#[derive(Clone, Copy, Debug)]
enum Stage {
    Prefetch,
    Learn,
}

/// One VM's loop and the state only it touches.
pub struct FaultLoop<'a> {
    guest: Guest<'a>,
    link: &'a VmmLink,
    demand: Demand,
    prefetcher: Option<Prefetcher<'a>>,
    learner: Option<Learner<'a>>,
    removed: RemovedRanges,
    /// Faults read and not served yet: address, write, when the event was read.
    faults: VecDeque<(HostAddr, bool, Instant)>,
    events: Vec<UffdEvent>,
    buf: EventBuffer,
}

impl<'a> FaultLoop<'a> {
    /// A loop over `guest`'s events; `link` tells when its VMM is gone; `removed` holds the
    /// ranges removed before the loop (a VM taken over) and journals the new ones.
    pub fn new(
        guest: Guest<'a>,
        link: &'a VmmLink,
        demand: Demand,
        prefetcher: Option<Prefetcher<'a>>,
        learner: Option<Learner<'a>>,
        removed: RemovedRanges,
    ) -> FaultLoop<'a> {
        FaultLoop {
            guest,
            link,
            demand,
            prefetcher,
            learner,
            removed,
            faults: VecDeque::new(),
            events: Vec::with_capacity(EVENTS_PER_READ),
            buf: EventBuffer::new(EVENTS_PER_READ),
        }
    }

    /// The VM being served.
    pub fn guest(&self) -> &Guest<'a> {
        &self.guest
    }

    /// Serves the VM until it ends.
    pub fn run(&mut self) -> VmEnd {
        let mut turn: u32 = 0;
        loop {
            turn = turn.wrapping_add(1);
            if let Err(end) = self.turn(turn) {
                return end;
            }
        }
    }

    /// What the VM taught us (nothing if the learning stage was dropped), its removed ranges
    /// (with their journal), and how far its plan was placed.
    pub fn finish(self) -> super::Served {
        super::Served {
            learned: self.learner.map(Learner::finish).unwrap_or_default(),
            removed: self.removed,
            progress: self.prefetcher.as_ref().map(Prefetcher::progress),
        }
    }

    fn turn(&mut self, turn: u32) -> Result<(), VmEnd> {
        // A safe point: every fault read is served and every REMOVE read is journaled, so a
        // successor that wakes the VM's ranges loses nothing.
        if self.faults.is_empty() && self.link.stop.as_ref().is_some_and(|stop| stop.is_requested()) {
            return Err(VmEnd::Stopped);
        }
        if self.prefetcher.as_ref().is_some_and(Prefetcher::is_installing) {
            return self.prefetch_step();
        }
        if let Some((addr, write, read_at)) = self.faults.pop_front() {
            return self.handle_fault(addr, write, read_at);
        }
        let due = self.prefetcher.as_mut().and_then(Prefetcher::next_wait);
        match due {
            // While prefetching, a non-blocking read is the cheapest look for events: a poll of
            // uffd and socket before every 64 KiB batch measured up to 2× slower prefetch here.
            Some(Duration::ZERO) if !turn.is_multiple_of(SOCKET_CHECK_TURNS) => match self.read_events()? {
                0 => self.prefetch_step(),
                _ => Ok(()),
            },
            due => self.wait(due),
        }
    }

    /// Waits until an event arrives or `due` (the next prefetch batch) passes.
    fn wait(&mut self, due: Option<Duration>) -> Result<(), VmEnd> {
        let timeout = match due {
            None => PollTimeout::NONE,
            // poll counts whole milliseconds: never round a wait down to a spin.
            Some(wait) if !wait.is_zero() => {
                PollTimeout::try_from(wait.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX)
            }
            Some(_) => PollTimeout::ZERO,
        };
        match self.poll(timeout)? {
            Ready::Events => self.read_events().map(drop),
            Ready::Idle if due == Some(Duration::ZERO) => self.prefetch_step(),
            Ready::Idle => Ok(()), // a deferred batch may be due now: look again
            Ready::VmmClosed => Err(VmEnd::VmmClosed),
            Ready::UffdHangup => Err(VmEnd::UffdHangup),
            Ready::StopRequested => Ok(()), // the next turn stops
        }
    }

    fn prefetch_step(&mut self) -> Result<(), VmEnd> {
        let Some(prefetcher) = self.prefetcher.as_mut() else {
            return Ok(());
        };
        match contain(|| prefetcher.place_next(&self.guest, &self.removed)) {
            Ok(Step::Done) => Ok(()),
            Ok(Step::NeedEvents) => self.read_events().map(drop),
            Ok(Step::Gone) => Err(VmEnd::AddressSpaceGone),
            Err(panic) => {
                self.stage_panicked(Stage::Prefetch, &panic);
                Ok(())
            }
        }
    }

    /// Serves the fault at `addr`, read at `read_at`: from then until its page is placed, the
    /// faulting vCPU stalls on us.
    fn handle_fault(&mut self, addr: HostAddr, write: bool, read_at: Instant) -> Result<(), VmEnd> {
        let started = Instant::now();
        let Some(fault) = Fault::locate(self.guest.regions, addr, write) else {
            if self.guest.log_limit.allow() {
                tracing::error!(%addr, "fault outside every region of the handshake; cannot serve it");
            }
            return Ok(());
        };
        self.note_demand(&fault);
        loop {
            match self.serve_once(&fault) {
                Step::Done => break,
                Step::NeedEvents => {
                    self.read_events()?;
                }
                Step::Gone => return Err(VmEnd::AddressSpaceGone),
            }
        }
        count(&self.guest.stats.faults, 1);
        let now = Instant::now(); // one clock read for both figures
        self.guest.stats.latency.record(now.saturating_duration_since(started));
        self.guest.stats.stall.record(now.saturating_duration_since(read_at));
        Ok(())
    }

    /// Serves `fault`: by pulling the plan forward if it holds the page, else on demand.
    fn serve_once(&mut self, fault: &Fault) -> Step {
        if let Some(prefetcher) = self.prefetcher.as_mut() {
            match contain(|| prefetcher.pull_forward(&self.guest, &self.removed, fault)) {
                Ok(Pulled::Covered) => return Step::Done,
                Ok(Pulled::NotCovered) => {}
                Ok(Pulled::Stopped(step)) => return step,
                Err(panic) => self.stage_panicked(Stage::Prefetch, &panic),
            }
        }
        self.demand.serve(&self.guest, &self.removed, fault)
    }

    /// Tells the prefetch and learning stages about a demand fault.
    fn note_demand(&mut self, fault: &Fault) {
        let mut prefetched_pages = 0;
        if let Some(prefetcher) = self.prefetcher.as_mut() {
            prefetcher.note_demand(&self.guest, fault.file_page);
            prefetched_pages = prefetcher.placed_pages();
        }
        if let Some(learner) = self.learner.as_mut() {
            if let Err(panic) = contain(|| learner.note(fault.file_page, fault.write, prefetched_pages)) {
                self.stage_panicked(Stage::Learn, &panic);
            }
        }
    }

    /// Drops a stage that panicked; the VM goes on, served on demand.
    fn stage_panicked(&mut self, stage: Stage, panic: &str) {
        count(&self.guest.stats.stage_panics, 1);
        match stage {
            Stage::Prefetch => {
                self.prefetcher = None;
                tracing::error!("the prefetch stage panicked ({panic}); this VM is served on demand from now on");
            }
            Stage::Learn => {
                self.learner = None;
                tracing::error!("the learning stage panicked ({panic}); nothing is learned from this VM");
            }
        }
        // A burst placed without waking may have been cut short.
        self.guest.wake_all();
    }

    fn poll(&self, timeout: PollTimeout) -> Result<Ready, VmEnd> {
        let uffd = self.guest.placer.uffd();
        // uffd, then whichever of socket, pidfd and stop signal the VM has, in that order.
        let link = self.link;
        let mut fds = vec![PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        fds.extend(link.socket.as_ref().map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)));
        fds.extend(link.pidfd.as_ref().map(|p| PollFd::new(p.as_fd(), PollFlags::POLLIN)));
        fds.extend(link.stop.as_ref().map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)));
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(Ready::Idle),
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(VmEnd::Failed(format!("poll: {e}"))),
            }
        }
        let revents: Vec<PollFlags> = fds.iter().map(|fd| fd.revents().unwrap_or(PollFlags::empty())).collect();
        let mut next = revents[1..].iter();
        if link.socket.is_some() {
            let socket = next.next().copied().unwrap_or(PollFlags::empty());
            if socket.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return Ok(Ready::VmmClosed);
            }
            if socket.contains(PollFlags::POLLIN) && self.vmm_closed_or_drained() {
                return Ok(Ready::VmmClosed);
            }
        }
        // A pidfd turns readable when its process has exited.
        if link.pidfd.is_some() && !next.next().copied().unwrap_or(PollFlags::empty()).is_empty() {
            return Ok(Ready::VmmClosed);
        }
        let stop = link.stop.is_some() && !next.next().copied().unwrap_or(PollFlags::empty()).is_empty();
        let uffd = revents[0];
        if uffd.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Ok(Ready::UffdHangup);
        }
        if uffd.contains(PollFlags::POLLIN) {
            return Ok(Ready::Events);
        }
        Ok(if stop { Ready::StopRequested } else { Ready::Idle })
    }

    /// The protocol has nothing after the handshake: EOF means the VMM is gone; stray bytes are
    /// read and dropped so they cannot wake the loop forever.
    fn vmm_closed_or_drained(&self) -> bool {
        let Some(socket) = self.link.socket.as_ref() else { return false };
        let mut buf = [0u8; 64 * 1024];
        match nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(n) => {
                if self.guest.log_limit.allow() {
                    tracing::warn!(bytes = n, "unexpected bytes from the VMM after the handshake, ignored");
                }
                false
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Reads every pending event: layout events take effect at once, faults are queued.
    /// Returns how many were read.
    fn read_events(&mut self) -> Result<usize, VmEnd> {
        self.events.clear();
        match self.guest.placer.uffd().read_events(&mut self.buf, &mut self.events) {
            Ok(()) => {}
            Err(ReadError::Eof) => return Err(VmEnd::UffdHangup),
            Err(e) => return Err(VmEnd::Failed(e.to_string())),
        }
        let read = self.events.len();
        let read_at = Instant::now();
        for event in self.events.drain(..) {
            match event {
                UffdEvent::Fault { addr, write } => self.faults.push_back((addr, write, read_at)),
                UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                    count(&self.guest.stats.remove_events, 1);
                    tracing::debug!(%start, %end, "range removed: it will read as zeros");
                    // Journaled before this function returns, so before anything is placed.
                    if let Err(e) = self.removed.insert(start, end) {
                        tracing::error!("{e}; this VM cannot be recovered if the server dies");
                    }
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
}
