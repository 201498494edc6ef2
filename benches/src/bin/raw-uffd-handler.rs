//! The floor of a fault path, as a process of its own: the least any memory server can do.
//!
//! It takes one VM over Firecracker's handshake on `SOCKET` (as `uffd-server` does), holds the
//! memory file in RAM, and answers each of the next `FAULTS` faults with one blocking `read`
//! and one UFFDIO_COPY of the faulting 4 KiB page; then it exits, which closes the VM's socket.
//! A handler in the faulting process would skip the switch between address spaces that every
//! memory server pays (experiment 4 measures both).
//!
//! Usage: `raw-uffd-handler SOCKET MEMORY_FILE FAULTS CPU|any` — prints `ready` once listening.

use anyhow::{bail, Context, Result};
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use userfaultfd::{Event, Uffd};

const PAGE: usize = 4096;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, memory_file, faults, cpu] = args.as_slice() else {
        bail!("usage: raw-uffd-handler SOCKET MEMORY_FILE FAULTS CPU|any");
    };
    let faults: u64 = faults.parse().context("FAULTS")?;
    if cpu != "any" {
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(cpu.parse().context("CPU")?)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
    }
    let bytes = std::fs::read(memory_file).with_context(|| format!("reading {memory_file}"))?;
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
    println!("ready");
    std::io::stdout().flush()?;

    let (stream, _) = listener.accept()?;
    let handshake = uffd_server::vm::handshake::receive(&stream).context("handshake")?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(nix::fcntl::fcntl(
        handshake.uffd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_GETFL,
    )?) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(handshake.uffd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(blocking))?;
    // SAFETY: the handshake's fd is a userfaultfd (checked by `receive`) that nothing else owns.
    let uffd = unsafe { Uffd::from_raw_fd(handshake.uffd.into_raw_fd()) };
    for _ in 0..faults {
        let Some(Event::Pagefault { addr, .. }) = uffd.read_event()? else { bail!("an event other than a fault") };
        let page = addr as u64 & !(PAGE as u64 - 1);
        let Some(region) = handshake.regions.iter().find(|r| (r.host.0..r.host_end()).contains(&page)) else {
            bail!("a fault at {page:#x} outside every region");
        };
        let offset = usize::try_from(region.file_offset.0 + (page - region.host.0))?;
        let Some(source) = bytes.get(offset..offset + PAGE) else { bail!("the memory file is too short") };
        // SAFETY: `page` is a missing page of a region the VMM registered on this uffd; the
        // source is a live 4 KiB slice of the memory file.
        unsafe { uffd.copy(source.as_ptr().cast(), page as *mut _, PAGE, true) }?;
    }
    Ok(())
}
