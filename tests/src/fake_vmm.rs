//! A test VMM that attaches guest memory to the server exactly as Firecracker does: anonymous
//! private memory in regions with a hole between them (like the x86 MMIO gap), a userfaultfd
//! (non-blocking, close-on-exec, EVENT_REMOVE, kernel-mode faults too) registered in MISSING
//! mode, and one handshake message: the JSON region list with the uffd as SCM_RIGHTS.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

pub const PAGE: usize = 4096;
pub const HUGE: usize = 2 << 20;
/// The hole between the two regions of the standard layout.
pub const GAP: usize = 16 << 20;

/// One region of guest memory as mapped in this process.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    pub addr: usize,
    pub size: usize,
    pub file_offset: usize,
    pub page_size: usize,
}

/// Guest memory: a PROT_NONE reservation with the regions mapped inside it.
pub struct GuestMemory {
    pub regions: Vec<GuestRegion>,
    reservation: (usize, usize),
}

impl GuestMemory {
    /// Maps regions of `sizes` bytes back to back in the file, `gap` bytes apart in memory.
    /// With `huge`, regions are hugetlbfs-backed (2 MiB pages; the host must have them reserved).
    pub fn map(sizes: &[usize], gap: usize, huge: bool) -> io::Result<GuestMemory> {
        let page_size = if huge { HUGE } else { PAGE };
        let total: usize = sizes.iter().sum::<usize>() + gap * sizes.len() + HUGE;
        // SAFETY: a fresh anonymous PROT_NONE reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let memory = GuestMemory { regions: Vec::new(), reservation: (base as usize, total) };
        let mut memory = memory;
        let mut addr = (base as usize).next_multiple_of(HUGE);
        let mut file_offset = 0;
        for &size in sizes {
            let flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | if huge { libc::MAP_HUGETLB } else { 0 };
            // SAFETY: MAP_FIXED inside our own reservation, which no Rust reference points into.
            let mapped = unsafe { libc::mmap(addr as *mut _, size, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
            if mapped == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            memory.regions.push(GuestRegion { addr, size, file_offset, page_size });
            addr += size + gap;
            file_offset += size;
        }
        Ok(memory)
    }

    /// The bytes of region `i`. Touching an unserved page blocks until the server serves it.
    pub fn region_bytes(&self, i: usize) -> &[u8] {
        let r = self.regions[i];
        // SAFETY: the region is mapped read-write for the lifetime of `self`; the server only
        // populates missing pages (never changes present ones) and this process writes to guest
        // memory only through atomics or madvise, which no live slice overlaps during tests.
        unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.size) }
    }

    pub fn len(&self) -> usize {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses of every 4 KiB page, region by region.
    pub fn page_addrs(&self) -> impl Iterator<Item = usize> + '_ {
        self.regions.iter().flat_map(|r| (0..r.size / PAGE).map(move |p| r.addr + p * PAGE))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps our own reservation (and the regions inside it); no references remain.
        unsafe { libc::munmap(self.reservation.0 as *mut _, self.reservation.1) };
    }
}

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

/// A VM attached to the server: its memory, uffd and socket.
pub struct FakeVmm {
    // Field order is drop order: hang up first, then release the memory.
    pub socket: UnixStream,
    pub uffd: Uffd,
    pub memory: GuestMemory,
}

impl Drop for FakeVmm {
    /// Hangs up, then waits for the server to hang up too before the memory is unmapped.
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

impl FakeVmm {
    /// The standard layout for a snapshot of `len` bytes: two regions (3/4 and 1/4 of it) with
    /// a 16 MiB hole between them.
    pub fn attach(socket: &Path, len: usize) -> io::Result<FakeVmm> {
        let first = (len / 4 * 3).next_multiple_of(PAGE).min(len);
        let sizes: Vec<usize> = [first, len - first].into_iter().filter(|&s| s > 0).collect();
        Self::attach_layout(socket, &sizes, GAP, false)
    }

    pub fn attach_layout(socket: &Path, sizes: &[usize], gap: usize, huge: bool) -> io::Result<FakeVmm> {
        let memory = GuestMemory::map(sizes, gap, huge)?;
        let uffd = create_uffd(&memory)?;
        let socket = UnixStream::connect(socket)?;
        send_message(&socket, handshake_json(&memory.regions).as_bytes(), Some(uffd.as_raw_fd()))?;
        Ok(FakeVmm { socket, uffd, memory })
    }

    /// Touches every page from `threads` threads (interleaved), reading or writing one byte.
    /// A write is an atomic add of 0: it takes a write fault but keeps the snapshot's content.
    pub fn touch_all(&self, threads: usize, write: bool) {
        let pages: Vec<usize> = self.memory.page_addrs().collect();
        touch_pages(&pages, threads, write);
    }

    /// Panics at the first byte of guest memory that differs from `snapshot`.
    pub fn assert_matches(&self, snapshot: &[u8]) {
        assert_eq!(self.memory.len(), snapshot.len(), "guest memory and snapshot sizes differ");
        for (i, r) in self.memory.regions.iter().enumerate() {
            let expected = &snapshot[r.file_offset..r.file_offset + r.size];
            let actual = self.memory.region_bytes(i);
            if actual != expected {
                let at = actual.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
                let page = at / PAGE * PAGE;
                let differing =
                    actual[page..page + PAGE].iter().zip(&expected[page..page + PAGE]).filter(|(a, b)| a != b).count();
                let zeros = actual[page..page + PAGE].iter().all(|&b| b == 0);
                panic!(
                    "region {i}: guest byte at offset {at:#x} (file offset {:#x}) differs from the snapshot: \
                     {differing} bytes of that page differ, the guest page is {}; guest {:02x?} snapshot {:02x?}",
                    r.file_offset + at,
                    if zeros { "all zeros" } else { "not all zeros" },
                    &actual[at..(at + 8).min(actual.len())],
                    &expected[at..(at + 8).min(expected.len())]
                );
            }
        }
    }

    /// `madvise(MADV_DONTNEED)` over `len` bytes at `offset` into region `i` (what a balloon
    /// does). Returns only once the server has read the REMOVE event.
    pub fn dontneed(&self, i: usize, offset: usize, len: usize) -> io::Result<()> {
        let r = self.memory.regions[i];
        assert!(offset + len <= r.size);
        // SAFETY: the range lies inside our own private anonymous mapping; no slice into it is
        // live across this call (callers re-read through `region_bytes` afterwards).
        let ret = unsafe { libc::madvise((r.addr + offset) as *mut _, len, libc::MADV_DONTNEED) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Touches `pages` (addresses of mapped guest pages) from `threads` threads, interleaved.
pub fn touch_pages(pages: &[usize], threads: usize, write: bool) {
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for &addr in pages.iter().skip(t).step_by(threads) {
                    touch(addr, write);
                }
            });
        }
    });
}

/// Reads or (content-preserving) writes the byte at `addr`, which must be mapped guest memory.
pub fn touch(addr: usize, write: bool) {
    if write {
        // SAFETY: `addr` is mapped read-write guest memory; an atomic add of 0 is a write access
        // that keeps the content, and atomics make concurrent touches well defined.
        unsafe { (*(addr as *const AtomicU8)).fetch_add(0, Ordering::SeqCst) };
    } else {
        // SAFETY: `addr` is mapped readable guest memory; a volatile read is not elided.
        unsafe { std::ptr::read_volatile(addr as *const u8) };
    }
}
