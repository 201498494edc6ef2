//! Which snapshot a working set belongs to: its size and a cheap fingerprint.
//!
//! The fingerprint hashes 64 pages sampled evenly across the file (always the first and the
//! last) plus the length: 256 KiB read, whatever the snapshot's size, which is cheap enough to
//! compute at every server start. A different snapshot of the same size that agrees on all 64
//! pages would go undetected; the cost is a useless prefetch, never a wrong byte (the server
//! serves pages from the snapshot, not from the working set).

use serde::{Deserialize, Serialize};

const SAMPLES: u64 = 64;
const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
/// A snapshot memory file, as far as a working set needs to know it.
pub struct SnapshotIdentity {
    /// Its length in bytes.
    pub len: u64,
    /// FNV-1a over the length and 64 sampled pages.
    pub fingerprint: u64,
}

impl SnapshotIdentity {
    /// The identity of a snapshot whose bytes are `memory`.
    pub fn of(memory: &[u8]) -> SnapshotIdentity {
        let read = |offset: u64, buf: &mut [u8]| {
            let start = usize::try_from(offset).map_err(std::io::Error::other)?;
            buf.copy_from_slice(&memory[start..start + buf.len()]);
            Ok(())
        };
        match Self::compute(memory.len() as u64, read) {
            Ok(identity) => identity,
            Err(e) => unreachable!("reading from memory cannot fail: {e}"),
        }
    }

    /// The identity of a snapshot of `len` bytes, reading only its sampled pages through
    /// `read(offset, buf)` (a snapshot on disk is not read whole for this).
    pub fn compute(len: u64, mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>) -> std::io::Result<Self> {
        let pages = len.div_ceil(PAGE);
        let mut hash = crate::fnv1a(crate::FNV_OFFSET, &len.to_le_bytes());
        let samples = SAMPLES.min(pages);
        let mut buf = [0u8; PAGE_BYTES];
        for i in 0..samples {
            let page = if samples > 1 { i * (pages - 1) / (samples - 1) } else { 0 };
            let bytes = usize::try_from(PAGE.min(len - page * PAGE)).unwrap_or(PAGE_BYTES);
            read(page * PAGE, &mut buf[..bytes])?;
            hash = crate::fnv1a(hash, &buf[..bytes]);
        }
        Ok(SnapshotIdentity { len, fingerprint: hash })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_pages_and_length_change_the_identity() {
        let a = vec![1u8; 1 << 20];
        let mut b = a.clone();
        b[(1 << 20) - 1] = 2; // the last page is always sampled
        assert_ne!(SnapshotIdentity::of(&a), SnapshotIdentity::of(&b));
        assert_ne!(SnapshotIdentity::of(&a), SnapshotIdentity::of(&a[..1 << 19]));
        assert_eq!(SnapshotIdentity::of(&a), SnapshotIdentity::of(&a.clone()));
    }
}
