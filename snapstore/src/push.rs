//! Moving snapshots between a store directory and a bucket.
//!
//! `push` uploads the chunks the bucket lacks (content addresses make it idempotent and shared
//! across snapshots and hosts), then the snapshot's working set, then its manifest — last, so a
//! reader that finds a manifest finds every chunk it names. An interrupted push leaves at most
//! unreferenced chunks, which the next push reuses. `pull` fills a host's disk cache ahead of
//! the VMs: a snapshot's working set or all of it.

use crate::bucket::{retry, Bucket, BucketError, Lane, RetryPolicy};
use crate::remote::{RemoteError, RemoteStore};
use crate::store::{chunk_relative, manifest_relative, Store, StoreError};
use crate::ChunkId;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The key of snapshot `name`'s working-set pack under a bucket's prefix.
pub fn pack_relative(name: &str) -> Result<String, StoreError> {
    crate::store::check_name(name)?;
    Ok(format!("packs/{name}"))
}

/// The key of snapshot `name`'s working set under a bucket's prefix.
pub fn working_set_relative(name: &str) -> Result<String, StoreError> {
    crate::store::check_name(name)?;
    Ok(format!("working-sets/{name}"))
}

/// Why a push or pull failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum PushError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Bucket(#[from] BucketError),
    #[error("{0}")]
    Remote(#[from] RemoteError),
    #[error("working set {path}: {reason}")]
    WorkingSet { path: std::path::PathBuf, reason: String },
}

/// What a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Distinct chunks the manifest names.
    pub chunks: usize,
    /// Chunks uploaded (the others were in the bucket already).
    pub uploaded: usize,
    /// Bytes uploaded, chunk files and manifest.
    pub bytes: u64,
}

/// Runs `work` over `items` on `threads` threads; the first error stops the rest.
fn parallel<T: Sync, E: Send>(items: &[T], threads: usize, work: impl Fn(&T) -> Result<(), E> + Sync) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = work(item) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        next.store(items.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    failed.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
}

/// What to publish with a snapshot.
pub struct PushOptions<'a> {
    /// Its working-set file: published as it is, and as a pack of its chunks.
    pub working_set: Option<&'a std::path::Path>,
    /// How the pack's chunks are compressed: fast to decompress (LZ4) is what a restore waits
    /// for; the pack is a copy, the chunks themselves stay as the store has them.
    pub pack_codec: crate::Codec,
    /// The pack's tail: chunks next to working-set chunks that the set does not name (a VM
    /// given another input touches them), up to this percentage of the working set's bytes.
    pub pack_tail_percent: u64,
    /// Requests at once.
    pub threads: usize,
}

/// Uploads snapshot `name` of `store` to `bucket`, with the working set `options` name, if
/// any; the manifest goes last.
pub fn push(
    store: &Store,
    name: &str,
    bucket: &Bucket,
    options: &PushOptions<'_>,
    policy: &RetryPolicy,
) -> Result<PushReport, PushError> {
    let (working_set, threads) = (options.working_set, options.threads);
    let manifest_key = manifest_relative(name)?;
    let manifest_path = store.manifest_path(name)?;
    let manifest_file =
        std::fs::read(&manifest_path).map_err(|source| StoreError::Io { path: manifest_path.clone(), source })?;
    let manifest = store.read_manifest(name)?;
    let ids: Vec<ChunkId> = manifest.chunks.iter().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let (uploaded, bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
    parallel(&ids, threads, |id| -> Result<(), PushError> {
        let key = chunk_relative(id);
        if retry(policy, BucketError::is_transient, || bucket.exists(&key))? {
            return Ok(());
        }
        // Checked before it leaves: a chunk damaged on this disk is never published.
        let file = store.read_chunk_file(id)?;
        crate::chunk::decode(&file, id).map_err(|source| StoreError::Chunk { path: store.chunk_path(id), source })?;
        retry(policy, BucketError::is_transient, || bucket.put(&key, &file))?;
        uploaded.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(file.len() as u64, Ordering::Relaxed);
        Ok(())
    })?;
    if let Some(path) = working_set {
        let bad = |reason: String| PushError::WorkingSet { path: path.to_path_buf(), reason };
        let set_bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        // Only a set of this very snapshot: a reader would refuse any other.
        let set = prefetch::format::decode(&set_bytes, &manifest.identity).map_err(|e| bad(e.to_string()))?;
        let pack = working_set_pack(store, &manifest, &set, options)?;
        let pack_key = pack_relative(name)?;
        retry(policy, BucketError::is_transient, || bucket.put(&pack_key, &pack))?;
        let key = working_set_relative(name)?;
        retry(policy, BucketError::is_transient, || bucket.put(&key, &set_bytes))?;
    }
    retry(policy, BucketError::is_transient, || bucket.put(&manifest_key, &manifest_file))?;
    Ok(PushReport {
        chunks: ids.len(),
        uploaded: uploaded.into_inner(),
        bytes: bytes.into_inner() + manifest_file.len() as u64,
    })
}

/// The pack of the chunks holding `set`'s pages, in the order the set is prefetched (each
/// chunk once, where its first page comes), then its tail: data chunks next to those, the
/// neighbours of the earliest first, up to `options.pack_tail_percent` of the set's bytes.
fn working_set_pack(
    store: &Store,
    manifest: &crate::manifest::Manifest,
    set: &prefetch::working_set::WorkingSet,
    options: &PushOptions<'_>,
) -> Result<Vec<u8>, PushError> {
    let chunk_pages = u64::from(manifest.chunk_size) / crate::PAGE;
    let data = |index: usize| manifest.chunks.get(index).copied().flatten();
    let mut order: Vec<usize> = Vec::new();
    let mut in_set = BTreeSet::new();
    for (page, _) in set.select(0.0) {
        let Some(index) = usize::try_from(page / chunk_pages).ok().filter(|&i| data(i).is_some()) else { continue };
        if in_set.insert(index) {
            order.push(index);
        }
    }
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    let mut set_bytes = 0;
    for &index in &order {
        let Some(id) = data(index).filter(|id| seen.insert(*id)) else { continue };
        let file = crate::chunk::encode(&store.read_chunk(&id)?, &id, options.pack_codec);
        set_bytes += file.len() as u64;
        files.push((id, file));
    }
    let working = files.len();
    let (mut tail_bytes, tail_limit) = (0, set_bytes * options.pack_tail_percent / 100);
    let neighbours = order.iter().flat_map(|&i| [i + 1, i.wrapping_sub(1)]).filter(|i| !in_set.contains(i));
    for index in neighbours {
        let Some(id) = data(index).filter(|id| !seen.contains(id)) else { continue };
        let file = crate::chunk::encode(&store.read_chunk(&id)?, &id, options.pack_codec);
        if tail_bytes + file.len() as u64 > tail_limit {
            break;
        }
        seen.insert(id);
        tail_bytes += file.len() as u64;
        files.push((id, file));
    }
    Ok(crate::pack::encode(&files, working))
}

/// What to pull.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullScope {
    /// The chunks holding the snapshot's working set (the bucket's).
    WorkingSet,
    /// Every chunk.
    All,
}

/// Fetches snapshot `name`'s chunks (`scope`) into `remote`'s disk cache, `threads` at once;
/// the number of chunks now cached for it.
pub fn pull(remote: &RemoteStore, name: &str, scope: PullScope, threads: usize) -> Result<usize, PushError> {
    let (manifest, _) = remote.manifest(name)?;
    let chunk_pages = u64::from(manifest.chunk_size) / crate::PAGE;
    let wanted: BTreeSet<usize> = match scope {
        PullScope::All => (0..manifest.chunks.len()).collect(),
        PullScope::WorkingSet => {
            let key = working_set_relative(name)?;
            let bytes = remote.object(&key)?.ok_or_else(|| RemoteError::Missing {
                address: remote.bucket().address().to_string(),
                key: key.clone(),
            })?;
            let set = prefetch::format::decode(&bytes, &manifest.identity)
                .map_err(|e| PushError::WorkingSet { path: key.into(), reason: e.to_string() })?;
            set.select(0.0).iter().filter_map(|(page, _)| usize::try_from(page / chunk_pages).ok()).collect()
        }
    };
    let ids: Vec<ChunkId> = wanted
        .iter()
        .filter_map(|&i| manifest.chunks.get(i).copied().flatten())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    parallel(&ids, threads, |id| remote.chunk(id, Lane::Background).map(drop))?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{import, ImportOptions};
    use crate::Codec;
    use prefetch::record::{Run, Touch};

    #[test]
    fn a_pack_holds_the_working_set_in_order_then_its_neighbours_within_the_tail_budget() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Eight 64 KiB chunks, each a different byte; chunk 7 all zeros (never stored).
        let bytes: Vec<u8> = (0u8..8).flat_map(|c| vec![if c == 7 { 0 } else { c + 1 }; 65536]).collect();
        let file = dir.path().join("mem");
        std::fs::write(&file, &bytes).expect("write");
        let store = Store::create(&dir.path().join("store")).expect("store");
        import(&store, "s", &file, &ImportOptions { chunk_size: 65536, codec: Codec::Zstd, regions: Vec::new() })
            .expect("import");
        let manifest = store.read_manifest("s").expect("manifest");
        // The set touches chunk 5, then chunk 2 (pages 80 and 33).
        let mut set = prefetch::working_set::WorkingSet::new(manifest.identity);
        set.merge(&Run { touches: vec![Touch { page: 80, write: false }, Touch { page: 33, write: false }] });
        let chunk = |i: usize| manifest.chunks[i].expect("data chunk");
        let pack_of = |percent: u64| {
            let options =
                PushOptions { working_set: None, pack_codec: Codec::None, pack_tail_percent: percent, threads: 1 };
            let pack = working_set_pack(&store, &manifest, &set, &options).expect("pack");
            let index = crate::pack::decode_index(&pack[..crate::pack::index_len(&pack).expect("len")]).expect("index");
            (index.working, index.entries.iter().map(|e| e.id).collect::<Vec<_>>())
        };
        // Neighbours of the earliest chunk first (6, 4), then of the next (3, 1).
        assert_eq!(pack_of(200), (2, vec![chunk(5), chunk(2), chunk(6), chunk(4), chunk(3), chunk(1)]));
        assert_eq!(pack_of(50), (2, vec![chunk(5), chunk(2), chunk(6)]), "the tail stops at its budget");
        assert_eq!(pack_of(0), (2, vec![chunk(5), chunk(2)]));
    }
}
