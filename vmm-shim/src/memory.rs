//! Guest memory as a VMM maps it: regions (anonymous, hugetlbfs, or a MAP_PRIVATE file
//! mapping) inside one reservation, each with its guest-physical address and its offset in the
//! snapshot memory file (Firecracker's layout: regions back to back in the file; above 3 GiB
//! the guest-physical space has the x86 MMIO gap between them).

use std::io;

/// Base page size.
pub const PAGE: usize = 4096;
/// hugetlbfs page size.
pub const HUGE: usize = 2 << 20;

/// One region of guest memory as mapped in this process.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    /// Where it is mapped in this process.
    pub addr: usize,
    /// Its length in bytes.
    pub size: usize,
    /// Where its bytes start in the memory file.
    pub file_offset: usize,
    /// Where the guest sees it.
    pub guest_addr: usize,
    /// Its page size (4 KiB, or 2 MiB for hugetlbfs).
    pub page_size: usize,
}

/// A region to map: where the guest sees it, how big, where its bytes are in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Where the guest sees it.
    pub guest_addr: usize,
    /// Its length in bytes.
    pub size: usize,
    /// Where its bytes start in the memory file.
    pub file_offset: usize,
}

/// What a region's memory is.
#[derive(Clone, Copy)]
pub enum Backing<'a> {
    /// Private anonymous memory (what a uffd or an eager copy fills).
    Anonymous,
    /// 2 MiB hugetlbfs pages (the host must have them reserved).
    HugeTlb,
    /// MAP_PRIVATE of the memory file at the region's offset (Firecracker's `File` backend).
    File(&'a std::fs::File),
}

/// Start of the x86 MMIO gap in guest-physical space, and where memory resumes above it.
pub const MMIO_GAP_START: usize = 3 << 30;
/// Where guest memory resumes above the MMIO gap.
pub const MMIO_GAP_END: usize = 4 << 30;

/// Firecracker's x86-64 layout for `bytes` of guest memory: one region below 3 GiB, else the
/// rest at 4 GiB, above the MMIO gap. The file holds the regions back to back.
pub fn x86_layout(bytes: usize) -> Vec<RegionSpec> {
    let low = bytes.min(MMIO_GAP_START);
    let mut specs = vec![RegionSpec { guest_addr: 0, size: low, file_offset: 0 }];
    if bytes > low {
        specs.push(RegionSpec { guest_addr: MMIO_GAP_END, size: bytes - low, file_offset: low });
    }
    specs
}

/// Guest memory: a PROT_NONE reservation with the regions mapped inside it.
pub struct GuestMemory {
    /// The regions, in guest order.
    pub regions: Vec<GuestRegion>,
    reservation: (usize, usize),
}

impl GuestMemory {
    /// Maps anonymous regions of `sizes` bytes, back to back in the file and in guest-physical
    /// space, `gap` bytes apart in this process. With `huge`, hugetlbfs-backed.
    pub fn map(sizes: &[usize], gap: usize, huge: bool) -> io::Result<GuestMemory> {
        let mut file_offset = 0;
        let specs: Vec<RegionSpec> = sizes
            .iter()
            .map(|&size| {
                let spec = RegionSpec { guest_addr: file_offset, size, file_offset };
                file_offset += size;
                spec
            })
            .collect();
        Self::map_regions(&specs, gap, if huge { Backing::HugeTlb } else { Backing::Anonymous })
    }

    /// Maps `specs` with `backing`, `gap` bytes apart in this process.
    pub fn map_regions(specs: &[RegionSpec], gap: usize, backing: Backing<'_>) -> io::Result<GuestMemory> {
        let total: usize = specs.iter().map(|s| s.size).sum::<usize>() + gap * specs.len() + HUGE;
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
        let mut memory = GuestMemory { regions: Vec::new(), reservation: (base as usize, total) };
        let mut addr = (base as usize).next_multiple_of(HUGE);
        for spec in specs {
            let (flags, fd, offset, page_size) = match backing {
                Backing::Anonymous => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0, PAGE),
                Backing::HugeTlb => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB, -1, 0, HUGE),
                Backing::File(file) => {
                    use std::os::fd::AsRawFd;
                    let offset = libc::off_t::try_from(spec.file_offset).map_err(io::Error::other)?;
                    (libc::MAP_PRIVATE, file.as_raw_fd(), offset, PAGE)
                }
            };
            // SAFETY: MAP_FIXED inside our own reservation, which no Rust reference points into.
            let mapped = unsafe {
                libc::mmap(
                    addr as *mut _,
                    spec.size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED,
                    fd,
                    offset,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let region = GuestRegion {
                addr,
                size: spec.size,
                file_offset: spec.file_offset,
                guest_addr: spec.guest_addr,
                page_size,
            };
            memory.regions.push(region);
            addr += spec.size + gap;
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

    /// The host address of guest-physical `[guest_addr, guest_addr + len)`, inside one region.
    fn host_addr(&self, guest_addr: usize, len: usize) -> io::Result<usize> {
        self.regions
            .iter()
            .find(|r| guest_addr >= r.guest_addr && guest_addr + len <= r.guest_addr + r.size)
            .map(|r| r.addr + guest_addr - r.guest_addr)
            .ok_or_else(|| io::Error::other(format!("guest range {guest_addr:#x}+{len:#x} is not inside one region")))
    }

    /// Writes `data` at guest-physical `guest_addr` (inside one region). With uffd-backed
    /// memory, the first write to a missing page is served first.
    pub fn write_at(&self, guest_addr: usize, data: &[u8]) -> io::Result<()> {
        let host = self.host_addr(guest_addr, data.len())?;
        // SAFETY: the destination lies inside a region mapped read-write for the lifetime of
        // `self`; no vCPU runs code that reads it while the VMM writes its mailbox.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host as *mut u8, data.len()) };
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` over `len` bytes at guest-physical `guest_addr` (in one region):
    /// what a balloon does. Anonymous memory then reads as zeros (with a uffd: after the
    /// server has read the REMOVE event, which this call waits for); a MAP_PRIVATE file
    /// mapping reads the file again.
    pub fn dontneed(&self, guest_addr: usize, len: usize) -> io::Result<()> {
        let host = self.host_addr(guest_addr, len)?;
        // SAFETY: the range lies inside a private mapping of ours; no slice into it is live
        // across this call (readers go through `region_bytes` afterwards).
        if unsafe { libc::madvise(host as *mut _, len, libc::MADV_DONTNEED) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Reads every region's bytes from the memory file (the `copy` backend).
    pub fn fill_from_file(&self, file: &std::fs::File) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        for region in &self.regions {
            // SAFETY: the region is mapped read-write for the lifetime of `self` and no other
            // reference into it is live while it is filled (no vCPU runs yet).
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.size) };
            file.read_exact_at(bytes, region.file_offset as u64)?;
        }
        Ok(())
    }

    /// Which 4 KiB pages of region `i` are resident (`mincore`): the only ones that can hold
    /// anything but zeros in fresh anonymous memory.
    pub fn resident_pages(&self, i: usize) -> io::Result<Vec<bool>> {
        let r = self.regions[i];
        let mut vec = vec![0u8; r.size.div_ceil(PAGE)];
        // SAFETY: the range is our own mapping and `vec` holds one byte per page of it.
        if unsafe { libc::mincore(r.addr as *mut _, r.size, vec.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().map(|b| b & 1 == 1).collect())
    }

    /// Bytes of guest memory over all regions.
    pub fn len(&self) -> usize {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Whether there is no guest memory.
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
