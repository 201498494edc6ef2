//! The region map: which part of the snapshot file backs which range of the VMM's address space.
//!
//! Built once per VM from the handshake and validated against the snapshot before the first
//! fault is served: after that, every fault address either maps to exactly one file range that
//! lies inside the snapshot, or to nothing.

use crate::addr::{FileOffset, HostAddr, PageSize};
use serde::Serialize;

/// One guest memory region as the VMM mapped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Region {
    /// Where the VMM mapped it.
    pub host: HostAddr,
    /// Its length in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub file_offset: FileOffset,
    /// Its page size.
    pub page_size: PageSize,
}

impl Region {
    /// The host address after its last byte.
    pub fn host_end(&self) -> u64 {
        self.host.0 + self.size
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: HostAddr) -> bool {
        addr.0 >= self.host.0 && addr.0 < self.host_end()
    }

    /// The file offset backing `addr`; `addr` must lie in the region.
    pub fn file_offset_of(&self, addr: HostAddr) -> FileOffset {
        debug_assert!(self.contains(addr));
        FileOffset(self.file_offset.0 + (addr.0 - self.host.0))
    }
}

/// Why a region list was refused. Indexes are positions in the VMM's JSON array.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum RegionError {
    #[error("the region list is empty")]
    Empty,
    #[error("region {index}: size is 0")]
    ZeroSize { index: usize },
    #[error("region {index}: base_host_virt_addr {addr:#x} is not aligned to its page size {page_size}")]
    UnalignedAddr { index: usize, addr: u64, page_size: u64 },
    #[error("region {index}: size {size:#x} is not a multiple of its page size {page_size}")]
    UnalignedSize { index: usize, size: u64, page_size: u64 },
    #[error("region {index}: offset {offset:#x} is not aligned to its page size {page_size}")]
    UnalignedOffset { index: usize, offset: u64, page_size: u64 },
    #[error("region {index}: base_host_virt_addr + size or offset + size overflows")]
    Overflow { index: usize },
    #[error("region {index}: offset + size = {end:#x} is past the end of the memory file ({file_len:#x} bytes)")]
    PastEndOfFile { index: usize, end: u64, file_len: u64 },
    #[error("regions {first} and {second} overlap in the VMM's address space (base_host_virt_addr)")]
    OverlappingHost { first: usize, second: usize },
    #[error("regions {first} and {second} overlap in the memory file (offset)")]
    OverlappingFile { first: usize, second: usize },
    #[error("region at {host}: page_size {declared} but the VMM maps it with {mapped}-byte pages")]
    PageSizeMismatch { host: HostAddr, declared: u64, mapped: u64 },
    #[error("region at {host}: the VMM has no mapping there")]
    NotMapped { host: HostAddr },
}

/// Validated regions, sorted by host address.
#[derive(Clone, Debug)]
pub struct RegionMap {
    regions: Vec<Region>,
}

impl RegionMap {
    /// Validates `regions` (in the VMM's order) against a memory file of `file_len` bytes.
    pub fn new(regions: Vec<Region>, file_len: u64) -> Result<Self, RegionError> {
        if regions.is_empty() {
            return Err(RegionError::Empty);
        }
        for (index, r) in regions.iter().enumerate() {
            let page = r.page_size.bytes();
            if r.size == 0 {
                return Err(RegionError::ZeroSize { index });
            }
            if !r.host.is_aligned(page) {
                let addr = r.host.0;
                return Err(RegionError::UnalignedAddr { index, addr, page_size: page });
            }
            if r.size % page != 0 {
                let size = r.size;
                return Err(RegionError::UnalignedSize { index, size, page_size: page });
            }
            if r.file_offset.0 % page != 0 {
                let offset = r.file_offset.0;
                return Err(RegionError::UnalignedOffset { index, offset, page_size: page });
            }
            let file_end = r.file_offset.0.checked_add(r.size);
            if r.host.0.checked_add(r.size).is_none() || file_end.is_none() {
                return Err(RegionError::Overflow { index });
            }
            let end = file_end.unwrap_or(u64::MAX);
            if end > file_len {
                return Err(RegionError::PastEndOfFile { index, end, file_len });
            }
        }
        check_disjoint(&regions, |r| (r.host.0, r.host_end()))
            .map_err(|(first, second)| RegionError::OverlappingHost { first, second })?;
        check_disjoint(&regions, |r| (r.file_offset.0, r.file_offset.0 + r.size))
            .map_err(|(first, second)| RegionError::OverlappingFile { first, second })?;
        let mut regions = regions;
        regions.sort_by_key(|r| r.host);
        Ok(RegionMap { regions })
    }

    /// Checks each region's page size against the page size of the VMM's mapping at its start:
    /// a 2 MiB page size declared for 4 KiB memory would have every fault filled in 2 MiB
    /// pieces over 4 KiB pages. A VMM whose maps cannot be read (another pid namespace) is not
    /// checked.
    pub fn check_page_sizes(&self, peer_pid: i32) -> Result<(), RegionError> {
        let mapped = match mapping_page_sizes(peer_pid, &self.regions) {
            Ok(mapped) => mapped,
            Err(e) => {
                tracing::warn!(peer_pid, "cannot read the VMM's mappings ({e}): region page sizes not checked");
                return Ok(());
            }
        };
        for (region, mapped) in self.regions.iter().zip(mapped) {
            let mapped = mapped.ok_or(RegionError::NotMapped { host: region.host })?;
            let declared = region.page_size.bytes();
            if mapped != declared {
                return Err(RegionError::PageSizeMismatch { host: region.host, declared, mapped });
            }
        }
        Ok(())
    }

    /// The region containing `addr`, if any (a VM has a handful of regions: a scan is fastest).
    pub fn find(&self, addr: HostAddr) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(addr))
    }

    /// The regions, by host address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Guest memory bytes over all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// The page size of process `pid`'s mapping holding each region's start (None: no mapping
/// there). Asked with PROCMAP_QUERY (Linux 6.11+): ~3 µs a lookup here. Before it, read from
/// `/proc/PID/smaps`, whose read walks the page tables of every mapping: 2.4 ms for a process
/// with 128 MiB resident, 12 ms with 1 GiB, here — on the way from a VMM's handshake to its
/// first page.
fn mapping_page_sizes(pid: i32, regions: &[Region]) -> std::io::Result<Vec<Option<u64>>> {
    let maps = std::fs::File::open(format!("/proc/{pid}/maps"))?;
    match regions.iter().map(|region| query_page_size(&maps, region.host)).collect() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
            Ok(regions.iter().map(|region| kernel_page_size(&smaps, region.host)).collect())
        }
        asked => asked,
    }
}

/// `struct procmap_query` (linux/fs.h, 6.11+): what PROCMAP_QUERY is asked and answers.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `PROCMAP_QUERY = _IOWR('f', 17, struct procmap_query)`, an ioctl on `/proc/PID/maps`.
const PROCMAP_QUERY: u64 = 0xC068_6611;

/// The page size of the mapping holding `addr` in the process whose `/proc/PID/maps` is
/// `maps`; None if no mapping holds it.
fn query_page_size(maps: &std::fs::File, addr: HostAddr) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // Flags 0: only the mapping covering the address. No name or build id asked for.
    let mut query = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr.0,
        ..ProcmapQuery::default()
    };
    // SAFETY: `query` is a valid procmap_query whose size field says so, alive for the call;
    // with no name or build id buffers the kernel writes only into `query`.
    let ret = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY as _, &raw mut query) };
    if ret == 0 {
        return Ok(Some(query.vma_page_size));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The `KernelPageSize` (bytes) of the mapping holding `addr` in an smaps text.
fn kernel_page_size(smaps: &str, addr: HostAddr) -> Option<u64> {
    let mut inside = false;
    for line in smaps.lines() {
        let header =
            line.split_whitespace().next().and_then(|range| range.split_once('-')).and_then(|(start, end)| {
                Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?))
            });
        // A mapping's header starts with `start-end` in hex; its fields with `Name:`.
        if let Some((start, end)) = header {
            inside = start <= addr.0 && addr.0 < end;
        } else if inside {
            if let Some(kib) = line.strip_prefix("KernelPageSize:") {
                return kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib * 1024);
            }
        }
    }
    None
}

/// Returns the first pair (by original index) of overlapping `[start, end)` ranges.
fn check_disjoint(regions: &[Region], range: impl Fn(&Region) -> (u64, u64)) -> Result<(), (usize, usize)> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| range(&regions[i]).0);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if range(&regions[b]).0 < range(&regions[a]).1 {
            return Err((a.min(b), a.max(b)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{BASE_PAGE, HUGE_PAGE};

    fn region(host: u64, size: u64, offset: u64) -> Region {
        Region { host: HostAddr(host), size, file_offset: FileOffset(offset), page_size: PageSize::Base }
    }

    #[test]
    fn accepts_two_regions_around_a_gap_and_finds_addresses() {
        let map = RegionMap::new(vec![region(0x20_0000, 0x4000, 0x4000), region(0x10_0000, 0x4000, 0)], 0x8000)
            .expect("valid");
        assert_eq!(map.regions()[0].host, HostAddr(0x10_0000), "sorted by host address");
        let r = map.find(HostAddr(0x20_1234)).expect("inside second region");
        assert_eq!(r.file_offset_of(HostAddr(0x20_1234)), FileOffset(0x5234));
        assert!(map.find(HostAddr(0x10_4000)).is_none(), "the gap maps to nothing");
        assert_eq!(map.total_bytes(), 0x8000);
    }

    #[test]
    fn refuses_each_invalid_layout_with_its_reason() {
        let file = 16 * BASE_PAGE;
        let cases = [
            (vec![], RegionError::Empty),
            (vec![region(0x1000, 0, 0)], RegionError::ZeroSize { index: 0 }),
            (
                vec![region(0x1800, 0x1000, 0)],
                RegionError::UnalignedAddr { index: 0, addr: 0x1800, page_size: BASE_PAGE },
            ),
            (
                vec![region(0x1000, 0x1800, 0)],
                RegionError::UnalignedSize { index: 0, size: 0x1800, page_size: BASE_PAGE },
            ),
            (
                vec![region(0x1000, 0x1000, 0x800)],
                RegionError::UnalignedOffset { index: 0, offset: 0x800, page_size: BASE_PAGE },
            ),
            (
                vec![region(0x1000, 0x2000, file - 0x1000)],
                RegionError::PastEndOfFile { index: 0, end: file + 0x1000, file_len: file },
            ),
            (
                vec![region(0x1000, 0x2000, 0), region(0x2000, 0x1000, 0x2000)],
                RegionError::OverlappingHost { first: 0, second: 1 },
            ),
            (
                vec![region(0x1000, 0x2000, 0), region(0x9000, 0x1000, 0x1000)],
                RegionError::OverlappingFile { first: 0, second: 1 },
            ),
            (vec![region(u64::MAX - 0xfff, 0x2000, 0)], RegionError::Overflow { index: 0 }),
        ];
        for (regions, expected) in cases {
            assert_eq!(RegionMap::new(regions, file).unwrap_err(), expected);
        }
    }

    #[test]
    fn reads_the_page_size_of_the_mapping_holding_an_address() {
        let smaps = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \nSize:               2048 kB\nKernelPageSize:        4 kB\nVmFlags: rd wr mr mw me ac \n\
                     7f0000400000-7f0000800000 rw-p 00000000 00:0f 1234   /anon_hugepage (deleted)\nKernelPageSize:     2048 kB\n";
        assert_eq!(kernel_page_size(smaps, HostAddr(0x7f00_0010_0000)), Some(4096));
        assert_eq!(kernel_page_size(smaps, HostAddr(0x7f00_0040_0000)), Some(HUGE_PAGE));
        assert_eq!(kernel_page_size(smaps, HostAddr(0x7f00_0030_0000)), None, "between mappings");
    }

    #[test]
    fn page_sizes_are_checked_against_the_process_mappings() {
        let memory = memmap2::MmapMut::map_anon(8 << 20).expect("anonymous memory"); // 4 huge pages
        let huge_aligned = (memory.as_ptr() as u64).next_multiple_of(HUGE_PAGE);
        let pid = std::process::id().cast_signed();
        let base = RegionMap::new(vec![region(huge_aligned, HUGE_PAGE, 0)], HUGE_PAGE).expect("regions");
        assert_eq!(base.check_page_sizes(pid), Ok(()));
        let mut declared_huge = region(huge_aligned, HUGE_PAGE, 0);
        declared_huge.page_size = PageSize::Huge;
        let huge = RegionMap::new(vec![declared_huge], HUGE_PAGE).expect("regions");
        let mismatch =
            RegionError::PageSizeMismatch { host: HostAddr(huge_aligned), declared: HUGE_PAGE, mapped: BASE_PAGE };
        assert_eq!(huge.check_page_sizes(pid), Err(mismatch));
        // Page 1 of the address space is never mapped.
        let nowhere = RegionMap::new(vec![region(BASE_PAGE, BASE_PAGE, 0)], BASE_PAGE).expect("regions");
        assert_eq!(nowhere.check_page_sizes(pid), Err(RegionError::NotMapped { host: HostAddr(BASE_PAGE) }));

        // PROCMAP_QUERY and smaps agree (a kernel before 6.11 has only smaps: not in CI).
        let maps = std::fs::File::open(format!("/proc/{pid}/maps")).expect("maps");
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
        for addr in [HostAddr(huge_aligned), HostAddr(BASE_PAGE), HostAddr(memory.as_ptr() as u64)] {
            match query_page_size(&maps, addr) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) && std::env::var_os("CI").is_none() => {
                    eprintln!("no PROCMAP_QUERY on this kernel: only smaps was checked");
                    break;
                }
                asked => assert_eq!(asked.expect("PROCMAP_QUERY"), kernel_page_size(&smaps, addr), "{addr}"),
            }
        }
        drop(memory);
    }

    #[test]
    fn huge_page_regions_must_be_2mib_aligned() {
        let mut r = region(HUGE_PAGE + BASE_PAGE, HUGE_PAGE, 0);
        r.page_size = PageSize::Huge;
        let err = RegionMap::new(vec![r], HUGE_PAGE).unwrap_err();
        assert!(matches!(err, RegionError::UnalignedAddr { page_size: HUGE_PAGE, .. }));
    }
}
