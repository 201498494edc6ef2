//! The `Uffd` memory backend of Firecracker, client side: a userfaultfd over guest memory,
//! registered in MISSING mode, handed to the memory server with one handshake message (the
//! JSON region list, the uffd as SCM_RIGHTS). Facts: `shared/firecracker-uffd-protocol.md`.

use crate::memory::{GuestMemory, GuestRegion};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

/// The region list exactly as Firecracker serialises it (both page-size fields, in bytes).
pub fn handshake_json(regions: &[GuestRegion]) -> String {
    let items: Vec<serde_json::Value> = regions
        .iter()
        .map(|r| {
            serde_json::json!({
                "base_host_virt_addr": r.addr,
                "size": r.size,
                "offset": r.file_offset,
                "page_size": r.page_size,
                "page_size_kib": r.page_size,
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// Creates the uffd as Firecracker does and registers every region in MISSING mode.
pub fn create_uffd(memory: &GuestMemory) -> io::Result<Uffd> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| io::Error::other(format!("userfaultfd: {e}")))?;
    for r in &memory.regions {
        uffd.register(r.addr as *mut _, r.size).map_err(|e| io::Error::other(format!("UFFDIO_REGISTER: {e}")))?;
    }
    Ok(uffd)
}

/// Sends one message: `payload` plus `fd` (if any) as SCM_RIGHTS.
pub fn send_message(socket: &UnixStream, payload: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let iov = [IoSlice::new(payload)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map_err(io::Error::from)?;
    Ok(())
}

/// Guest memory attached to a memory server: the socket (kept open: its closing ends the VM
/// for the server) and the uffd.
pub struct UffdAttachment {
    /// The connection to the memory server.
    pub socket: UnixStream,
    /// The userfaultfd over guest memory (the VMM keeps its copy, as Firecracker does).
    pub uffd: Uffd,
}

impl UffdAttachment {
    /// Creates the uffd over `memory`, connects to `socket` and sends the handshake.
    pub fn attach(socket: &Path, memory: &GuestMemory) -> io::Result<UffdAttachment> {
        let uffd = create_uffd(memory)?;
        let socket = UnixStream::connect(socket)?;
        send_message(&socket, handshake_json(&memory.regions).as_bytes(), Some(uffd.as_raw_fd()))?;
        Ok(UffdAttachment { socket, uffd })
    }
}

impl Drop for UffdAttachment {
    /// Hangs up, then waits for the server to hang up too, so that the memory can be unmapped.
    ///
    /// Until then the server may still serve a fault event it read earlier, and UFFDIO_COPY
    /// lands in *any* uffd-registered range of this process at that address (the kernel checks
    /// only that the range is registered, not with which uffd) — so memory this process maps
    /// there next, for another VM, would get this VM's pages. A Firecracker process exits
    /// instead and cannot be hit; a VMM that restores many VMs in one process must wait.
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
        let _ = self.socket.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut &self.socket, &mut buf), Ok(n) if n > 0) {}
    }
}
