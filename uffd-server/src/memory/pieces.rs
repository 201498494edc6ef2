//! From a file range to the host pieces that hold it.
//!
//! Demand faults, prefetch batches and loading-set batches all name what they place as a range
//! of the snapshot's memory file; the guest holds it in one or more regions of the VMM's address
//! space. A piece is what one placement covers: inside one region, aligned to its page size (a
//! hugetlbfs region is filled in whole 2 MiB pages, so a range there is widened to them), and
//! never longer than [`MAX_PIECE`], the zero buffer's length.

use crate::addr::{FileOffset, HostAddr, PageSize, HUGE_PAGE};
use crate::memory::regions::{Region, RegionMap};

/// Longest piece: one huge page, the length of the zero buffer. Pieces are cut at host
/// addresses aligned to it, so none splits a huge page.
pub const MAX_PIECE: u64 = HUGE_PAGE;

/// A host range of one region and the file range backing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Where it starts in the VMM's address space.
    pub host: HostAddr,
    /// Its length in bytes, a multiple of `page_size`.
    pub len: u64,
    /// The file offset backing `host`.
    pub file: FileOffset,
    /// The region's page size, the unit of every ioctl on it.
    pub page_size: PageSize,
}

impl Piece {
    /// The piece of `region` at host `[host, host + len)`, which must lie inside it.
    pub fn of_region(region: &Region, host: HostAddr, len: u64) -> Piece {
        Piece { host, len, file: region.file_offset_of(host), page_size: region.page_size }
    }

    /// The part of this piece from `at` bytes in, `len` bytes long.
    pub fn part(&self, at: u64, len: u64) -> Piece {
        Piece { host: HostAddr(self.host.0 + at), len, file: FileOffset(self.file.0 + at), page_size: self.page_size }
    }
}

/// The pieces holding file range `[start, end)`, region by region in host order. Parts of the
/// range that no region maps are skipped.
pub fn pieces(regions: &RegionMap, start: FileOffset, end: FileOffset) -> impl Iterator<Item = Piece> + '_ {
    regions.regions().iter().flat_map(move |region| region_pieces(region, start.0, end.0))
}

fn region_pieces(region: &Region, start: u64, end: u64) -> impl Iterator<Item = Piece> + '_ {
    let region_file_end = region.file_offset.0 + region.size;
    let (start, end) = (start.max(region.file_offset.0), end.min(region_file_end));
    let unit = region.page_size.bytes();
    let host_of = |file: u64| region.host.0 + (file - region.file_offset.0);
    let (mut at, host_end) = if start < end {
        (HostAddr(host_of(start)).align_down(unit).0, host_of(end).next_multiple_of(unit).min(region.host_end()))
    } else {
        (0, 0)
    };
    std::iter::from_fn(move || {
        (at < host_end).then(|| {
            let next = (at / MAX_PIECE + 1).saturating_mul(MAX_PIECE).min(host_end);
            let piece = Piece::of_region(region, HostAddr(at), next - at);
            at = next;
            piece
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::BASE_PAGE;
    use proptest::prelude::*;

    /// Regions back to back in the file, with host gaps between them, in random page sizes.
    fn layout() -> impl Strategy<Value = RegionMap> {
        proptest::collection::vec((1u64..4, 0u64..3, any::<bool>()), 1..4).prop_map(|specs| {
            let (mut host, mut file) = (1u64 << 30, 0u64);
            let regions = specs
                .into_iter()
                .map(|(huge_pages, gap, huge)| {
                    let page_size = if huge { PageSize::Huge } else { PageSize::Base };
                    let size = huge_pages * HUGE_PAGE;
                    let region = Region { host: HostAddr(host), size, file_offset: FileOffset(file), page_size };
                    host += size + gap * HUGE_PAGE;
                    file += size;
                    region
                })
                .collect();
            RegionMap::new(regions, file).expect("valid layout")
        })
    }

    proptest! {
        #[test]
        fn pieces_cover_the_range_aligned_inside_one_region_and_never_split_a_huge_page(
            map in layout(),
            first in 0u64..3 * 512 * 4,
            pages in 0u64..3 * 512 * 4,
        ) {
            let (start, end) = (first * BASE_PAGE, (first + pages) * BASE_PAGE);
            let all: Vec<Piece> = pieces(&map, FileOffset(start), FileOffset(end)).collect();
            for piece in &all {
                let region = map.find(piece.host).expect("a piece lies in a region");
                let unit = region.page_size.bytes();
                prop_assert!(piece.host.0 + piece.len <= region.host_end(), "crosses its region's end");
                prop_assert_eq!(piece.page_size, region.page_size);
                prop_assert_eq!(piece.file, region.file_offset_of(piece.host));
                prop_assert!(piece.len > 0 && piece.len <= MAX_PIECE);
                prop_assert!(piece.host.is_aligned(unit) && piece.len % unit == 0, "not aligned: {:?}", piece);
                prop_assert!(piece.host.0 / MAX_PIECE == (piece.host.0 + piece.len - 1) / MAX_PIECE, "spans a 2 MiB boundary");
            }
            prop_assert!(all.windows(2).all(|w| w[0].host.0 + w[0].len <= w[1].host.0), "overlap or out of order");
            // Coverage: every file page of the range that a region maps is in exactly one piece;
            // a page outside the range is only there to complete a huge page.
            for region in map.regions() {
                let unit = region.page_size.bytes();
                for page in (region.file_offset.0..region.file_offset.0 + region.size).step_by(4096) {
                    let holders = all.iter().filter(|p| p.file.0 <= page && page < p.file.0 + p.len).count();
                    // Its page of the region's page size (file offsets are aligned to it).
                    let block = page / unit * unit;
                    // An empty range wants nothing, not even the huge page it points into.
                    let wanted = start < end && block < end && start < block + unit;
                    prop_assert_eq!(holders, usize::from(wanted), "file page {:#x}", page);
                }
            }
        }
    }

    #[test]
    fn a_range_across_two_regions_becomes_a_piece_in_each() {
        let base = Region {
            host: HostAddr(0x4000_0000),
            size: HUGE_PAGE,
            file_offset: FileOffset(0),
            page_size: PageSize::Base,
        };
        let huge = Region {
            host: HostAddr(0x8000_0000),
            size: 2 * HUGE_PAGE,
            file_offset: FileOffset(HUGE_PAGE),
            page_size: PageSize::Huge,
        };
        let map = RegionMap::new(vec![base, huge], 3 * HUGE_PAGE).expect("valid");
        let all: Vec<Piece> =
            pieces(&map, FileOffset(HUGE_PAGE - 2 * BASE_PAGE), FileOffset(HUGE_PAGE + 2 * BASE_PAGE)).collect();
        assert_eq!(
            all,
            vec![
                Piece::of_region(&base, HostAddr(0x4000_0000 + HUGE_PAGE - 2 * BASE_PAGE), 2 * BASE_PAGE),
                Piece::of_region(&huge, HostAddr(0x8000_0000), HUGE_PAGE), // widened to its huge page
            ]
        );
    }
}
