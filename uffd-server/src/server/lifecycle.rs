//! The server as a whole: its sockets bound (or taken over), readiness told to systemd, and
//! stopping — on SIGTERM/SIGINT (journals kept for the next start) or by handing everything to
//! a successor.

use super::serve_vm::Carried;
use super::Lifecycle;
use crate::config::{ServerConfig, ServerError};
use crate::control::CONTROL_SOCKET;
use crate::recovery::handover::{self, HandedVm, Message};
use crate::recovery::StopSignal;
use crate::sockets;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long stopping waits for the VMs to reach a safe point (each is one turn of its loop
/// away; a connection still in its handshake may take up to the handshake timeout).
const STOP_WAIT: Duration = Duration::from_secs(15);

/// How long a server stopping (or handing over) waits for its disk cache to write the chunks
/// it holds back (at most 64 MiB: a few hundred ms here; systemd waits 90 s by default).
pub(super) const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Every socket a server listens on, and the socket directory's lock.
pub(super) struct Sockets {
    pub lock: OwnedFd,
    pub control: UnixListener,
    pub snapshots: Vec<(String, UnixListener)>,
    pub metrics: Option<TcpListener>,
}

impl Sockets {
    /// Binds every socket the configuration names (a stale socket file is replaced).
    pub fn bind(config: &ServerConfig, lock: Option<OwnedFd>) -> Result<Sockets, ServerError> {
        let lock = match lock {
            Some(lock) => lock,
            None => sockets::lock_dir(&config.socket_dir)?,
        };
        let snapshots = config
            .names()
            .into_iter()
            .map(|name| Ok((name.to_string(), sockets::bind(&config.socket_path(name), config.access())?)))
            .collect::<Result<Vec<_>, ServerError>>()?;
        let control = sockets::bind(&config.socket_dir.join(CONTROL_SOCKET), sockets::Access::Owner)?;
        Ok(Sockets { lock, control, snapshots, metrics: bind_metrics(config)? })
    }
}

/// The metrics listener the configuration asks for.
pub(super) fn bind_metrics(config: &ServerConfig) -> Result<Option<TcpListener>, ServerError> {
    config
        .metrics_listen
        .as_ref()
        .map(|addr| TcpListener::bind(addr).map_err(|e| ServerError::Metrics(addr.clone(), e.to_string())))
        .transpose()
}

/// Copies of the listening sockets, kept to pass to a successor (the originals are in use).
pub(super) struct HandoverFds {
    lock: OwnedFd,
    control: OwnedFd,
    snapshots: Vec<(String, OwnedFd)>,
    metrics: Option<OwnedFd>,
}

impl HandoverFds {
    /// New copies of the snapshot listeners (to accept on again after a failed handover).
    pub fn listeners(&self) -> io::Result<Vec<(String, UnixListener)>> {
        self.snapshots.iter().map(|(name, fd)| Ok((name.clone(), UnixListener::from(fd.try_clone()?)))).collect()
    }

    pub fn of(
        lock: &OwnedFd,
        control: &UnixListener,
        snapshots: &[(String, UnixListener)],
        metrics: Option<&TcpListener>,
    ) -> io::Result<HandoverFds> {
        Ok(HandoverFds {
            lock: lock.try_clone()?,
            control: control.as_fd().try_clone_to_owned()?,
            snapshots: snapshots
                .iter()
                .map(|(name, l)| Ok((name.clone(), l.as_fd().try_clone_to_owned()?)))
                .collect::<io::Result<_>>()?,
            metrics: metrics.map(|m| m.as_fd().try_clone_to_owned()).transpose()?,
        })
    }
}

impl Lifecycle {
    /// Accept loops and VM threads still running (a VM thread gives its VM up before it ends).
    fn running(&self) -> usize {
        self.accept_loops.load(Ordering::SeqCst) + self.vm_threads.load(Ordering::SeqCst)
    }

    /// Stops accepting and stops every VM at a safe point; returns once all have (or after
    /// [`STOP_WAIT`], logging the ones that did not).
    pub fn stop_all(&self) {
        self.stop.request();
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            let running = self.running();
            if running == 0 {
                return;
            }
            if Instant::now() > deadline {
                tracing::error!(running, "not every VM stopped in time");
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// The predecessor's side of a handover (control command `handover`), on `stream`: stops
/// everything, sends the sockets and VMs, and once the successor confirms, runs `before_exit`
/// (the successor serves by then) and exits the process. If the successor fails first,
/// `resume` serves every VM again (their fds and journals are still ours) and this server
/// goes on.
pub(super) fn hand_over(
    stream: &UnixStream,
    lifecycle: &Lifecycle,
    fds: &HandoverFds,
    resume: &dyn Fn(Vec<HandedVm<Carried>>),
    before_exit: &dyn Fn(),
) {
    let started = Instant::now();
    if lifecycle.ending.swap(true, Ordering::SeqCst) {
        tracing::warn!("a handover was asked for while this server is already ending: refused");
        return;
    }
    tracing::info!("handing over to a successor");
    lifecycle.stop.request();
    let mut vms = Vec::new();
    match send_everything(stream, fds, lifecycle, &mut vms) {
        Ok(()) => {
            let handed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            tracing::info!(vms = vms.len(), handed_us, "handed over; exiting");
            before_exit();
            std::process::exit(0);
        }
        Err(e) => {
            // Every VM thread has ended or will give its VM: collect the rest, then go on.
            while lifecycle.running() > 0 {
                vms.extend(lifecycle.handover.take(Duration::from_millis(1)));
            }
            vms.extend(lifecycle.handover.take(Duration::ZERO));
            tracing::error!(vms = vms.len(), "handover failed ({e}): serving every VM again");
            lifecycle.stop.clear();
            resume(vms);
            lifecycle.ending.store(false, Ordering::SeqCst);
        }
    }
}

/// Sends the listeners, then each VM as it stops (kept in `sent`: they are ours until the
/// successor confirms), until every VM thread has ended.
fn send_everything(
    stream: &UnixStream,
    fds: &HandoverFds,
    lifecycle: &Lifecycle,
    sent: &mut Vec<HandedVm<Carried>>,
) -> Result<(), handover::HandoverError> {
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut listeners: Vec<RawFd> = vec![fds.lock.as_raw_fd(), fds.control.as_raw_fd()];
    listeners.extend(fds.snapshots.iter().map(|(_, fd)| fd.as_raw_fd()));
    listeners.extend(fds.metrics.as_ref().map(AsRawFd::as_raw_fd));
    let snapshots = fds.snapshots.iter().map(|(name, _)| name.clone()).collect();
    let listeners_message: Message<Carried> = Message::Listeners { snapshots, metrics: fds.metrics.is_some() };
    handover::send(stream, &listeners_message, &listeners)?;
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        // Read before taking: a thread that ends after this has given its VM before.
        let running = lifecycle.running();
        let stopped = lifecycle.handover.take(Duration::from_micros(200));
        // Kept before they are sent: if the handover fails, each is taken back.
        let before = sent.len();
        sent.extend(stopped);
        for vm in &sent[before..] {
            let mut vm_fds = vec![vm.uffd.as_raw_fd()];
            vm_fds.extend(vm.socket.as_ref().map(AsRawFd::as_raw_fd));
            let message =
                Message::Vm { journal: vm.journal.clone(), socket: vm.socket.is_some(), carried: &vm.carried };
            handover::send(stream, &message, &vm_fds)?;
        }
        if running == 0 && sent.len() == before {
            break;
        }
        if Instant::now() > deadline {
            tracing::error!(running, "not every VM stopped in time; those left stay journaled");
            break;
        }
    }
    handover::send(stream, &Message::<Carried>::Done { vms: sent.len() }, &[])?;
    // The successor serves them once it says so; until then they are ours to keep journaled.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reply = [0u8; 3];
    io::Read::read_exact(&mut &*stream, &mut reply)?;
    if &reply != b"ok\n" {
        return Err(handover::HandoverError::Unexpected(String::from_utf8_lossy(&reply).into()));
    }
    Ok(())
}

/// Waits until `listener` has a connection (true) or the server stops (false).
pub(super) fn wait_readable(listener: &UnixListener, stop: &StopSignal) -> io::Result<bool> {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if stop.is_requested() {
        return Ok(false);
    }
    Ok(fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts: one thread waits for
/// them ([`wait_for_stop_signal`]) and stops the server in order.
pub(super) fn block_stop_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Waits for one of `signals`.
pub(super) fn wait_for_stop_signal(signals: &SigSet) -> Signal {
    loop {
        if let Ok(signal) = signals.wait() {
            return signal;
        }
    }
}

/// Tells systemd the server is ready (`Type=notify`): a `READY=1` datagram to
/// `$NOTIFY_SOCKET`, when set (a path, or `@name` for the abstract namespace).
pub(super) fn notify_systemd_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = target.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&target))?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(b"READY=1\n", &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd ({}): {e}", target.to_string_lossy());
    }
}
