//! Newtypes for the quantities the server must never mix up: an address in the VMM's address
//! space, an offset in a snapshot memory file, and a page size.

use serde::Serialize;
use std::fmt;

/// Base page size of x86-64 and the granularity of the zero-page index.
pub const BASE_PAGE: u64 = 4096;
/// Huge page size of hugetlbfs-backed guest memory (x86-64 PMD).
pub const HUGE_PAGE: u64 = 2 * 1024 * 1024;

/// A virtual address in the VMM's address space. The server never dereferences it: it only names
/// a destination for UFFDIO_COPY and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HostAddr(pub u64);

/// A byte offset in a snapshot memory file (Firecracker's raw layout: regions back to back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FileOffset(pub u64);

/// Page size of a guest memory region, the unit of every ioctl on that region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PageSize {
    /// 4 KiB pages (anonymous memory).
    Base,
    /// 2 MiB pages (hugetlbfs): UFFDIO_ZEROPAGE is not supported there, zeros are copied.
    Huge,
}

impl PageSize {
    /// Parses a page size given in bytes; only 4 KiB and 2 MiB exist for Firecracker guests.
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            BASE_PAGE => Some(PageSize::Base),
            HUGE_PAGE => Some(PageSize::Huge),
            _ => None,
        }
    }

    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Base => BASE_PAGE,
            PageSize::Huge => HUGE_PAGE,
        }
    }
}

impl HostAddr {
    /// The address rounded down to a multiple of `align` (a power of two).
    pub fn align_down(self, align: u64) -> HostAddr {
        HostAddr(self.0 & !(align - 1))
    }

    /// Whether the address is a multiple of `align`.
    pub fn is_aligned(self, align: u64) -> bool {
        self.0.is_multiple_of(align)
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for FileOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}
