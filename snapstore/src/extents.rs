//! Where a sparse file holds data: SEEK_DATA/SEEK_HOLE, so that holes are never read.

use crate::PAGE;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::os::fd::AsRawFd;

/// `[start, end)` ranges of `file` that may hold data, page aligned. Falls back to the whole
/// file where the filesystem cannot report holes.
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let Ok(end_of_file) = i64::try_from(len) else {
        return vec![(0, len)];
    };
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while pos < end_of_file {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(_) => {
                extents.push((pos.unsigned_abs(), len)); // no hole support: read the rest
                break;
            }
        };
        let end = lseek(fd, start, Whence::SeekHole).unwrap_or(end_of_file).min(end_of_file);
        // Extents are page-aligned on every filesystem we know; round outward to be sure.
        let aligned_start = start.unsigned_abs() / PAGE * PAGE;
        let aligned_end = end.unsigned_abs().div_ceil(PAGE) * PAGE;
        extents.push((aligned_start, aligned_end.min(len)));
        pos = end;
    }
    extents
}
