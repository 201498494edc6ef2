//! A test VMM that attaches guest memory to the server exactly as Firecracker does: anonymous
//! private memory in regions with a hole between them (like the x86 MMIO gap), a userfaultfd
//! (non-blocking, close-on-exec, EVENT_REMOVE, kernel-mode faults too) registered in MISSING
//! mode, and one handshake message: the JSON region list with the uffd as SCM_RIGHTS.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
pub use vmm_shim::memory::{GuestMemory, GuestRegion, HUGE, PAGE};
pub use vmm_shim::uffd_backend::{create_uffd, handshake_json, send_message, UffdAttachment};

/// The hole between the two regions of the standard layout.
pub const GAP: usize = 16 << 20;

/// A VM attached to the server: its memory and the attachment (socket + uffd).
pub struct FakeVmm {
    // Field order is drop order: hang up (and wait for the server) first, then unmap.
    pub attachment: UffdAttachment,
    pub memory: GuestMemory,
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
        let attachment = UffdAttachment::attach(socket, &memory)?;
        Ok(FakeVmm { attachment, memory })
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
        self.memory.dontneed(r.guest_addr + offset, len)
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
