//! The fault loop of one VM: the only reader of its events, and the driver of its stages.
//!
//! One thread per VM, in `epoll_wait` on the VM's uffd and its VMM socket: the socket closing is
//! the only reliable sign that the VMM is gone (the uffd itself reports nothing when its process
//! dies). Each turn does the first of:
//! 1. place the next batch of a synchronous plan (`eager`, `reap`): faults wait;
//! 2. serve the oldest queued fault — a fault read is always served before the loop waits, so
//!    none is left unanswered while it sleeps;
//! 3. place the next prefetch batch if the plan has one due and no event is pending;
//! 4. wait for an event (or for a deferred batch to come due): with nothing left to prefetch,
//!    in a blocking `read` of the uffd ([`super::blocked_read`]), else in `epoll_wait`.
//!
//! Every event is read here, and every COPY of the VM is issued from this thread, so a REMOVE
//! is marked before anything is placed after it: a removed page is never filled from the
//! snapshot. A stage that meets a pending event returns [`Step::NeedEvents`]; the loop reads the
//! events and asks it again.

use super::blocked_read::BlockedRead;
use super::demand::Demand;
use super::learner::Learner;
use super::prefetcher::{Prefetcher, Pulled};
use super::removed::RemovedRanges;
use super::{contain, Fault, Guest, Step, VmEnd, VmmLink};
use crate::addr::HostAddr;
use crate::memory::uffd_io::{ReadError, UffdEvent, MSG_LEN};
use crate::recovery::events_file::EVENTS_PER_READ;
use crate::stats::count;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// While prefetching, the VMM socket is looked at once every this many turns (~2 MiB of
/// prefetch): it only tells whether the VM is gone.
const SOCKET_CHECK_TURNS: u32 = 32;

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

/// The loop's epoll set: the uffd, and whichever of VMM socket, VMM pidfd and stop signal the VM
/// has. One `epoll_wait` costs what one poll of a single fd does; a poll of four fds cost ~0.5 µs
/// more per fault when guest and server share a CPU (measured here).
///
/// Once nothing is left to prefetch, the loop waits in a blocking `read` instead, one syscall
/// less per fault; the uffd is then out of this set, and the watcher of
/// [`super::blocked_read`] watches the set for the loop (the uffd reports nothing when its VMM
/// dies, nor when the server stops).
struct Waiter {
    epoll: Epoll,
}

/// What turned ready, per source (empty: nothing, or not watched).
struct Readiness {
    uffd: EpollFlags,
    socket: EpollFlags,
    pidfd: EpollFlags,
    stop: EpollFlags,
}

impl Waiter {
    const UFFD: u64 = 0;
    const SOCKET: u64 = 1;
    const PIDFD: u64 = 2;
    const STOP: u64 = 3;

    fn new(uffd: BorrowedFd<'_>, link: &VmmLink) -> nix::Result<Waiter> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let readable = |key| EpollEvent::new(EpollFlags::EPOLLIN, key);
        epoll.add(uffd, readable(Self::UFFD))?;
        if let Some(socket) = &link.socket {
            epoll.add(socket, readable(Self::SOCKET))?;
        }
        if let Some(pidfd) = &link.pidfd {
            epoll.add(pidfd, readable(Self::PIDFD))?;
        }
        if let Some(stop) = &link.stop {
            epoll.add(stop.as_fd(), readable(Self::STOP))?;
        }
        Ok(Waiter { epoll })
    }

    /// Takes the uffd out of the set (the loop reads it blocking) or puts it back.
    fn watch_uffd(&self, uffd: BorrowedFd<'_>, watched: bool) -> nix::Result<()> {
        if watched {
            self.epoll.add(uffd, EpollEvent::new(EpollFlags::EPOLLIN, Self::UFFD))
        } else {
            self.epoll.delete(uffd)
        }
    }

    /// What is ready within `timeout`; None if nothing is.
    fn wait(&self, timeout: EpollTimeout) -> Result<Option<Readiness>, VmEnd> {
        let mut events = [EpollEvent::empty(); 4];
        let ready = loop {
            match self.epoll.wait(&mut events, timeout) {
                Ok(ready) => break ready,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(VmEnd::Failed(format!("epoll_wait: {e}"))),
            }
        };
        if ready == 0 {
            return Ok(None);
        }
        let none = EpollFlags::empty();
        let mut readiness = Readiness { uffd: none, socket: none, pidfd: none, stop: none };
        for event in &events[..ready] {
            let flags = event.events();
            match event.data() {
                Self::UFFD => readiness.uffd = flags,
                Self::SOCKET => readiness.socket = flags,
                Self::PIDFD => readiness.pidfd = flags,
                Self::STOP => readiness.stop = flags,
                _ => {} // only the keys above are ever added
            }
        }
        Ok(Some(readiness))
    }
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
    /// Where events are read into when the VM has no journal (and so no events file).
    unjournaled_buf: Box<[u8]>,
    /// Set while the loop waits in a blocking `read` of the uffd.
    blocked: Option<BlockedRead>,
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
            unjournaled_buf: vec![0; EVENTS_PER_READ * MSG_LEN].into_boxed_slice(),
            blocked: None,
        }
    }

    /// The VM being served.
    pub fn guest(&self) -> &Guest<'a> {
        &self.guest
    }

    /// Serves the VM until it ends.
    pub fn run(&mut self) -> VmEnd {
        let waiter = match Waiter::new(self.guest.placer.uffd().as_fd(), self.link) {
            Ok(waiter) => waiter,
            Err(e) => return VmEnd::Failed(format!("cannot wait for the VM's events: epoll: {e}")),
        };
        let mut turn: u32 = 0;
        loop {
            turn = turn.wrapping_add(1);
            if let Err(end) = self.turn(&waiter, turn) {
                // Whoever has the uffd next (a successor, this server after a failed handover)
                // finds it as it came: non-blocking.
                let _ = self.stop_blocking(&waiter);
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

    fn turn(&mut self, waiter: &Waiter, turn: u32) -> Result<(), VmEnd> {
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
            Some(Duration::ZERO) if !turn.is_multiple_of(SOCKET_CHECK_TURNS) && self.blocked.is_none() => {
                match self.read_events()? {
                    0 => self.prefetch_step(),
                    _ => Ok(()),
                }
            }
            None if self.start_blocking(waiter) => self.wait_in_read(waiter),
            due => {
                self.stop_blocking(waiter)?;
                self.wait(waiter, due)
            }
        }
    }

    /// Waits until an event arrives or `due` (the next prefetch batch) passes.
    fn wait(&mut self, waiter: &Waiter, due: Option<Duration>) -> Result<(), VmEnd> {
        let timeout = match due {
            None => EpollTimeout::NONE,
            // epoll counts whole milliseconds: never round a wait down to a spin.
            Some(wait) if !wait.is_zero() => {
                EpollTimeout::try_from(wait.max(Duration::from_millis(1))).unwrap_or(EpollTimeout::MAX)
            }
            Some(_) => EpollTimeout::ZERO,
        };
        match self.ready(waiter, timeout)? {
            Ready::Events => self.read_events().map(drop),
            Ready::Idle if due == Some(Duration::ZERO) => self.prefetch_step(),
            Ready::Idle => Ok(()), // a deferred batch may be due now: look again
            Ready::VmmClosed => Err(VmEnd::VmmClosed),
            Ready::UffdHangup => Err(VmEnd::UffdHangup),
            Ready::StopRequested => Ok(()), // the next turn stops
        }
    }

    /// Switches to waiting in a blocking `read` (nothing left to prefetch): the uffd out of
    /// the epoll set, which the watcher watches instead. False if this VM cannot (neither
    /// socket nor pidfd to tell the VMM's end, or the watcher could not take it).
    fn start_blocking(&mut self, waiter: &Waiter) -> bool {
        if self.blocked.is_some() {
            return true;
        }
        let uffd = self.guest.placer.uffd();
        if !self.link.shows_its_end() || waiter.watch_uffd(uffd.as_fd(), false).is_err() {
            return false;
        }
        match BlockedRead::register(waiter.epoll.0.as_fd()) {
            Some(blocked) if uffd.set_blocking(true).is_ok() => {
                self.blocked = Some(blocked);
                true
            }
            _ => {
                // Waits in epoll after all: the uffd goes back into the set.
                let _ = waiter.watch_uffd(uffd.as_fd(), true);
                false
            }
        }
    }

    /// Back to `epoll_wait` and non-blocking reads, if the loop was waiting in `read`.
    fn stop_blocking(&mut self, waiter: &Waiter) -> Result<(), VmEnd> {
        let Some(blocked) = self.blocked.take() else { return Ok(()) };
        drop(blocked);
        let uffd = self.guest.placer.uffd();
        uffd.set_blocking(false).map_err(|e| VmEnd::Failed(format!("cannot make the uffd non-blocking again: {e}")))?;
        waiter.watch_uffd(uffd.as_fd(), true).map_err(|e| VmEnd::Failed(format!("epoll: {e}")))
    }

    /// Waits in a blocking `read` for the next events. Interrupted by the watcher, the loop
    /// goes back to its epoll set and looks at what turned ready there.
    fn wait_in_read(&mut self, waiter: &Waiter) -> Result<(), VmEnd> {
        self.read_events()?;
        if !self.blocked.as_ref().is_some_and(BlockedRead::interrupted) {
            return Ok(());
        }
        self.stop_blocking(waiter)?;
        match self.ready(waiter, EpollTimeout::ZERO)? {
            Ready::Events => self.read_events().map(drop),
            Ready::VmmClosed => Err(VmEnd::VmmClosed),
            Ready::UffdHangup => Err(VmEnd::UffdHangup),
            Ready::Idle | Ready::StopRequested => Ok(()), // the next turn stops, or blocks again
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
    }

    /// Waits up to `timeout` for the uffd, the VMM or the stop signal.
    fn ready(&self, waiter: &Waiter, timeout: EpollTimeout) -> Result<Ready, VmEnd> {
        let Some(ready) = waiter.wait(timeout)? else { return Ok(Ready::Idle) };
        let closed = EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        if ready.socket.intersects(closed) {
            return Ok(Ready::VmmClosed);
        }
        if ready.socket.contains(EpollFlags::EPOLLIN) && self.vmm_closed_or_drained() {
            return Ok(Ready::VmmClosed);
        }
        // A pidfd turns readable when its process has exited.
        if !ready.pidfd.is_empty() {
            return Ok(Ready::VmmClosed);
        }
        if ready.uffd.intersects(closed) {
            return Ok(Ready::UffdHangup);
        }
        if ready.uffd.contains(EpollFlags::EPOLLIN) {
            return Ok(Ready::Events);
        }
        Ok(if ready.stop.is_empty() { Ready::Idle } else { Ready::StopRequested })
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
        let buf = self.removed.read_buffer().unwrap_or(&mut self.unjournaled_buf);
        let uffd = self.guest.placer.uffd();
        let read = match &self.blocked {
            Some(blocked) => uffd.read_events_with(buf, &mut self.events, |fd, buf| blocked.read(fd, buf)),
            None => uffd.read_events(buf, &mut self.events),
        };
        match read {
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
                    // Tests: the process dies between the read and the journal append (the
                    // events file must carry the REMOVE to a successor).
                    fail::fail_point!("remove-read", |_| {
                        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
                        Err(VmEnd::Failed("killed by a failpoint".into()))
                    });
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
                UffdEvent::Fork { .. } => tracing::warn!("VMM forked; the child's userfaultfd is not served"),
            }
        }
        Ok(read)
    }
}
