//! The working-set file: magic, version, payload length, checksum, then the postcard-encoded
//! working set (which carries the identity of its snapshot).
//!
//! ```text
//! 0   8  magic "UFFDWSET"
//! 8   4  version (u32 LE)
//! 12  8  payload length (u64 LE)
//! 20  8  FNV-1a 64 of the payload (u64 LE)
//! 28  …  postcard(WorkingSet)
//! ```
//!
//! Reading never trusts the file: each way it can be wrong is its own error, and the caller
//! treats every one as a lost hint. Writing is atomic (temp file, fsync, rename, fsync of the
//! directory), and merging a run holds an exclusive lock on `FILE.lock`, so two VMs ending at
//! once both land. Nothing is thrown away: an unreadable file is kept as `FILE.corrupt`, and a
//! file of another snapshot is never overwritten.
//!
//! The server writes these files as root: the temp file has a random name and is created
//! exclusively (never an existing file or a planted symlink), the lock file is never opened
//! through a symlink, and a directory that group or others may write to is refused.

use crate::identity::SnapshotIdentity;
use crate::record::Run;
use crate::working_set::{LearnedTouch, WorkingSet};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"UFFDWSET";
/// 2: pages carry `learned_only`.
pub const VERSION: u32 = 2;
const HEADER: usize = 28;
/// A working set of every page of a 64 GiB guest is ~300 MiB; anything claiming more is corrupt.
const MAX_PAYLOAD: u64 = 1 << 30;

/// Why a working-set file was not used; each is a lost hint, never an error to a VM.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum FormatError {
    #[error("no working-set file at {0}")]
    Missing(PathBuf),
    #[error("cannot read working-set file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("truncated: {len} bytes, the header says {expected}")]
    Truncated { len: u64, expected: u64 },
    #[error("not a working-set file (bad magic)")]
    BadMagic,
    #[error("the header claims a payload of {0} bytes, more than any working set holds")]
    Oversized(u64),
    #[error("version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt")]
    Checksum { stored: u64, computed: u64 },
    #[error("payload does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("it belongs to another snapshot ({file:?}; this snapshot is {snapshot:?})")]
    OtherSnapshot { file: SnapshotIdentity, snapshot: SnapshotIdentity },
}

/// The file's bytes for `set`.
pub fn encode(set: &WorkingSet) -> Result<Vec<u8>, postcard::Error> {
    let payload = postcard::to_stdvec(set)?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crate::fnv1a(crate::FNV_OFFSET, &payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a file's bytes and checks that it belongs to `snapshot`.
pub fn decode(bytes: &[u8], snapshot: &SnapshotIdentity) -> Result<WorkingSet, FormatError> {
    let field = |range: std::ops::Range<usize>| -> Result<&[u8], FormatError> {
        bytes.get(range).ok_or(FormatError::Truncated { len: bytes.len() as u64, expected: HEADER as u64 })
    };
    if field(0..8)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let u32_at = |at: usize| -> Result<u32, FormatError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(field(at..at + 4)?);
        Ok(u32::from_le_bytes(b))
    };
    let u64_at = |at: usize| -> Result<u64, FormatError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(field(at..at + 8)?);
        Ok(u64::from_le_bytes(b))
    };
    let version = u32_at(8)?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let (len, stored) = (u64_at(12)?, u64_at(20)?);
    if len > MAX_PAYLOAD {
        return Err(FormatError::Oversized(len));
    }
    let expected = HEADER as u64 + len;
    if bytes.len() as u64 != expected {
        return Err(FormatError::Truncated { len: bytes.len() as u64, expected });
    }
    let payload = &bytes[HEADER..];
    let computed = crate::fnv1a(crate::FNV_OFFSET, payload);
    if computed != stored {
        return Err(FormatError::Checksum { stored, computed });
    }
    let set: WorkingSet = postcard::from_bytes(payload)?;
    if set.identity != *snapshot {
        return Err(FormatError::OtherSnapshot { file: set.identity, snapshot: *snapshot });
    }
    Ok(set)
}

/// Reads and decodes the file at `path`, checking that it belongs to `snapshot`.
pub fn load(path: &Path, snapshot: &SnapshotIdentity) -> Result<WorkingSet, FormatError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => FormatError::Missing(path.to_path_buf()),
        _ => FormatError::Io { path: path.to_path_buf(), source },
    })?;
    decode(&bytes, snapshot)
}

/// Writes `set` to `path` atomically: readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, set: &WorkingSet) -> io::Result<()> {
    write_file_atomic(path, &encode(set).map_err(io::Error::other)?)
}

/// Writes `bytes` to `path` through a temp file in the same directory (random name, created
/// exclusively, mode 0600), fsync, rename and an fsync of the directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    check_private_dir(dir)?;
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let mut tmp =
        tempfile::Builder::new().prefix(&format!(".{}.", name.to_string_lossy())).suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Refuses a directory that group or others may write to: they could plant files (or
/// symlinks) where this process writes.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    let mode = std::fs::metadata(dir)?.mode();
    if mode & 0o022 != 0 {
        let why = format!(
            "directory {} is writable by group or others (mode {:o}): refusing to write there",
            dir.display(),
            mode & 0o7777
        );
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    }
    Ok(())
}

/// What merging a run into a file found there.
#[derive(Debug)]
pub struct Merged {
    /// Runs in the file now.
    pub runs: u32,
    /// Why the previous content was not used (it was kept as `FILE.corrupt`), if it was not.
    pub replaced: Option<FormatError>,
}

/// Why a merge did not update the file.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum MergeError {
    #[error("working-set file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("working-set file {path} was not updated: {source}")]
    Refused { path: PathBuf, source: FormatError },
}

/// Merges `run` into the working set stored at `path` (creating it), under an exclusive lock.
pub fn merge_run(path: &Path, snapshot: &SnapshotIdentity, run: &Run) -> Result<Merged, MergeError> {
    update(path, snapshot, |set| set.merge(run))
}

/// Adds pages first seen while serving (online refinement) to the working set at `path`.
pub fn learn(path: &Path, snapshot: &SnapshotIdentity, touches: &[LearnedTouch]) -> Result<Merged, MergeError> {
    update(path, snapshot, |set| set.learn(touches))
}

/// Read-modify-write of the working set at `path` under `flock(FILE.lock)`.
fn update(
    path: &Path,
    snapshot: &SnapshotIdentity,
    change: impl FnOnce(&mut WorkingSet),
) -> Result<Merged, MergeError> {
    let io_err = |source| MergeError::Io { path: path.to_path_buf(), source };
    check_private_dir(parent_dir(path)).map_err(io_err)?;
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(sibling(path, "lock"))
        .map_err(io_err)?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| io_err(e.into()))?;
    let (mut set, replaced) = match load(path, snapshot) {
        Ok(set) => (set, None),
        Err(FormatError::Missing(_)) => (WorkingSet::new(*snapshot), None),
        Err(e @ (FormatError::OtherSnapshot { .. } | FormatError::Io { .. })) => {
            return Err(MergeError::Refused { path: path.into(), source: e })
        }
        Err(e) => {
            std::fs::rename(path, sibling(path, "corrupt")).map_err(io_err)?;
            (WorkingSet::new(*snapshot), Some(e))
        }
    };
    change(&mut set);
    write_atomic(path, &set).map_err(io_err)?;
    Ok(Merged { runs: set.runs, replaced })
}

/// `FILE.suffix` next to `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map_or_else(|| "working-set".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{name}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Touch;

    fn identity(fingerprint: u64) -> SnapshotIdentity {
        SnapshotIdentity { len: 1 << 30, fingerprint }
    }

    fn sample() -> WorkingSet {
        let mut set = WorkingSet::new(identity(1));
        set.merge(&Run { touches: (0..100).map(|p| Touch { page: p * 3, write: p % 2 == 0 }).collect() });
        set.merge(&Run { touches: (50..120).map(|p| Touch { page: p * 3, write: false }).collect() });
        set
    }

    #[test]
    fn round_trips() {
        let set = sample();
        assert_eq!(decode(&encode(&set).expect("encode"), &identity(1)).expect("decode"), set);
    }

    #[test]
    fn each_kind_of_damage_is_its_own_error() {
        let good = encode(&sample()).expect("encode");
        let snapshot = identity(1);
        let truncated = &good[..good.len() - 1];
        assert!(matches!(decode(truncated, &snapshot), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode(&good[..10], &snapshot), Err(FormatError::Truncated { .. })));
        for bit in [0usize, 9 * 8, 20 * 8, good.len() * 8 - 1, (HEADER + 5) * 8 + 3] {
            let mut flipped = good.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped, &snapshot).is_err(), "a flip of bit {bit} went unnoticed");
        }
        let mut payload_flip = good.clone();
        payload_flip[HEADER + 5] ^= 0x10;
        assert!(matches!(decode(&payload_flip, &snapshot), Err(FormatError::Checksum { .. })));
        let mut version = good.clone();
        version[8] = 7;
        assert!(matches!(decode(&version, &snapshot), Err(FormatError::UnsupportedVersion(7))));
        assert!(matches!(decode(&good, &identity(2)), Err(FormatError::OtherSnapshot { .. })));
        assert!(matches!(decode(b"not a working set at all....", &snapshot), Err(FormatError::BadMagic)));
    }

    #[test]
    fn concurrent_merges_all_land_and_damaged_files_are_kept_aside() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("fn.ws");
        let snapshot = identity(1);
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let path = &path;
                scope.spawn(move || {
                    let run = Run { touches: vec![Touch { page: t, write: false }] };
                    merge_run(path, &snapshot, &run).expect("merge");
                });
            }
        });
        let set = load(&path, &snapshot).expect("load");
        assert_eq!(set.runs, 8);
        assert_eq!(set.pages.len(), 8, "every run's page is in the union");

        std::fs::write(&path, b"garbage, long enough for a header").expect("damage");
        let merged = merge_run(&path, &snapshot, &Run::default()).expect("merge over damage");
        assert!(matches!(merged.replaced, Some(FormatError::BadMagic)));
        assert_eq!(
            std::fs::read(dir.path().join("fn.ws.corrupt")).expect("kept"),
            b"garbage, long enough for a header"
        );
        let err = merge_run(&path, &identity(9), &Run::default()).unwrap_err();
        assert!(err.to_string().contains("belongs to another snapshot"), "{err}");
        assert_eq!(load(&path, &snapshot).expect("untouched").runs, 1);
    }
}
