//! A VMM's connection becoming a served VM: peer checked, handshake validated against the
//! snapshot, the VM registered and journaled — or refused with the reason, that connection
//! only.

use super::serve_vm::{serve_vm, ReadyVm};
use super::SnapshotService;
use crate::memory::regions::{RegionError, RegionMap};
use crate::memory::uffd_io::Userfaultfd;
use crate::recovery::journal::{JournalHeader, JOURNAL_FORMAT};
use crate::recovery::reacquire;
use crate::registry::VmRecord;
use crate::source::snapshot::SnapshotError;
use crate::vm::handshake::{self, HandshakeError};
use crate::vm::removed::RemovedRanges;
use crate::vm::VmmLink;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Why a connection was refused before its fault loop started.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum AttachError {
    #[error("cannot read peer credentials: {0}")]
    PeerCredentials(nix::Error),
    #[error("peer uid {0} is not allowed (--allow-uid)")]
    UidNotAllowed(u32),
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("handshake refused: {0}")]
    Regions(#[from] RegionError),
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot use the userfaultfd: {0}")]
    Uffd(nix::Error),
    #[error("handshake refused: this userfaultfd already serves VM {0}")]
    UffdInUse(u64),
}

impl AttachError {
    /// A short name of the reason, for the refusals metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AttachError::PeerCredentials(_) => "peer_credentials",
            AttachError::UidNotAllowed(_) => "uid_not_allowed",
            AttachError::Handshake(HandshakeError::Timeout) => "handshake_timeout",
            AttachError::Handshake(_) => "handshake",
            AttachError::Regions(_) => "regions",
            AttachError::Snapshot(_) => "snapshot",
            AttachError::Uffd(_) => "uffd",
            AttachError::UffdInUse(_) => "uffd_in_use",
        }
    }
}

/// Serves the VMM on `stream` until its VM ends, or logs why it was refused.
pub(super) fn serve_connection(id: u64, stream: UnixStream, service: &SnapshotService) {
    let creds = match getsockopt(&stream, PeerCredentials) {
        Ok(creds) => creds,
        Err(e) => {
            tracing::error!("VM refused: {}", AttachError::PeerCredentials(e));
            return;
        }
    };
    match attach(id, creds.pid(), creds.uid(), stream, service) {
        Ok(vm) => serve_vm(service, vm),
        Err(e) => {
            service.registry.count_refusal(&service.name, e.reason());
            // Poisoned only by a panic while logging: the limiter holds nothing that matters.
            if service.refusals_logged.lock().unwrap_or_else(|p| p.into_inner()).allow() {
                tracing::error!(peer_pid = creds.pid(), "VM refused: {e}");
            }
        }
    }
}

/// Validates a VMM's handshake and registers and journals its VM.
fn attach(
    id: u64,
    peer_pid: i32,
    peer_uid: u32,
    stream: UnixStream,
    service: &SnapshotService,
) -> Result<ReadyVm, AttachError> {
    let config = &service.config;
    if !config.allow_uids.is_empty() && !config.allow_uids.contains(&peer_uid) {
        return Err(AttachError::UidNotAllowed(peer_uid));
    }
    // Bounds the wait for the handshake only; the fault loop polls without timeout.
    let _ = stream.set_read_timeout(Some(config.handshake_timeout));
    let handshake = handshake::receive(&stream)?;
    let snapshot = service.store.get_prepared(&service.name, &|snapshot| service.prepare(snapshot))?;
    let regions = RegionMap::new(handshake.regions, snapshot.len())?;
    regions.check_page_sizes(peer_pid)?;
    let uffd = Userfaultfd::from_owned(handshake.uffd).map_err(AttachError::Uffd)?;
    let record = Arc::new(VmRecord::new(id, &service.name, peer_pid, handshake.uffd_identity));
    service.registry.add(Arc::clone(&record)).map_err(AttachError::UffdInUse)?;
    let pidfd = peer_pidfd(&stream, peer_pid);
    let journal = service.journal.as_ref().and_then(|dir| {
        let journaled = reacquire::start_ticks(peer_pid)
            .map_err(|e| format!("cannot read the VMM's start time: {e}"))
            .and_then(|peer_start_ticks| {
                let header = JournalHeader {
                    format: JOURNAL_FORMAT,
                    snapshot: service.name.clone(),
                    identity: snapshot.identity(),
                    peer_pid,
                    peer_start_ticks,
                    uffd: handshake.uffd_identity,
                    regions: JournalHeader::encode_regions(regions.regions()),
                };
                dir.create(&header).map_err(|e| e.to_string())
            });
        journaled.inspect_err(|e| tracing::error!("{e}; this VM cannot be recovered if the server ends")).ok()
    });
    tracing::info!(peer_pid, regions = regions.regions().len(), guest_bytes = regions.total_bytes(), "VM attached");
    let link = VmmLink { socket: Some(stream), pidfd, stop: Some(Arc::clone(&service.lifecycle.stop)) };
    let removed = RemovedRanges::journaled(journal, &[]);
    Ok(ReadyVm { record, snapshot, regions, uffd, link, removed, taken_over: false, carried: None })
}

/// A pidfd of the socket's peer: `SO_PEERPIDFD` names the very process that connected; an
/// older kernel gets one by pid. None if neither works (the socket alone then tells the end).
fn peer_pidfd(stream: &UnixStream, peer_pid: i32) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len: libc::socklen_t = 4; // size_of::<c_int>()
                                      // SAFETY: getsockopt writes at most `len` bytes into `fd`, a c_int that outlives the call.
    let got = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERPIDFD, (&raw mut fd).cast(), &raw mut len)
    };
    if got == 0 && fd >= 0 {
        // SAFETY: SO_PEERPIDFD returned a new fd that nothing else owns.
        return Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    reacquire::pidfd_open(peer_pid).ok()
}
