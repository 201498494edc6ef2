//! Guest memory as a VMM maps it: anonymous private regions (or hugetlbfs) inside one
//! reservation, with a hole between regions like the x86 MMIO gap, each region at its offset
//! in the snapshot memory file (Firecracker's layout: regions back to back).

use std::io;

pub const PAGE: usize = 4096;
pub const HUGE: usize = 2 << 20;

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

    /// Writes `data` at file offset (= guest-physical address) `offset`, which must lie in one
    /// region. With uffd-backed memory, the first write to a missing page is served first.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        let region = self
            .regions
            .iter()
            .find(|r| offset >= r.file_offset && offset + data.len() <= r.file_offset + r.size)
            .ok_or_else(|| io::Error::other(format!("{:#x}+{:#x} is not inside one region", offset, data.len())))?;
        // SAFETY: the destination lies inside a region mapped read-write for the lifetime of
        // `self`; the vCPU does not run while the VMM writes (one thread drives both).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (region.addr + offset - region.file_offset) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }

    /// Guest memory mapped from a memory file with MAP_PRIVATE (Firecracker's `File` backend):
    /// pages are read from the file (or page cache) on first touch, written copy-on-write.
    pub fn map_file(file: &std::fs::File, len: usize) -> io::Result<GuestMemory> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of a file we hold open; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let region = GuestRegion { addr: addr as usize, size: len, file_offset: 0, page_size: PAGE };
        Ok(GuestMemory { regions: vec![region], reservation: (addr as usize, len) })
    }

    /// `madvise(MADV_DONTNEED)` over `len` bytes at file offset `offset` (inside one region):
    /// what a balloon does. Anonymous memory then reads as zeros (with a uffd: after the
    /// server has read the REMOVE event, which this call waits for); a MAP_PRIVATE file
    /// mapping reads the file again.
    pub fn dontneed(&self, offset: usize, len: usize) -> io::Result<()> {
        let region = self
            .regions
            .iter()
            .find(|r| offset >= r.file_offset && offset + len <= r.file_offset + r.size)
            .ok_or_else(|| io::Error::other(format!("{offset:#x}+{len:#x} is not inside one region")))?;
        // SAFETY: the range lies inside a private mapping of ours; no slice into it is live
        // across this call (readers go through `region_bytes` afterwards).
        let ret =
            unsafe { libc::madvise((region.addr + offset - region.file_offset) as *mut _, len, libc::MADV_DONTNEED) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
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
