//! Taking back the VMs a predecessor left: after a crash, from the journals and the VMMs' own
//! copies of their uffds; after a handover, from the fds it passed. Either way a VM is served
//! only if its journal is whole, its snapshot is the same bytes, and its uffd is the one
//! journaled.

use super::lifecycle::{bind_metrics, Sockets};
use super::serve_vm::{serve_vm, Carried, ReadyVm};
use super::{spawn_vm_thread, SnapshotService};
use crate::config::{ServerConfig, ServerError};
use crate::control::CONTROL_SOCKET;
use crate::memory::regions::RegionMap;
use crate::memory::uffd_io::Userfaultfd;
use crate::recovery::handover::{self, expect_fds, HandedVm, HandoverError, Message};
use crate::recovery::journal::{JournalDir, JournalRead};
use crate::recovery::reacquire::{self, ReacquireError};
use crate::registry::VmRecord;
use crate::vm::removed::RemovedRanges;
use crate::vm::VmmLink;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A VM to take back: its journal and the fds to serve it through.
struct Adoptee {
    path: PathBuf,
    read: JournalRead,
    uffd: OwnedFd,
    socket: Option<UnixStream>,
    pidfd: OwnedFd,
    /// What a predecessor carried over (a handover; None after a crash).
    carried: Option<Carried>,
}

/// After a crash (or SIGTERM): every journaled VM whose VMM still runs is taken back and
/// served; a VMM that exited meanwhile, or a pid now used by another process, only has its
/// journal removed.
pub(super) fn recover_journaled(journal: &JournalDir, services: &[Arc<SnapshotService>]) {
    let found = match journal.scan() {
        Ok(found) => found,
        Err(e) => {
            tracing::error!("cannot read the journals: {e}; no VM of an earlier server is recovered");
            return;
        }
    };
    let mut fd_tables = reacquire::FdTables::default();
    let gate = Arc::new(Gate::default());
    let _open_on_return = OpenOnDrop(Arc::clone(&gate), true);
    for (path, read) in found {
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::error!("{e}: that VM is not recovered");
                continue;
            }
        };
        match reacquire::reacquire(&read.header, &mut fd_tables) {
            Ok(taken) => {
                let adoptee = Adoptee { path, read, uffd: taken.uffd, socket: None, pidfd: taken.pidfd, carried: None };
                adopt(services, adoptee, Arc::clone(&gate));
            }
            Err(e @ (ReacquireError::VmmGone(_) | ReacquireError::PidReused(..) | ReacquireError::UffdClosed(_))) => {
                tracing::info!(journal = %path.display(), "{e}: nothing to recover, journal removed");
                journal.discard(&path);
            }
            Err(e) => tracing::error!(journal = %path.display(), "VM not recovered: {e}"),
        }
    }
}

/// Opened once every VM is taken over (handover or recovery): each waits for it before it is
/// served, so that serving the first ones does not take the CPU taking the others needs (on 2
/// busy cores, handing over 16 VMs took 10 ms served one by one, 4 ms gated; 64: 190 / 18 ms).
#[derive(Debug, Default)]
struct Gate {
    /// None while closed; then whether the VMs behind it are to be served.
    open: std::sync::Mutex<Option<bool>>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn open(&self, serve: bool) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get_or_insert(serve);
        self.opened.notify_all();
    }

    /// Waits until the gate opens; whether to serve.
    fn wait(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.opened.wait_while(open, |open| open.is_none()).unwrap_or_else(|p| p.into_inner());
        open.unwrap_or(false)
    }
}

/// Starts serving `adoptee` on a thread of its own, once `gate` opens.
fn adopt(services: &[Arc<SnapshotService>], adoptee: Adoptee, gate: Arc<Gate>) {
    let name = &adoptee.read.header.snapshot;
    let Some(service) = services.iter().find(|s| &s.name == name) else {
        tracing::error!(journal = %adoptee.path.display(), "VM of snapshot `{name}`, which this server does not serve: not recovered (journal kept)");
        return;
    };
    let id = service.registry.next_id();
    spawn_vm_thread(service, id, move |service| match ready(service, id, adoptee) {
        Ok(vm) if gate.wait() => serve_vm(service, vm),
        // A handover that failed: the predecessor serves this VM again (its journal stays).
        Ok(_) => tracing::info!("handover failed: VM left to the previous server"),
        Err(e) => tracing::error!("VM not recovered: {e}"),
    });
}

/// Checks an adoptee against what this server serves and registers it.
fn ready(service: &SnapshotService, id: u64, adoptee: Adoptee) -> Result<ReadyVm, String> {
    let Adoptee { path, read, uffd, socket, pidfd, carried } = adoptee;
    let header = &read.header;
    let at = |what: &dyn std::fmt::Display| format!("journal {}: {what}", path.display());
    let snapshot = service.store.get_prepared(&service.name, &|s| service.prepare(s)).map_err(|e| at(&e))?;
    if snapshot.identity() != header.identity {
        return Err(at(&format!(
            "snapshot `{}` holds other bytes now than when the VM attached; serving it would be wrong (journal kept)",
            service.name
        )));
    }
    let regions = header.regions().map_err(|e| at(&e))?;
    let regions = RegionMap::new(regions, snapshot.len()).map_err(|e| at(&e))?;
    let uffd = Userfaultfd::from_owned(uffd).map_err(|e| at(&e))?;
    let record = Arc::new(VmRecord::new(id, &service.name, header.peer_pid, header.uffd));
    service.registry.add(Arc::clone(&record)).map_err(|other| at(&format!("its uffd already serves VM {other}")))?;
    let journal = service.journal.as_ref().and_then(|dir| dir.reopen(&path).map_err(|e| tracing::error!("{e}")).ok());
    tracing::info!(
        peer_pid = header.peer_pid,
        removed_ranges = read.removed.len(),
        read_not_journaled = read.read_not_journaled.len(),
        "VM taken over"
    );
    let link = VmmLink { socket, pidfd: Some(pidfd), stop: Some(Arc::clone(&service.lifecycle.stop)) };
    let mut removed = RemovedRanges::journaled(journal, &read.removed);
    // Into the journal before the VM's first read, which overwrites the events file they are in.
    for &(start, end) in &read.read_not_journaled {
        if let Err(e) = removed.insert(start, end) {
            tracing::error!("{e}; this VM cannot be recovered if the server ends");
        }
    }
    Ok(ReadyVm { record, snapshot, regions, uffd, link, removed, taken_over: true, carried })
}

/// The successor's side of a handover: asks the server running on the socket directory for
/// everything, serves each VM it passes, and returns its sockets.
pub(super) fn take_over(config: &ServerConfig, services: &[Arc<SnapshotService>]) -> Result<Sockets, ServerError> {
    let failed = |e: HandoverError| ServerError::Takeover(e.to_string());
    let stream = UnixStream::connect(config.socket_dir.join(CONTROL_SOCKET)).map_err(|e| {
        ServerError::Takeover(format!("no server to take over on {}: {e}", config.socket_dir.display()))
    })?;
    (&stream).write_all(b"handover\n").map_err(|e| failed(e.into()))?;
    let (message, mut fds) = handover::receive::<Carried>(&stream).map_err(failed)?;
    let Message::Listeners { snapshots, metrics } = message else {
        return Err(failed(HandoverError::Unexpected(format!("{message:?}"))));
    };
    expect_fds("listeners", &fds, 2 + snapshots.len() + usize::from(metrics)).map_err(failed)?;
    let metrics_fd = if metrics { fds.pop() } else { None };
    let mut fds = fds.into_iter();
    let (lock, control) = (fds.next(), fds.next().map(UnixListener::from));
    let (Some(lock), Some(control)) = (lock, control) else { return Err(failed(HandoverError::Cut)) };
    let mut received: Vec<(String, UnixListener)> = snapshots.into_iter().zip(fds.map(UnixListener::from)).collect();
    let mut vms = 0;
    // Opened to serve only once the handover is complete; if it fails, the predecessor serves
    // every VM again, and no VM may have two servers.
    let gate = Arc::new(Gate::default());
    let _close_on_failure = OpenOnDrop(Arc::clone(&gate), false);
    loop {
        let (message, fds) = handover::receive::<Carried>(&stream).map_err(failed)?;
        match message {
            Message::Vm { journal, socket, carried } => {
                expect_fds("vm", &fds, 1 + usize::from(socket)).map_err(failed)?;
                take_vm(services, config, (&journal, carried), fds, &gate);
                vms += 1;
            }
            Message::Done { vms: sent } if sent == vms => break,
            other => return Err(failed(HandoverError::Unexpected(format!("{other:?}")))),
        }
    }
    // Snapshots this server no longer serves lose their socket; new ones get one.
    received.retain(|(name, _)| config.names().contains(&name.as_str()));
    for name in config.names() {
        if !received.iter().any(|(n, _)| n == name) {
            received.push((name.to_string(), crate::sockets::bind(&config.socket_path(name), config.access())?));
        }
    }
    let metrics = match metrics_fd {
        Some(fd) if config.metrics_listen.is_some() => Some(std::net::TcpListener::from(fd)),
        _ => bind_metrics(config)?,
    };
    (&stream).write_all(b"ok\n").map_err(|e| failed(e.into()))?;
    gate.open(true);
    tracing::info!(vms, "took over from the previous server");
    Ok(Sockets { lock, control, snapshots: received, metrics })
}

/// Serves again the VMs of a handover that failed: the fds and journals are still ours.
pub(super) fn take_back(services: &[Arc<SnapshotService>], config: &ServerConfig, vms: Vec<HandedVm<Carried>>) {
    let gate = Arc::new(Gate::default());
    let _open_on_return = OpenOnDrop(Arc::clone(&gate), true);
    for vm in vms {
        let mut fds = vec![vm.uffd];
        fds.extend(vm.socket.map(OwnedFd::from));
        take_vm(services, config, (&vm.journal, vm.carried), fds, &gate);
    }
}

/// Opens its gate when dropped (to serve or not), unless it was opened before.
struct OpenOnDrop(Arc<Gate>, bool);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open(self.1);
    }
}

/// Serves one VM a predecessor handed over, once `gate` opens.
fn take_vm(
    services: &[Arc<SnapshotService>],
    config: &ServerConfig,
    (journal, carried): (&Path, Carried),
    fds: Vec<OwnedFd>,
    gate: &Arc<Gate>,
) {
    let mut fds = fds.into_iter();
    let (Some(uffd), socket) = (fds.next(), fds.next().map(UnixStream::from)) else { return };
    // Only a journal in our own directory: the predecessor is trusted, but not beyond it.
    let dir = config.journal_dir.as_deref().filter(|dir| journal.parent() == Some(*dir));
    let read = match dir.map(|dir| JournalDir::open(dir).and_then(|d| d.read(journal))) {
        Some(Ok(read)) => read,
        Some(Err(e)) => return tracing::error!("handed-over VM not served: {e}"),
        None => {
            return tracing::error!(journal = %journal.display(), "handed-over VM's journal is outside the journal directory: not served")
        }
    };
    let pidfd = match reacquire::pidfd_open(read.header.peer_pid) {
        Ok(pidfd) => pidfd,
        Err(e) => return tracing::info!(peer_pid = read.header.peer_pid, "handed-over VM's VMM is gone ({e})"),
    };
    adopt(
        services,
        Adoptee { path: journal.to_path_buf(), read, uffd, socket, pidfd, carried: Some(carried) },
        Arc::clone(gate),
    );
}
