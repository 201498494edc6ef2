//! A snapshot: its memory file's identity and one [`PageSource`] for its bytes, shared by
//! every VM restored from it.
//!
//! `--snapshot-storage memory` (default) reads the file into RAM once ([`RamPages`]);
//! `disk` reads pages from the file on each fault ([`DiskPages`]). Either way all-zero pages are
//! indexed, so they are mapped, never copied.

use super::chunk_pool::{ChunkOrigin, ChunkPool};
use super::chunked::ChunkedPages;
use super::disk::DiskPages;
use super::ram::{LoadError, RamPages};
use super::PageSource;
use crate::addr::{FileOffset, BASE_PAGE};
use prefetch::identity::SnapshotIdentity;
use prefetch::PageIndex;
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What identifies the content of a memory file without reading it: device, inode, size,
/// modification and change times. Writing the file in place moves mtime and ctime, replacing
/// it moves the inode; ctime cannot be set back by anyone but the kernel (`touch -d` sets
/// mtime, and moves ctime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// The file's device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its length.
    pub len: u64,
    /// Last modification (s, ns).
    pub mtime: (i64, i64),
    /// Last change of content or metadata (s, ns).
    pub ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of the file at `path` now.
    pub fn at(path: &Path) -> io::Result<FileStamp> {
        std::fs::metadata(path).map(|meta| FileStamp::of(&meta))
    }

    /// The stamp as one number (what a loading-set file is bound to).
    pub fn digest(&self) -> u64 {
        let (mtime, ctime) = (self.mtime, self.ctime);
        let times = [mtime.0, mtime.1, ctime.0, ctime.1].map(i64::cast_unsigned);
        let words = [[self.dev, self.ino, self.len].as_slice(), &times].concat();
        words.iter().fold(prefetch::FNV_OFFSET, |hash, word| prefetch::fnv1a(hash, &word.to_le_bytes()))
    }
}

/// Where a snapshot's bytes are served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Read into RAM once at load (zero pages indexed and given back): faults never touch disk.
    Memory,
    /// Read from the file on each fault (the page cache decides what stays in RAM); only holes
    /// are known to be zero. The setting of FaaSnap/REAP, where a loading-set file helps.
    Disk,
}

/// Why a snapshot could not be loaded; each names the snapshot and its file.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum SnapshotError {
    #[error("snapshot `{name}`: cannot open memory file {path}: {source}")]
    Open { name: String, path: PathBuf, source: io::Error },
    #[error("snapshot `{name}`: memory file {path} is not a regular file ({kind})")]
    NotRegular { name: String, path: PathBuf, kind: String },
    #[error("snapshot `{name}`: still loading after {waited_ms} ms (a slow or hung disk?)")]
    LoadTimeout { name: String, waited_ms: u128 },
    #[error("snapshot `{name}`: memory file {path} is empty")]
    Empty { name: String, path: PathBuf },
    #[error("snapshot `{name}`: memory file {path} is {len} bytes, not a multiple of 4096 (truncated?)")]
    NotPageMultiple { name: String, path: PathBuf, len: u64 },
    #[error("snapshot `{name}`: memory file {path}: {source}")]
    Load { name: String, path: PathBuf, source: LoadError },
    #[error("snapshot `{name}`: reading memory file {path} failed: {source}")]
    Read { name: String, path: PathBuf, source: io::Error },
    #[error("no snapshot named `{0}`")]
    Unknown(String),
    #[error("snapshot `{name}`: {source}")]
    Store { name: String, source: Box<snapstore::store::StoreError> },
    #[error("snapshot `{name}`: {reason}")]
    Remote { name: String, reason: String },
}

/// A loaded snapshot. Immutable after [`Snapshot::load`].
pub struct Snapshot {
    name: String,
    path: PathBuf,
    len: u64,
    pages: Box<dyn PageSource + Send + Sync>,
    zero_pages: usize,
    identity: SnapshotIdentity,
    /// The memory file as it was when loaded.
    stamp: FileStamp,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("name", &self.name).field("len", &self.len).finish()
    }
}

impl Snapshot {
    /// Opens memory file `path` of snapshot `name` and serves it from `storage`.
    pub fn load(name: &str, path: &Path, storage: Storage) -> Result<Snapshot, SnapshotError> {
        let open_err = |source| SnapshotError::Open { name: name.into(), path: path.into(), source };
        // Non-blocking: opening a FIFO for reading would otherwise wait for a writer for ever.
        let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.file_type().is_file() {
            let kind = format!("{:?}", meta.file_type());
            return Err(SnapshotError::NotRegular { name: name.into(), path: path.into(), kind });
        }
        let stamp = FileStamp::of(&meta);
        let len = meta.len();
        if len == 0 {
            return Err(SnapshotError::Empty { name: name.into(), path: path.into() });
        }
        if len % BASE_PAGE != 0 {
            return Err(SnapshotError::NotPageMultiple { name: name.into(), path: path.into(), len });
        }
        let (pages, zero_pages): (Box<dyn PageSource + Send + Sync>, usize) = match storage {
            Storage::Memory => {
                let pages = RamPages::load(&file, len).map_err(|source| SnapshotError::Load {
                    name: name.into(),
                    path: path.into(),
                    source,
                })?;
                let zero_pages = pages.zero_page_count();
                (Box::new(pages), zero_pages)
            }
            Storage::Disk => {
                let pages = DiskPages::open(file, stamp);
                let zero_pages = pages.zero_page_count();
                (Box::new(pages), zero_pages)
            }
        };
        let mut scratch = Vec::new();
        let identity = SnapshotIdentity::compute(len, |offset, buf| {
            let bytes = pages.read(FileOffset(offset), buf.len() as u64, &mut scratch).map_err(io::Error::other)?;
            buf.copy_from_slice(bytes);
            Ok(())
        })
        .map_err(|source| SnapshotError::Read { name: name.into(), path: path.into(), source })?;
        Ok(Snapshot { name: name.into(), path: path.into(), len, pages, zero_pages, identity, stamp })
    }

    /// Snapshot `name` of the store `pool` reads from: its manifest, and its chunks brought
    /// into the pool (shared with every other snapshot that has them) — from an object store,
    /// its manifest fetched now and its chunks when first needed.
    pub fn load_stored(name: &str, pool: &Arc<ChunkPool>) -> Result<Snapshot, SnapshotError> {
        let store_err = |source| SnapshotError::Store { name: name.into(), source: Box::new(source) };
        let stamp_of = |path: &Path| {
            FileStamp::at(path).map_err(|source| SnapshotError::Open { name: name.into(), path: path.into(), source })
        };
        let (manifest, path, stamp) = match pool.origin() {
            ChunkOrigin::Local(store) => {
                let path = store.manifest_path(name).map_err(store_err)?;
                // The stamp first: a manifest replaced after it is read is seen as changed.
                let stamp = stamp_of(&path)?;
                (store.read_manifest(name).map_err(store_err)?, path, stamp)
            }
            ChunkOrigin::Remote(remote) => {
                let (manifest, path) = remote
                    .manifest(name)
                    .map_err(|e| SnapshotError::Remote { name: name.into(), reason: e.to_string() })?;
                let stamp = stamp_of(&path)?;
                (manifest, path, stamp)
            }
        };
        let pages = ChunkedPages::load(&manifest, pool, name);
        let zero_pages = pages.zero_page_count();
        Ok(Snapshot {
            name: name.into(),
            path,
            len: manifest.file_len(),
            pages: Box::new(pages),
            zero_pages,
            identity: manifest.identity,
            stamp,
        })
    }

    /// Its bytes.
    pub fn pages(&self) -> &(dyn PageSource + Send + Sync) {
        &*self.pages
    }

    /// Size and fingerprint, naming the snapshot in working-set files.
    pub fn identity(&self) -> SnapshotIdentity {
        self.identity
    }

    /// The memory file as it was when loaded.
    pub fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its memory file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the memory file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the memory file is empty (never: loading refuses empty files).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages known to be all zeros.
    pub fn zero_page_count(&self) -> usize {
        self.zero_pages
    }

    /// Whether 4 KiB page `page` is known to be all zeros.
    pub fn is_zero_page(&self, page: PageIndex) -> bool {
        self.pages.is_zero(FileOffset(page * BASE_PAGE), BASE_PAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn loads_sparse_file_and_indexes_zero_pages() {
        let dir = std::env::temp_dir().join(format!("snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("mem");
        let mut file = File::create(&path).expect("create");
        // page 0: data; page 1: explicit zeros; pages 2..=257: hole; page 258: data at the end.
        file.write_all(&[7u8; 4096]).expect("write");
        file.write_all(&[0u8; 4096]).expect("write");
        file.seek(SeekFrom::Start(258 * 4096)).expect("seek");
        file.write_all(&[9u8; 4096]).expect("write");
        drop(file);

        let snap = Snapshot::load("t", &path, Storage::Memory).expect("load");
        assert_eq!(snap.len(), 259 * 4096);
        assert_eq!(snap.zero_page_count(), 257);
        assert_eq!(snap.pages().resident_bytes(), 2 * 4096);
        assert!(!snap.is_zero_page(0) && snap.is_zero_page(1) && snap.is_zero_page(100));
        assert!(!snap.pages().is_zero(FileOffset(0), 8192), "a range with one data page is not zero");
        assert!(snap.pages().is_zero(FileOffset(4096), 4096 * 257));
        let bytes = |snap: &Snapshot, offset, len| {
            snap.pages().read(FileOffset(offset), len, &mut Vec::new()).map(<[u8]>::to_vec)
        };
        assert_eq!(bytes(&snap, 258 * 4096, 4096).expect("in range"), vec![9u8; 4096]);
        assert_eq!(bytes(&snap, 4096, 4096).expect("in range"), vec![0u8; 4096]);
        assert!(bytes(&snap, 258 * 4096, 4097).is_err());

        // On disk: the same bytes, the same identity, no RAM; only the hole is known zero.
        let disk = Snapshot::load("t", &path, Storage::Disk).expect("load");
        assert_eq!(disk.identity(), snap.identity());
        assert_eq!(disk.pages().resident_bytes(), 0);
        assert_eq!(bytes(&disk, 258 * 4096, 4096).expect("in range"), vec![9u8; 4096]);
        assert!(disk.is_zero_page(100) && !disk.is_zero_page(1), "the explicit zero page is data on disk");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn refuses_empty_and_truncated_files() {
        let dir = std::env::temp_dir().join(format!("snapshot-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty");
        File::create(&empty).expect("create");
        assert!(matches!(Snapshot::load("e", &empty, Storage::Memory), Err(SnapshotError::Empty { .. })));
        let odd = dir.join("odd");
        std::fs::write(&odd, [1u8; 5000]).expect("write");
        let err = Snapshot::load("o", &odd, Storage::Disk).unwrap_err();
        assert!(err.to_string().contains("5000 bytes, not a multiple of 4096"), "{err}");
        let missing = Snapshot::load("m", &dir.join("missing"), Storage::Memory).unwrap_err();
        assert!(missing.to_string().contains("cannot open memory file"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
