//! `store stats|gc|verify`: what the store holds, collecting chunks no manifest names, and
//! re-hashing every chunk.

use crate::store::{Store, StoreError};
use crate::{ChunkId, PAGE};
use std::collections::{BTreeMap, BTreeSet};

/// Bytes one snapshot, or the whole store, stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory file bytes (what a raw file holds, holes included).
    pub logical: u64,
    /// Non-zero pages' bytes.
    pub data: u64,
    /// Distinct chunks' bytes, uncompressed.
    pub unique: u64,
    /// Distinct chunks' bytes as stored (compressed, headers included).
    pub stored: u64,
    /// Distinct chunks.
    pub chunks: usize,
}

/// Per snapshot and in all.
#[derive(Debug, Default)]
pub struct Stats {
    /// Each snapshot on its own (its chunks counted once each, shared or not).
    pub snapshots: BTreeMap<String, Usage>,
    /// The store: every distinct chunk any manifest names counted once.
    pub total: Usage,
}

/// What the store holds.
pub fn stats(store: &Store) -> Result<Stats, StoreError> {
    let mut stats = Stats::default();
    let mut sizes: BTreeMap<ChunkId, (u64, u64)> = BTreeMap::new();
    let mut all = BTreeSet::new();
    for name in store.names()? {
        let manifest = store.read_manifest(&name)?;
        let mut usage = Usage {
            logical: manifest.file_len(),
            data: manifest.file_len() - manifest.zero_pages() * PAGE,
            ..Usage::default()
        };
        let distinct: BTreeSet<ChunkId> = manifest.chunks.iter().flatten().copied().collect();
        for id in distinct {
            let (len, stored) = match sizes.get(&id) {
                Some(&sizes) => sizes,
                None => {
                    let (header, stored) = store.chunk_header(&id)?;
                    *sizes.entry(id).or_insert((header.len as u64, stored))
                }
            };
            usage.unique += len;
            usage.stored += stored;
            usage.chunks += 1;
            all.insert(id);
        }
        stats.total.logical += usage.logical;
        stats.total.data += usage.data;
        stats.snapshots.insert(name, usage);
    }
    for id in all {
        let (len, stored) = sizes[&id];
        stats.total.unique += len;
        stats.total.stored += stored;
        stats.total.chunks += 1;
    }
    Ok(stats)
}

/// What `gc` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Chunks no manifest names.
    pub chunks: usize,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Temp files left by killed writers.
    pub temp_files: usize,
}

/// Removes every chunk no manifest names, and leftover temp files, under the exclusive lock (no
/// import runs meanwhile). A manifest that cannot be read stops the collection: its chunks
/// would look unreferenced.
pub fn gc(store: &Store) -> Result<Collected, StoreError> {
    let _lock = store.lock(true)?;
    let mut referenced = BTreeSet::new();
    for name in store.names()? {
        referenced.extend(store.read_manifest(&name)?.chunks.into_iter().flatten());
    }
    let (ids, temps) = store.chunk_files()?;
    let mut collected = Collected::default();
    for id in ids.iter().filter(|id| !referenced.contains(*id)) {
        let path = store.chunk_path(id);
        let bytes = std::fs::symlink_metadata(&path).map_or(0, |m| m.len());
        std::fs::remove_file(&path).map_err(|source| StoreError::Io { path, source })?;
        collected.chunks += 1;
        collected.bytes += bytes;
    }
    for path in temps {
        std::fs::remove_file(&path).map_err(|source| StoreError::Io { path, source })?;
        collected.temp_files += 1;
    }
    Ok(collected)
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Verified {
    /// Manifests read and checked.
    pub manifests: usize,
    /// Chunks re-hashed.
    pub chunks: usize,
    /// Every problem, named.
    pub problems: Vec<String>,
}

/// Reads every manifest and re-hashes every chunk any of them names (each once).
pub fn verify(store: &Store) -> Result<Verified, StoreError> {
    let mut verified = Verified::default();
    let mut named: BTreeMap<ChunkId, Vec<String>> = BTreeMap::new();
    for name in store.names()? {
        match store.read_manifest(&name) {
            Ok(manifest) => {
                verified.manifests += 1;
                for id in manifest.chunks.iter().flatten() {
                    let users = named.entry(*id).or_default();
                    if users.last() != Some(&name) {
                        users.push(name.clone());
                    }
                }
            }
            Err(e) => verified.problems.push(e.to_string()),
        }
    }
    for (id, users) in &named {
        verified.chunks += 1;
        if let Err(e) = store.read_chunk(id) {
            verified.problems.push(format!("{e} (used by {})", users.join(", ")));
        }
    }
    Ok(verified)
}
