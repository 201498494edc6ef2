//! The loading-set file: a plan's batches with their bytes back to back, in plan order, so
//! that one sequential read brings a working set in (FaaSnap's and REAP's idea) for a snapshot
//! that is not held in memory.
//!
//! Unlike a working set, a loading set carries *data*: a wrong byte in it would be served to a
//! guest. So it is bound to its snapshot by identity (size + fingerprint) *and* by the memory
//! file's modification time, every batch's bytes carry a CRC32 that is checked on load, and a
//! batch that fails is dropped (its pages come from the snapshot on demand), never served.
//!
//! ```text
//! 0   8   magic "UFFDLSET"
//! 8   4   version (u32 LE)
//! 12  4   batch count N
//! 16  8   snapshot length
//! 24  8   snapshot fingerprint
//! 32  8   memory file mtime, ns since the epoch
//! 40  8   FNV-1a 64 of the batch table
//! 48  24N batch table: first page u64, pages u32, kind u32 (0 copy, 1 zero), CRC32 of its bytes u32, pad u32
//! …       the bytes of every copy batch, back to back, from offset 48 + 24N rounded up to 4096
//! ```

use crate::identity::SnapshotIdentity;
use crate::plan::{Batch, BatchKind};
use std::io;
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"UFFDLSET";
pub const VERSION: u32 = 1;
const HEADER: usize = 48;
const ENTRY: usize = 24;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoadingSetError {
    #[error("cannot read loading set {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("not a loading-set file (bad magic)")]
    BadMagic,
    #[error("version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("truncated: {len} bytes, {expected} expected")]
    Truncated { len: usize, expected: usize },
    #[error("its batch table is corrupt (checksum mismatch)")]
    Table,
    #[error("it belongs to another snapshot ({file:?}; this snapshot is {snapshot:?})")]
    OtherSnapshot { file: SnapshotIdentity, snapshot: SnapshotIdentity },
    #[error("the memory file changed since it was written (mtime {file_ns} ns, now {snapshot_ns} ns)")]
    SnapshotChanged { file_ns: u64, snapshot_ns: u64 },
}

/// A loaded loading set: the plan and, for each batch that passed its check, its bytes.
pub struct LoadingSet {
    batches: Vec<Batch>,
    /// Byte range of each copy batch's data in `data`; None for zero batches and dropped ones.
    ranges: Vec<Option<std::ops::Range<usize>>>,
    data: Vec<u8>,
    dropped: usize,
}

impl LoadingSet {
    /// Writes the loading set of `batches` for a snapshot, atomically; `read(offset, buf)`
    /// reads the snapshot's bytes.
    pub fn write(
        path: &Path,
        identity: SnapshotIdentity,
        snapshot_mtime_ns: u64,
        batches: &[Batch],
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut table = Vec::with_capacity(batches.len() * ENTRY);
        let mut data = Vec::new();
        for batch in batches {
            let mut crc = 0;
            if batch.kind == BatchKind::Copy {
                let start = data.len();
                data.resize(start + batch.pages as usize * PAGE, 0);
                read(batch.first_page * PAGE as u64, &mut data[start..])?;
                crc = crc32fast::hash(&data[start..]);
            }
            let pages = u32::try_from(batch.pages).map_err(|_| io::Error::other("batch too large"))?;
            table.extend_from_slice(&batch.first_page.to_le_bytes());
            table.extend_from_slice(&pages.to_le_bytes());
            table.extend_from_slice(&u32::from(batch.kind == BatchKind::Zero).to_le_bytes());
            table.extend_from_slice(&crc.to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
        }
        let count = u32::try_from(batches.len()).map_err(|_| io::Error::other("too many batches"))?;
        let mut out = Vec::with_capacity(data_offset(batches.len()) + data.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&identity.len.to_le_bytes());
        out.extend_from_slice(&identity.fingerprint.to_le_bytes());
        out.extend_from_slice(&snapshot_mtime_ns.to_le_bytes());
        out.extend_from_slice(&crate::fnv1a(crate::FNV_OFFSET, &table).to_le_bytes());
        out.extend_from_slice(&table);
        out.resize(data_offset(batches.len()), 0);
        out.extend_from_slice(&data);
        crate::format::write_file_atomic(path, &out)
    }

    /// Reads the file in one sequential read and checks it against the snapshot.
    pub fn load(
        path: &Path,
        identity: SnapshotIdentity,
        snapshot_mtime_ns: u64,
    ) -> Result<LoadingSet, LoadingSetError> {
        let bytes = std::fs::read(path).map_err(|source| LoadingSetError::Io { path: path.into(), source })?;
        Self::decode(bytes, identity, snapshot_mtime_ns)
    }

    pub fn decode(bytes: Vec<u8>, identity: SnapshotIdentity, mtime_ns: u64) -> Result<LoadingSet, LoadingSetError> {
        let truncated = |expected| LoadingSetError::Truncated { len: bytes.len(), expected };
        if bytes.len() < HEADER {
            return Err(truncated(HEADER));
        }
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        if bytes[..8] != MAGIC {
            return Err(LoadingSetError::BadMagic);
        }
        if u32_at(8) != VERSION {
            return Err(LoadingSetError::UnsupportedVersion(u32_at(8)));
        }
        let count = u32_at(12) as usize;
        let table_end = HEADER + count * ENTRY;
        if bytes.len() < table_end {
            return Err(truncated(table_end));
        }
        if crate::fnv1a(crate::FNV_OFFSET, &bytes[HEADER..table_end]) != u64_at(40) {
            return Err(LoadingSetError::Table);
        }
        let file = SnapshotIdentity { len: u64_at(16), fingerprint: u64_at(24) };
        if file != identity {
            return Err(LoadingSetError::OtherSnapshot { file, snapshot: identity });
        }
        if u64_at(32) != mtime_ns {
            return Err(LoadingSetError::SnapshotChanged { file_ns: u64_at(32), snapshot_ns: mtime_ns });
        }
        let mut at = data_offset(count);
        let (mut batches, mut ranges, mut dropped) = (Vec::with_capacity(count), Vec::with_capacity(count), 0);
        for i in 0..count {
            let entry = HEADER + i * ENTRY;
            let (first_page, pages, zero, crc) =
                (u64_at(entry), u32_at(entry + 8), u32_at(entry + 12), u32_at(entry + 16));
            let kind = if zero == 1 { BatchKind::Zero } else { BatchKind::Copy };
            batches.push(Batch { first_page, pages: u64::from(pages), kind, rank: i as f64 });
            if kind == BatchKind::Zero {
                ranges.push(None);
                continue;
            }
            let range = at..at + pages as usize * PAGE;
            at = range.end;
            let good = bytes.get(range.clone()).is_some_and(|data| crc32fast::hash(data) == crc);
            dropped += usize::from(!good);
            ranges.push(good.then_some(range));
        }
        if bytes.len() < at {
            return Err(truncated(at));
        }
        Ok(LoadingSet { batches, ranges, data: bytes, dropped })
    }

    /// The plan, in the order the file holds it.
    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    /// The checked bytes of batch `index`: None for zero batches and batches that failed.
    pub fn data(&self, index: usize) -> Option<&[u8]> {
        self.ranges.get(index)?.clone().map(|range| &self.data[range])
    }

    /// Batches whose bytes failed their CRC: left to demand faults.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

fn data_offset(batches: usize) -> usize {
    (HEADER + batches * ENTRY).next_multiple_of(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Vec<u8> {
        (0..64 * PAGE).map(|i| (i / PAGE * 7 + i % 251) as u8).collect()
    }

    fn batches() -> Vec<Batch> {
        vec![
            Batch { first_page: 10, pages: 3, kind: BatchKind::Copy, rank: 0.0 },
            Batch { first_page: 40, pages: 2, kind: BatchKind::Zero, rank: 1.0 },
            Batch { first_page: 2, pages: 1, kind: BatchKind::Copy, rank: 2.0 },
        ]
    }

    fn written(mem: &[u8]) -> (tempfile::TempDir, PathBuf, SnapshotIdentity) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ls");
        let identity = SnapshotIdentity::of(mem);
        let read = |offset: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&mem[offset as usize..offset as usize + buf.len()]);
            Ok(())
        };
        LoadingSet::write(&path, identity, 77, &batches(), read).expect("write");
        (dir, path, identity)
    }

    #[test]
    fn round_trips_in_plan_order_with_each_batch_s_bytes() {
        let mem = snapshot();
        let (_dir, path, identity) = written(&mem);
        let ls = LoadingSet::load(&path, identity, 77).expect("load");
        assert_eq!(ls.batches().iter().map(|b| b.first_page).collect::<Vec<_>>(), vec![10, 40, 2]);
        assert_eq!(ls.data(0), Some(&mem[10 * PAGE..13 * PAGE]));
        assert_eq!(ls.data(1), None, "zero batches carry no bytes");
        assert_eq!(ls.data(2), Some(&mem[2 * PAGE..3 * PAGE]));
        assert_eq!(ls.dropped(), 0);
    }

    #[test]
    fn damage_is_refused_or_confined_to_its_batch() {
        let mem = snapshot();
        let (_dir, path, identity) = written(&mem);
        let good = std::fs::read(&path).expect("read");
        let decode = |bytes: Vec<u8>| LoadingSet::decode(bytes, identity, 77);
        // A flipped data byte drops that batch only.
        let mut data_flip = good.clone();
        let last = data_flip.len() - 1;
        data_flip[last] ^= 1;
        let ls = decode(data_flip).expect("still usable");
        assert_eq!((ls.dropped(), ls.data(2), ls.data(0).is_some()), (1, None, true));
        let mut table_flip = good.clone();
        table_flip[HEADER + 1] ^= 1;
        assert!(matches!(decode(table_flip), Err(LoadingSetError::Table)));
        assert!(matches!(decode(good[..good.len() - 5].to_vec()), Err(LoadingSetError::Truncated { .. })));
        assert!(matches!(decode(good[..20].to_vec()), Err(LoadingSetError::Truncated { .. })));
        let mut version = good.clone();
        version[8] = 3;
        assert!(matches!(decode(version), Err(LoadingSetError::UnsupportedVersion(3))));
        let other = SnapshotIdentity { fingerprint: identity.fingerprint ^ 1, ..identity };
        assert!(matches!(LoadingSet::decode(good.clone(), other, 77), Err(LoadingSetError::OtherSnapshot { .. })));
        assert!(matches!(LoadingSet::decode(good, identity, 78), Err(LoadingSetError::SnapshotChanged { .. })));
    }
}
