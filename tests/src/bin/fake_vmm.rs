//! A test VMM process that attaches to uffd-server and touches its guest memory page by page.
//! Usage: fake-vmm SOCKET SNAPSHOT_BYTES DELAY_US [--then-exit] [--user-mode-only]
//!
//! By default it touches slowly and then sleeps until it is killed (the victim of the "VMM
//! killed mid-restore" test). `--then-exit` prints `fnv=<hash of guest memory>` once every page
//! is in and exits. `--user-mode-only` creates its userfaultfd as an unprivileged VMM must.

use e2e::fake_vmm::{handshake_json, send_message, touch, FakeVmm, GuestMemory, UffdAttachment};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::time::Duration;
use userfaultfd::Uffd;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 4, "usage: fake-vmm SOCKET SNAPSHOT_BYTES DELAY_US [--then-exit] [--user-mode-only]");
    let len: usize = args[2].parse()?;
    let delay = Duration::from_micros(args[3].parse()?);
    let flag = |name: &str| args[4..].iter().any(|a| a == name);
    let vmm = if flag("--user-mode-only") {
        attach_user_mode_only(args[1].as_ref(), len)?
    } else {
        FakeVmm::attach(args[1].as_ref(), len)?
    };
    for (i, addr) in vmm.memory.page_addrs().enumerate() {
        touch(addr, false);
        if i == 0 {
            println!("touching");
            std::io::stdout().flush()?;
        }
        std::thread::sleep(delay);
    }
    if flag("--then-exit") {
        let hash = (0..vmm.memory.regions.len())
            .fold(prefetch::FNV_OFFSET, |hash, i| prefetch::fnv1a(hash, vmm.memory.region_bytes(i)));
        println!("fnv={hash:#x}");
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The standard layout, with a uffd that reports user-mode faults only (what an unprivileged
/// process may create); this process touches its memory from user mode.
fn attach_user_mode_only(socket: &std::path::Path, len: usize) -> anyhow::Result<FakeVmm> {
    let first = (len / 4 * 3).next_multiple_of(e2e::fake_vmm::PAGE).min(len);
    let sizes: Vec<usize> = [first, len - first].into_iter().filter(|&s| s > 0).collect();
    let memory = GuestMemory::map(&sizes, e2e::fake_vmm::GAP, false)?;
    let uffd = user_mode_only_uffd()?;
    for r in &memory.regions {
        uffd.register(r.addr as *mut _, r.size)?;
    }
    let socket = std::os::unix::net::UnixStream::connect(socket)?;
    send_message(&socket, handshake_json(&memory.regions).as_bytes(), Some(uffd.as_raw_fd()))?;
    Ok(FakeVmm { attachment: UffdAttachment { socket, uffd }, memory })
}

/// The userfaultfd(2) syscall with UFFD_USER_MODE_ONLY, then UFFDIO_API asking for
/// EVENT_REMOVE: what an unprivileged VMM can do (the userfaultfd crate would open
/// /dev/userfaultfd, which only root may).
fn user_mode_only_uffd() -> anyhow::Result<Uffd> {
    const UFFD_USER_MODE_ONLY: libc::c_long = 1;
    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    let flags = libc::c_long::from(libc::O_CLOEXEC | libc::O_NONBLOCK) | UFFD_USER_MODE_ONLY;
    // SAFETY: the syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    anyhow::ensure!(fd >= 0, "userfaultfd(UFFD_USER_MODE_ONLY): {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created and is owned by nothing else.
    let uffd = unsafe { Uffd::from_raw_fd(i32::try_from(fd)?) };
    let mut api = [0xaa_u64, UFFD_FEATURE_EVENT_REMOVE, 0]; // struct uffdio_api
                                                            // SAFETY: UFFDIO_API reads and writes the three u64 fields of `api`, which lives for the call.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) };
    anyhow::ensure!(ret == 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    Ok(uffd)
}
