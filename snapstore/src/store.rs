//! A store directory: `manifests/NAME` and `chunks/XX/ID` (XX: the id's first two hex digits),
//! plus `lock`. Writers take the lock shared (imports may run side by side: a chunk has one
//! possible content), `gc` takes it exclusive, so it never collects a chunk an import has
//! written but not yet named in a manifest.
//!
//! Every file is written under a random temp name (created exclusively, in the directory it
//! ends up in) and renamed into place: a reader or a crash sees a whole file or none. Chunks are
//! made durable together (one `syncfs`) before the manifest that names them is written.

use crate::chunk::{self, ChunkError};
use crate::manifest::{Manifest, ManifestError};
use crate::ChunkId;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a store operation failed; each names the file.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("store {root}: no snapshot named `{name}`")]
    UnknownSnapshot { root: PathBuf, name: String },
    #[error("`{0}` is not a valid snapshot name (letters, digits, `.`, `_`, `-`; not starting with `.`)")]
    BadName(String),
    #[error("manifest {path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
    #[error("chunk {path}: {source}")]
    Chunk { path: PathBuf, source: ChunkError },
    #[error("chunk {id} is missing ({path})")]
    MissingChunk { id: ChunkId, path: PathBuf },
    #[error("memory file {path}: {reason}")]
    BadMemoryFile { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A store directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// A held store lock (released on drop).
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

impl Store {
    /// The store at `root`, which must exist and be a store.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let store = Store { root: root.to_path_buf() };
        for dir in [store.manifests_dir(), store.chunks_dir()] {
            if !dir.is_dir() {
                let source = io::Error::new(io::ErrorKind::NotFound, "not a snapshot store (no such directory)");
                return Err(StoreError::Io { path: dir, source });
            }
        }
        prefetch::format::check_private_dir(root).map_err(io_error(root))?;
        Ok(store)
    }

    /// The store at `root`, created (mode 0700 directories) if missing.
    pub fn create(root: &Path) -> Result<Store, StoreError> {
        let store = Store { root: root.to_path_buf() };
        for dir in [root.to_path_buf(), store.manifests_dir(), store.chunks_dir()] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_error(&dir))?;
        }
        Store::open(root)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }

    /// Where chunk `id` is stored.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.root.join(chunk_relative(id))
    }

    /// Where snapshot `name`'s manifest is stored.
    pub fn manifest_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join(manifest_relative(name)?))
    }

    /// Takes the store lock: shared for writers, exclusive for collection.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(&path)
            .map_err(io_error(&path))?;
        let arg = if exclusive { FlockArg::LockExclusive } else { FlockArg::LockShared };
        let lock = Flock::lock(file, arg).map_err(|(_, e)| StoreError::Io { path, source: e.into() })?;
        Ok(StoreLock(lock))
    }

    /// Whether chunk `id` is stored (its content is not checked: `verify` does that).
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        std::fs::symlink_metadata(self.chunk_path(id)).is_ok_and(|m| m.is_file())
    }

    /// Stores `encoded` (a chunk file) as chunk `id` unless it is already there; the number of
    /// bytes written. Not synced: [`Store::write_manifest`] makes all chunks durable first.
    pub fn put_chunk(&self, id: &ChunkId, encoded: &[u8]) -> Result<u64, StoreError> {
        let path = self.chunk_path(id);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error(dir))?;
        let mut tmp =
            tempfile::Builder::new().prefix(".chunk.").suffix(".tmp").tempfile_in(dir).map_err(io_error(dir))?;
        tmp.write_all(encoded).map_err(io_error(&path))?;
        match tmp.persist_noclobber(&path) {
            Ok(_) => Ok(encoded.len() as u64),
            // Written meanwhile by another import: same name, same content.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(0),
            Err(e) => Err(StoreError::Io { path, source: e.error }),
        }
    }

    /// The stored bytes of chunk `id` (header included), not checked.
    pub fn read_chunk_file(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let (mut file, path) = self.open_chunk(id)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|source| StoreError::Io { path, source })?;
        Ok(bytes)
    }

    /// The header of chunk `id` and the length of its file, reading only the header.
    pub fn chunk_header(&self, id: &ChunkId) -> Result<(chunk::Header, u64), StoreError> {
        let (file, path) = self.open_chunk(id)?;
        let io = |source| StoreError::Io { path: path.clone(), source };
        let len = file.metadata().map_err(io)?.len();
        let mut head = Vec::with_capacity(chunk::HEADER_LEN);
        (&file).take(chunk::HEADER_LEN as u64).read_to_end(&mut head).map_err(io)?;
        let header = chunk::header(&head).map_err(|source| StoreError::Chunk { path: path.clone(), source })?;
        Ok((header, len))
    }

    /// The uncompressed bytes of chunk `id`, checked against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let (file, path) = self.open_chunk(id)?;
        chunk::read(file, id).map_err(|source| StoreError::Chunk { path, source })
    }

    /// Chunk `id`'s file, opened, and its path.
    fn open_chunk(&self, id: &ChunkId) -> Result<(File, PathBuf), StoreError> {
        let path = self.chunk_path(id);
        match File::open(&path) {
            Ok(file) => Ok((file, path)),
            Err(source) if source.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingChunk { id: *id, path }),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Makes every chunk written so far durable, then writes `manifest` as snapshot `name`
    /// atomically (replacing an older one).
    pub fn write_manifest(&self, name: &str, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.manifest_path(name)?;
        let root = File::open(&self.root).map_err(io_error(&self.root))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| StoreError::Io { path: self.root.clone(), source: e.into() })?;
        prefetch::format::write_file_atomic(&path, &manifest.encode()).map_err(io_error(&path))
    }

    /// Snapshot `name`'s manifest.
    pub fn read_manifest(&self, name: &str) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(name)?;
        let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StoreError::UnknownSnapshot { root: self.root.clone(), name: name.into() },
            _ => StoreError::Io { path: path.clone(), source },
        })?;
        Manifest::decode(&bytes).map_err(|source| StoreError::Manifest { path, source })
    }

    /// Removes snapshot `name` (its chunks stay until `gc`).
    pub fn remove_manifest(&self, name: &str) -> Result<(), StoreError> {
        let path = self.manifest_path(name)?;
        std::fs::remove_file(&path).map_err(io_error(&path))
    }

    /// The snapshots in the store, in name order (temp files and bad names are skipped).
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.manifests_dir();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            if let Some(name) = entry.file_name().to_str().filter(|n| check_name(n).is_ok()) {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every stored chunk file, and every leftover temp file, under `chunks/`.
    pub fn chunk_files(&self) -> Result<(Vec<ChunkId>, Vec<PathBuf>), StoreError> {
        let (mut ids, mut temps) = (Vec::new(), Vec::new());
        let dir = self.chunks_dir();
        for fan in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let fan = fan.map_err(io_error(&dir))?.path();
            if !fan.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&fan).map_err(io_error(&fan))? {
                let path = entry.map_err(io_error(&fan))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                match ChunkId::from_hex(name) {
                    Some(id) => ids.push(id),
                    None if name.starts_with(".chunk.") => temps.push(path),
                    None => {}
                }
            }
        }
        ids.sort();
        Ok((ids, temps))
    }
}

/// Chunk `id`'s path relative to a store's root (its key under a bucket's prefix too).
pub fn chunk_relative(id: &ChunkId) -> String {
    let hex = id.hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

/// Snapshot `name`'s manifest path relative to a store's root (its key under a bucket's prefix).
pub fn manifest_relative(name: &str) -> Result<String, StoreError> {
    check_name(name)?;
    Ok(format!("manifests/{name}"))
}

/// Snapshot names become file names: nothing that could leave the directory or hide.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let valid = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(StoreError::BadName(name.into()))
    }
}

fn libc_nofollow() -> i32 {
    nix::libc::O_NOFOLLOW
}
