//! The loading-set file: a plan's batches with their bytes back to back, in plan order, so
//! that one sequential read brings a working set in (FaaSnap's and REAP's idea) for a snapshot
//! that is not held in memory.
//!
//! Opening reads only the header and the batch table; each batch's bytes are read the first
//! time they are asked for — in plan order, so the reads are sequential and the kernel's
//! readahead streams the file — and kept for later VMs. Measured: reading the whole file
//! before serving the first fault made a cold restore slower than no loading set at all.
//!
//! Unlike a working set, a loading set carries *data*: a wrong byte in it would be served to a
//! guest. So it is bound to its snapshot by identity (size + fingerprint) *and* by the memory
//! file's stamp (device, inode, size, mtime and ctime, hashed: the file rewritten in place, even
//! with its mtime set back, no longer matches), every batch's bytes carry a CRC32 that is
//! checked when they are read, and a batch that fails is dropped (its pages come from the
//! snapshot), never served.
//!
//! ```text
//! 0   8   magic "UFFDLSET"
//! 8   4   version (u32 LE)
//! 12  4   batch count N
//! 16  8   snapshot length
//! 24  8   snapshot fingerprint
//! 32  8   memory file stamp (a hash of its device, inode, size, mtime and ctime)
//! 40  8   FNV-1a 64 of the batch table
//! 48  24N batch table: first page u64, pages u32, kind u32 (0 copy, 1 zero), CRC32 of its bytes u32,
//!         flags u32 (bit 0: deferred — pages seen in fewer than half the runs)
//! …       the bytes of every copy batch, back to back, from offset 48 + 24N rounded up to 4096
//! ```

use crate::identity::SnapshotIdentity;
use crate::plan::{Batch, BatchKind, Plan};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"UFFDLSET";
/// The version this build writes and reads (2: bound to the file stamp, not only its mtime).
pub const VERSION: u32 = 2;
const HEADER: usize = 48;
const ENTRY: usize = 24;
const PAGE: usize = 4096;

/// Why a loading-set file was not used.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
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
    #[error("the memory file changed since it was written (file stamp {written:#x}, now {now:#x})")]
    SnapshotChanged { written: u64, now: u64 },
}

/// An open loading set: the plan, and each batch's checked bytes once read.
pub struct LoadingSet {
    /// The plan it stores; batch `i` has priority `i`.
    plan: Plan,
    /// Per batch: offset of its bytes and their CRC32; None for zero batches.
    entries: Vec<Option<(u64, u32)>>,
    source: Source,
    /// Each batch's bytes, read on first use; None inside: they failed their check.
    cache: Vec<OnceLock<Option<Box<[u8]>>>>,
    dropped: AtomicUsize,
}

enum Source {
    File(File),
    Bytes(Vec<u8>),
}

impl LoadingSet {
    /// Writes the loading set of `plan` for a snapshot, atomically (deferred batches are
    /// flagged as such); `read(offset, buf)` reads the snapshot.
    pub fn write(
        path: &Path,
        identity: SnapshotIdentity,
        snapshot_stamp: u64,
        plan: &Plan,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let batches = &plan.batches;
        let mut table = Vec::with_capacity(batches.len() * ENTRY);
        let mut data = Vec::new();
        for (index, batch) in batches.iter().enumerate() {
            let mut crc = 0;
            if batch.kind == BatchKind::Copy {
                let start = data.len();
                data.resize(start + byte_len(batch.pages), 0);
                read(batch.first_page * PAGE as u64, &mut data[start..])?;
                crc = crc32fast::hash(&data[start..]);
            }
            let pages = u32::try_from(batch.pages).map_err(|_| io::Error::other("batch too large"))?;
            table.extend_from_slice(&batch.first_page.to_le_bytes());
            table.extend_from_slice(&pages.to_le_bytes());
            table.extend_from_slice(&u32::from(batch.kind == BatchKind::Zero).to_le_bytes());
            table.extend_from_slice(&crc.to_le_bytes());
            let deferred = index >= plan.deferred_from;
            table.extend_from_slice(&u32::from(deferred).to_le_bytes());
        }
        let count = u32::try_from(batches.len()).map_err(|_| io::Error::other("too many batches"))?;
        let mut out = Vec::with_capacity(data_offset(batches.len()) + data.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&identity.len.to_le_bytes());
        out.extend_from_slice(&identity.fingerprint.to_le_bytes());
        out.extend_from_slice(&snapshot_stamp.to_le_bytes());
        out.extend_from_slice(&crate::fnv1a(crate::FNV_OFFSET, &table).to_le_bytes());
        out.extend_from_slice(&table);
        out.resize(data_offset(batches.len()), 0);
        out.extend_from_slice(&data);
        crate::format::write_file_atomic(path, &out)
    }

    /// Opens the file: reads and checks its header and batch table against the snapshot.
    pub fn load(path: &Path, identity: SnapshotIdentity, snapshot_stamp: u64) -> Result<LoadingSet, LoadingSetError> {
        let io_err = |source| LoadingSetError::Io { path: path.into(), source };
        let file = File::open(path).map_err(io_err)?;
        let len = usize::try_from(file.metadata().map_err(io_err)?.len()).map_err(|e| io_err(io::Error::other(e)))?;
        let mut head = vec![0u8; HEADER.min(len)];
        file.read_exact_at(&mut head, 0).map_err(io_err)?;
        if head.len() == HEADER && head[..8] == MAGIC && u32_at(&head, 8) == VERSION {
            let table_end = (HEADER + u32_at(&head, 12) as usize * ENTRY).min(len);
            head.resize(table_end, 0);
            file.read_exact_at(&mut head[HEADER..], HEADER as u64).map_err(io_err)?;
        }
        let loading_set = Self::parse(&head, len, Source::File(file), identity, snapshot_stamp)?;
        loading_set.read_ahead();
        Ok(loading_set)
    }

    /// Asks the kernel to start reading the data of the batches placed first (all but the
    /// deferred ones), one sequential read in the background: each batch's own read then
    /// finds it cached, or in flight, instead of waiting for its own small disk request.
    /// Only advice: nothing is lost if the kernel ignores it.
    fn read_ahead(&self) {
        let Source::File(file) = &self.source else { return };
        let first = self.entries.iter().flatten().next().map(|&(offset, _)| offset);
        let end = self.entries[..self.plan.deferred_from]
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| entry.map(|(offset, _)| offset + self.plan.batches[i].pages * PAGE as u64))
            .last();
        if let (Some(first), Some(end)) = (first, end) {
            let (Ok(offset), Ok(len)) = (i64::try_from(first), i64::try_from(end.saturating_sub(first))) else {
                return;
            };
            let _ = nix::fcntl::posix_fadvise(
                file.as_raw_fd(),
                offset,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// A loading set held in memory (its whole file's bytes).
    pub fn decode(bytes: Vec<u8>, identity: SnapshotIdentity, stamp: u64) -> Result<LoadingSet, LoadingSetError> {
        let len = bytes.len();
        let head_len = if len >= HEADER { (HEADER + u32_at(&bytes, 12) as usize * ENTRY).min(len) } else { len };
        let head = bytes[..head_len].to_vec();
        Self::parse(&head, len, Source::Bytes(bytes), identity, stamp)
    }

    /// Checks the header and table (`head`) of a file of `len` bytes.
    fn parse(
        head: &[u8],
        len: usize,
        source: Source,
        identity: SnapshotIdentity,
        stamp: u64,
    ) -> Result<LoadingSet, LoadingSetError> {
        let truncated = |expected| LoadingSetError::Truncated { len, expected };
        if head.len() < HEADER {
            return Err(truncated(HEADER));
        }
        if head[..8] != MAGIC {
            return Err(LoadingSetError::BadMagic);
        }
        if u32_at(head, 8) != VERSION {
            return Err(LoadingSetError::UnsupportedVersion(u32_at(head, 8)));
        }
        let count = u32_at(head, 12) as usize;
        let table_end = HEADER + count * ENTRY;
        if head.len() < table_end {
            return Err(truncated(table_end));
        }
        if crate::fnv1a(crate::FNV_OFFSET, &head[HEADER..table_end]) != u64_at(head, 40) {
            return Err(LoadingSetError::Table);
        }
        let file = SnapshotIdentity { len: u64_at(head, 16), fingerprint: u64_at(head, 24) };
        if file != identity {
            return Err(LoadingSetError::OtherSnapshot { file, snapshot: identity });
        }
        if u64_at(head, 32) != stamp {
            return Err(LoadingSetError::SnapshotChanged { written: u64_at(head, 32), now: stamp });
        }
        let mut at = data_offset(count);
        let (mut batches, mut entries) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let mut deferred_from = None;
        for i in 0..count {
            let entry = HEADER + i * ENTRY;
            if u32_at(head, entry + 20) & 1 == 1 {
                deferred_from.get_or_insert(i);
            }
            let (first_page, pages, zero, crc) =
                (u64_at(head, entry), u32_at(head, entry + 8), u32_at(head, entry + 12), u32_at(head, entry + 16));
            let kind = if zero == 1 { BatchKind::Zero } else { BatchKind::Copy };
            batches.push(Batch { first_page, pages: u64::from(pages), kind, priority: i as f64 });
            if kind == BatchKind::Copy {
                entries.push(Some((at as u64, crc)));
                at += pages as usize * PAGE;
            } else {
                entries.push(None);
            }
        }
        if len < at {
            return Err(truncated(at));
        }
        let cache = batches.iter().map(|_| OnceLock::new()).collect();
        let deferred_from = deferred_from.unwrap_or(batches.len());
        let plan = Plan { batches, deferred_from, synchronous: false };
        Ok(LoadingSet { plan, entries, source, cache, dropped: AtomicUsize::new(0) })
    }

    /// The plan, in the order the file holds it; batch `i` has priority `i`.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The checked bytes of batch `index`, read on first use: None for zero batches and for
    /// batches whose bytes failed their check (or could not be read).
    pub fn data(&self, index: usize) -> Option<&[u8]> {
        let (offset, crc) = (*self.entries.get(index)?)?;
        let len = byte_len(self.plan.batches[index].pages);
        let cached = self.cache[index].get_or_init(|| {
            let bytes = match &self.source {
                Source::Bytes(all) => {
                    let start = usize::try_from(offset).ok()?;
                    all.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
                }
                Source::File(file) => {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
                }
            };
            let good = bytes.filter(|b| crc32fast::hash(b) == crc).map(Vec::into_boxed_slice);
            if good.is_none() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            good
        });
        cached.as_deref()
    }

    /// Batches read so far whose bytes failed their check: left to the snapshot.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32_at(bytes, at)) | u64::from(u32_at(bytes, at + 4)) << 32
}

/// Bytes of `pages` pages (saturating: a length that large is refused as truncated).
fn byte_len(pages: u64) -> usize {
    usize::try_from(pages).unwrap_or(usize::MAX).saturating_mul(PAGE)
}

fn data_offset(batches: usize) -> usize {
    (HEADER + batches * ENTRY).next_multiple_of(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Vec<u8> {
        (0..64 * PAGE).map(|i| u8::try_from((i / PAGE * 7 + i % 251) % 256).expect("a byte")).collect()
    }

    fn plan() -> Plan {
        let batches = vec![
            Batch { first_page: 10, pages: 3, kind: BatchKind::Copy, priority: 0.0 },
            Batch { first_page: 40, pages: 2, kind: BatchKind::Zero, priority: 1.0 },
            Batch { first_page: 2, pages: 1, kind: BatchKind::Copy, priority: 2.0 },
        ];
        Plan::background(batches, Some(2.0))
    }

    fn written(mem: &[u8]) -> (tempfile::TempDir, PathBuf, SnapshotIdentity) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ls");
        let identity = SnapshotIdentity::of(mem);
        let read = |offset: u64, buf: &mut [u8]| {
            let start = usize::try_from(offset).expect("in memory");
            buf.copy_from_slice(&mem[start..start + buf.len()]);
            Ok(())
        };
        LoadingSet::write(&path, identity, 77, &plan(), read).expect("write");
        (dir, path, identity)
    }

    #[test]
    fn round_trips_in_plan_order_with_each_batch_s_bytes() {
        let mem = snapshot();
        let (_dir, path, identity) = written(&mem);
        let ls = LoadingSet::load(&path, identity, 77).expect("load");
        assert_eq!(ls.plan().batches.iter().map(|b| b.first_page).collect::<Vec<_>>(), vec![10, 40, 2]);
        assert_eq!(ls.data(0), Some(&mem[10 * PAGE..13 * PAGE]));
        assert_eq!(ls.data(1), None, "zero batches carry no bytes");
        assert_eq!(ls.data(2), Some(&mem[2 * PAGE..3 * PAGE]));
        assert_eq!(ls.dropped(), 0);
        assert_eq!(ls.plan().deferred_from, 2, "the last batch (priority 2) is deferred");
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
        assert_eq!(ls.dropped(), 0, "checked when read");
        assert_eq!((ls.data(2), ls.data(0).is_some(), ls.dropped()), (None, true, 1));
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
