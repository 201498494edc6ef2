//! A store in an object store, read through a host's disk cache: chunks from the cache when
//! there and intact, else fetched (with retries), checked against their name, and kept in the
//! cache; manifests fetched fresh when a snapshot loads, the cached copy used when the bucket
//! cannot be reached.

use crate::bucket::{retry, Bucket, BucketError, Lane, RetryPolicy};
use crate::chunk::ChunkError;
use crate::disk_cache::{DiskCache, Found};
use crate::manifest::{Manifest, ManifestError};
use crate::store::{chunk_relative, manifest_relative, StoreError};
use crate::ChunkId;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an object could not be had from the object store.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum RemoteError {
    #[error("{0}")]
    Bucket(#[from] BucketError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{address}/{key} is not in the bucket")]
    Missing { address: String, key: String },
    #[error("{address}/{key}: {source}")]
    BadChunk { address: String, key: String, source: ChunkError },
    #[error("{address}/{key}: {source}")]
    BadManifest { address: String, key: String, source: ManifestError },
}

impl RemoteError {
    /// The endpoint failed transiently (unreachable, slow, overloaded).
    fn is_transient(&self) -> bool {
        matches!(self, RemoteError::Bucket(e) if e.is_transient())
    }

    /// Worth another try: the endpoint failed transiently, or a chunk a manifest names was
    /// missing or arrived damaged (a store being repaired, a torn transfer).
    fn worth_retrying(&self) -> bool {
        match self {
            RemoteError::Bucket(_) => self.is_transient(),
            RemoteError::Missing { .. } | RemoteError::BadChunk { .. } => true,
            _ => false,
        }
    }
}

/// What went over the network, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Chunk GETs that returned a chunk.
    pub chunk_gets: AtomicU64,
    /// Bytes of chunk objects received.
    pub chunk_bytes: AtomicU64,
    /// Chunks read intact from the disk cache's files.
    pub disk_hits: AtomicU64,
    /// Chunks read back from what the disk cache holds for its writer (fetched before, not
    /// written yet): RAM, not disk.
    pub held_back_hits: AtomicU64,
    /// GETs that failed (each retry counts).
    pub failed_gets: AtomicU64,
    /// Ranged GETs of working-set packs.
    pub range_gets: AtomicU64,
}

/// A bucket's store, seen through this host's disk cache.
pub struct RemoteStore {
    bucket: Bucket,
    cache: DiskCache,
    retry: RetryPolicy,
    /// Chunks go to the disk cache behind the caller's back ([`RemoteStore::write_behind`]).
    write_behind: bool,
    /// What was fetched.
    pub counters: FetchCounters,
}

impl RemoteStore {
    /// Reads `bucket` through `cache`, giving up on an object after `retry`'s deadline.
    pub fn new(bucket: Bucket, cache: DiskCache, retry: RetryPolicy) -> RemoteStore {
        RemoteStore { bucket, cache, retry, write_behind: false, counters: FetchCounters::default() }
    }

    /// Writes fetched chunks to the disk cache on a low-priority thread, not on the fetching
    /// one (a server: its fetches wait on VMs' time; `pull` keeps writing them itself).
    pub fn write_behind(mut self) -> RemoteStore {
        self.write_behind = true;
        self
    }

    /// Keeps chunk `id`'s checked `bytes` in the disk cache (now, or behind).
    pub fn keep(&self, id: &ChunkId, bytes: Bytes) {
        if self.write_behind {
            self.cache.put_behind(id, bytes);
        } else if let Err(e) = self.cache.put(id, &bytes) {
            tracing::warn!(chunk = %id, "disk cache: could not keep the chunk: {e}");
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// How long an object is retried.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The disk cache.
    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }

    fn address(&self) -> String {
        self.bucket.address().to_string()
    }

    /// Chunk `id`'s bytes: from the disk cache, else from the bucket (kept in the cache), always
    /// checked against `id`. `lane` says whose connections fetch it.
    pub fn chunk(&self, id: &ChunkId, lane: Lane) -> Result<Bytes, RemoteError> {
        if let Some((bytes, found)) = self.cache.get(id) {
            let counter = match found {
                Found::File => &self.counters.disk_hits,
                Found::HeldBack => &self.counters.held_back_hits,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        let key = chunk_relative(id);
        let bytes = retry(&self.retry, RemoteError::worth_retrying, || {
            let fetched = self.bucket.get(&key, lane).map_err(RemoteError::from).and_then(|file| {
                let file = file.ok_or_else(|| RemoteError::Missing { address: self.address(), key: key.clone() })?;
                self.counters.chunk_bytes.fetch_add(file.len() as u64, Ordering::Relaxed);
                let bytes = crate::chunk::decode(&file, id).map_err(|source| RemoteError::BadChunk {
                    address: self.address(),
                    key: key.clone(),
                    source,
                })?;
                Ok(bytes)
            });
            if let Err(e) = &fetched {
                self.counters.failed_gets.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("chunk fetch failed (will retry until the deadline): {e}");
            }
            fetched
        })?;
        self.counters.chunk_gets.fetch_add(1, Ordering::Relaxed);
        let bytes = crate::chunk::shared(bytes);
        self.keep(id, bytes.clone());
        Ok(bytes)
    }

    /// Snapshot `name`'s manifest, fetched now, and the path of its copy in the disk cache;
    /// when the bucket cannot be reached, the cached copy (with a warning).
    pub fn manifest(&self, name: &str) -> Result<(Manifest, PathBuf), RemoteError> {
        let key = manifest_relative(name)?;
        let cached = self.cache.store().manifest_path(name)?;
        let fetched = self.object(&key).and_then(|bytes| {
            let bytes = bytes.ok_or_else(|| RemoteError::Missing { address: self.address(), key: key.clone() })?;
            let manifest = Manifest::decode(&bytes).map_err(|source| RemoteError::BadManifest {
                address: self.address(),
                key: key.clone(),
                source,
            })?;
            Ok((manifest, bytes))
        });
        match fetched {
            Ok((manifest, bytes)) => {
                // Rewritten only when it changed: its file stamp tells the server a new push.
                if std::fs::read(&cached).ok().as_deref() != Some(&bytes[..]) {
                    prefetch::format::write_file_atomic(&cached, &bytes)
                        .map_err(|source| StoreError::Io { path: cached.clone(), source })?;
                }
                Ok((manifest, cached))
            }
            Err(e @ RemoteError::Bucket(_)) => match self.cache.store().read_manifest(name) {
                Ok(manifest) => {
                    tracing::warn!(snapshot = name, "{e}; serving the manifest cached on this host");
                    Ok((manifest, cached))
                }
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Bytes `[start, end)` of snapshot `name`'s working-set pack, with retries (counted as
    /// chunk bytes received); None if it was pushed without one.
    pub fn pack_range(&self, name: &str, start: u64, end: u64, lane: Lane) -> Result<Option<Vec<u8>>, RemoteError> {
        let key = crate::push::pack_relative(name)?;
        let bytes = retry(&self.retry, RemoteError::is_transient, || {
            self.bucket.get_range(&key, Some((start, end)), lane).map_err(|e| {
                self.counters.failed_gets.fetch_add(1, Ordering::Relaxed);
                RemoteError::from(e)
            })
        })?;
        if let Some(bytes) = &bytes {
            self.counters.range_gets.fetch_add(1, Ordering::Relaxed);
            self.counters.chunk_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(bytes)
    }

    /// The object at `relative` (a working set, a loading set), with retries; None if absent.
    pub fn object(&self, relative: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        retry(&self.retry, RemoteError::is_transient, || Ok(self.bucket.get(relative, Lane::Background)?))
    }

    /// The snapshots whose manifests are in the bucket, in name order.
    pub fn names(&self) -> Result<Vec<String>, RemoteError> {
        let keys = retry(&self.retry, BucketError::is_transient, || self.bucket.list("manifests/"))?;
        let mut names: Vec<String> = keys
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix("manifests/").map(str::to_string))
            .filter(|name| crate::store::check_name(name).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }
}
