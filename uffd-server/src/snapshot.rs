//! The page source: a snapshot memory file held in RAM, shared by every VM restored from it.
//!
//! Loading indexes all-zero pages (4 KiB granularity) and gives their memory back, so a snapshot
//! costs RAM only for its non-zero pages, and zero pages are resolved with UFFDIO_ZEROPAGE
//! instead of being copied (FaaSnap: never read all-zero memory). Holes of sparse files are
//! skipped with SEEK_DATA/SEEK_HOLE, so a mostly-empty 3.5 GiB guest loads in milliseconds.

use crate::addr::{FileOffset, BASE_PAGE};
use bitvec::vec::BitVec;
use memmap2::{MmapMut, UncheckedAdvice};
use nix::unistd::{lseek, Whence};
use prefetch::identity::SnapshotIdentity;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Reads are issued in chunks of this size: large enough for full disk bandwidth, small enough
/// that the zero scan of a chunk runs while it is still in cache.
const READ_CHUNK: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot `{name}`: cannot open memory file {path}: {source}")]
    Open { name: String, path: PathBuf, source: io::Error },
    #[error("snapshot `{name}`: memory file {path} is empty")]
    Empty { name: String, path: PathBuf },
    #[error("snapshot `{name}`: memory file {path} is {len} bytes, not a multiple of 4096 (truncated?)")]
    NotPageMultiple { name: String, path: PathBuf, len: u64 },
    #[error("snapshot `{name}`: cannot allocate {len} bytes to hold it: {source}")]
    Allocate { name: String, len: u64, source: io::Error },
    #[error("snapshot `{name}`: reading memory file {path} at offset {offset:#x} failed (truncated while loading?): {source}")]
    Read { name: String, path: PathBuf, offset: u64, source: io::Error },
    #[error("no snapshot named `{0}`")]
    Unknown(String),
}

/// A snapshot memory file, loaded. Immutable after `load`.
/// Where a snapshot's bytes are served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// Read into RAM once at load (zero pages indexed and given back): faults never touch disk.
    Memory,
    /// Read from the file on each fault (the page cache decides what stays in RAM); only holes
    /// are known to be zero. The setting of FaaSnap/REAP, where a loading-set file helps.
    Disk,
}

enum Source {
    Memory(MmapMut),
    Disk(File),
}

pub struct Snapshot {
    name: String,
    path: PathBuf,
    len: u64,
    source: Source,
    /// One bit per 4 KiB page: set when the page is all zeros.
    zero_pages: BitVec,
    identity: SnapshotIdentity,
    /// The memory file's modification time when loaded (binds loading-set files to it).
    mtime_ns: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("name", &self.name).field("len", &self.len).finish()
    }
}

impl Snapshot {
    pub fn load(name: &str, path: &Path, storage: Storage) -> Result<Snapshot, SnapshotError> {
        let open_err = |source| SnapshotError::Open { name: name.into(), path: path.into(), source };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let len = meta.len();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        if len == 0 {
            return Err(SnapshotError::Empty { name: name.into(), path: path.into() });
        }
        if len % BASE_PAGE != 0 {
            return Err(SnapshotError::NotPageMultiple { name: name.into(), path: path.into(), len });
        }
        let read_err = |offset, source| SnapshotError::Read { name: name.into(), path: path.into(), offset, source };
        let size = usize::try_from(len).map_err(|_| SnapshotError::Allocate {
            name: name.into(),
            len,
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        let pages = size / BASE_PAGE as usize;
        if storage == Storage::Disk {
            // Only holes are known to be zero without reading the file.
            let mut zero_pages = BitVec::repeat(true, pages);
            for (start, end) in data_extents(&file, len) {
                zero_pages[(start / BASE_PAGE) as usize..(end / BASE_PAGE) as usize].fill(false);
            }
            let identity = SnapshotIdentity::compute(len, |offset, buf| file.read_exact_at(buf, offset))
                .map_err(|source| read_err(0, source))?;
            let source = Source::Disk(file);
            return Ok(Snapshot { name: name.into(), path: path.into(), len, source, zero_pages, identity, mtime_ns });
        }
        let mut memory =
            MmapMut::map_anon(size).map_err(|source| SnapshotError::Allocate { name: name.into(), len, source })?;
        // Every page starts as zero: holes are never read, data pages are cleared as scanned.
        let mut zero_pages = BitVec::repeat(true, pages);
        for (start, end) in data_extents(&file, len) {
            let mut offset = start;
            while offset < end {
                let chunk_end = (offset + READ_CHUNK).min(end);
                let dst = &mut memory[offset as usize..chunk_end as usize];
                file.read_exact_at(dst, offset).map_err(|source| read_err(offset, source))?;
                for (i, page) in dst.chunks(BASE_PAGE as usize).enumerate() {
                    if !is_zero(page) {
                        zero_pages.set(offset as usize / BASE_PAGE as usize + i, false);
                    }
                }
                offset = chunk_end;
            }
        }
        release_zero_runs(&memory, &zero_pages);
        let identity = SnapshotIdentity::of(&memory);
        let source = Source::Memory(memory);
        Ok(Snapshot { name: name.into(), path: path.into(), len, source, zero_pages, identity, mtime_ns })
    }

    /// Size and fingerprint, naming the snapshot in working-set files.
    pub fn identity(&self) -> SnapshotIdentity {
        self.identity
    }

    /// The memory file's modification time (ns since the epoch) when it was loaded.
    pub fn mtime_ns(&self) -> u64 {
        self.mtime_ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the memory file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of RAM the snapshot holds (its non-zero pages; none when served from disk).
    pub fn resident_bytes(&self) -> u64 {
        match self.source {
            Source::Memory(_) => (self.zero_pages.len() - self.zero_pages.count_ones()) as u64 * BASE_PAGE,
            Source::Disk(_) => 0,
        }
    }

    pub fn zero_page_count(&self) -> usize {
        self.zero_pages.count_ones()
    }

    /// Calls `f` with the file's bytes in `[offset, offset + len)`: a slice of RAM, or for a
    /// snapshot on disk a read into this thread's scratch buffer.
    pub fn with_bytes<R>(&self, offset: FileOffset, len: u64, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        let end = offset.0.checked_add(len).filter(|&end| end <= self.len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("range {offset}+{len:#x} leaves the snapshot"))
        })?;
        match &self.source {
            Source::Memory(memory) => Ok(f(&memory[offset.0 as usize..end as usize])),
            Source::Disk(file) => {
                thread_local! {
                    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                SCRATCH.with_borrow_mut(|buf| {
                    buf.resize(len as usize, 0);
                    file.read_exact_at(buf, offset.0)?;
                    Ok(f(buf))
                })
            }
        }
    }

    /// True when every 4 KiB page overlapping `[offset, offset + len)` is all zeros.
    pub fn is_zero(&self, offset: FileOffset, len: u64) -> bool {
        let first = (offset.0 / BASE_PAGE) as usize;
        let last = offset.0.saturating_add(len).div_ceil(BASE_PAGE) as usize;
        self.zero_pages.get(first..last.min(self.zero_pages.len())).is_some_and(|bits| bits.all())
    }

    /// Whether the 4 KiB page at `page_index` is all zeros.
    pub fn is_zero_page(&self, page_index: usize) -> bool {
        self.zero_pages.get(page_index).is_some_and(|bit| *bit)
    }
}

/// `[start, end)` ranges of `file` that may hold data. Falls back to the whole file where the
/// filesystem cannot report holes.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let len = len as i64;
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while pos < len {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(_) => {
                extents.push((pos as u64, len as u64)); // no hole support: read the rest
                break;
            }
        };
        let end = lseek(fd, start, Whence::SeekHole).unwrap_or(len).min(len);
        // Extents are page-aligned on every filesystem we know; round outward to be sure.
        let aligned_start = start as u64 / BASE_PAGE * BASE_PAGE;
        let aligned_end = (end as u64).div_ceil(BASE_PAGE) * BASE_PAGE;
        extents.push((aligned_start, aligned_end.min(len as u64)));
        pos = end;
    }
    extents
}

/// Gives the memory of all-zero pages back to the kernel; it reads back as zeros.
fn release_zero_runs(memory: &MmapMut, zero_pages: &BitVec) {
    let page = BASE_PAGE as usize;
    let mut run_start = None;
    for i in 0..=zero_pages.len() {
        let zero = i < zero_pages.len() && zero_pages[i];
        match (zero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                // SAFETY: the range lies inside our own anonymous mapping and holds only zeros;
                // MADV_DONTNEED on private anonymous memory makes it read back as zeros, so no
                // byte anyone could observe changes. No reference into the range is live.
                let advised = unsafe {
                    memory.unchecked_advise_range(UncheckedAdvice::DontNeed, start * page, (i - start) * page)
                };
                if let Err(e) = advised {
                    tracing::debug!("MADV_DONTNEED of zero pages failed (memory kept): {e}");
                }
                run_start = None;
            }
            _ => {}
        }
    }
}

/// Branch-free OR over small chunks vectorises well; a page is 4096 bytes.
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(256).all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
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
        assert_eq!(snap.resident_bytes(), 2 * 4096);
        assert!(!snap.is_zero_page(0) && snap.is_zero_page(1) && snap.is_zero_page(100));
        assert!(!snap.is_zero(FileOffset(0), 8192), "a range with one data page is not zero");
        assert!(snap.is_zero(FileOffset(4096), 4096 * 257));
        let bytes = |snap: &Snapshot, offset, len| snap.with_bytes(FileOffset(offset), len, <[u8]>::to_vec);
        assert_eq!(bytes(&snap, 258 * 4096, 4096).expect("in range"), vec![9u8; 4096]);
        assert_eq!(bytes(&snap, 4096, 4096).expect("in range"), vec![0u8; 4096]);
        assert!(bytes(&snap, 258 * 4096, 4097).is_err());

        // On disk: the same bytes, the same identity, no RAM; only the hole is known zero.
        let disk = Snapshot::load("t", &path, Storage::Disk).expect("load");
        assert_eq!(disk.identity(), snap.identity());
        assert_eq!(disk.resident_bytes(), 0);
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
