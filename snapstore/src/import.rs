//! `import`: a memory file into the store. The file is read chunk by chunk (holes are never
//! read), each non-zero chunk hashed and written only if the store lacks it, zero pages recorded
//! as runs; the manifest is written last, after the chunks are durable, so a killed import
//! leaves chunks no manifest names (collected by `gc`) and never half a manifest.

use crate::chunk;
use crate::manifest::{Manifest, Region};
use crate::store::{Store, StoreError};
use crate::{ChunkId, Codec, PAGE};
use prefetch::identity::SnapshotIdentity;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Bytes per chunk (a power of two, 4 KiB..=2 MiB).
    pub chunk_size: u32,
    /// How new chunks are stored.
    pub codec: Codec,
    /// The guest regions of the snapshot, if known.
    pub regions: Vec<Region>,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Chunks in the manifest (zero ones included).
    pub chunks: usize,
    /// Chunks that are all zeros (nothing stored).
    pub zero_chunks: usize,
    /// Chunks the store did not have.
    pub new_chunks: usize,
    /// Bytes written for them (headers included).
    pub bytes_written: u64,
}

/// Imports memory file `memfile` as snapshot `name` (replacing an older one of that name).
pub fn import(store: &Store, name: &str, memfile: &Path, options: &ImportOptions) -> Result<ImportReport, StoreError> {
    crate::store::check_name(name)?;
    let bad = |reason: String| StoreError::BadMemoryFile { path: memfile.to_path_buf(), reason };
    let chunk_size = options.chunk_size;
    if !crate::manifest::CHUNK_SIZES.contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return Err(bad(format!("chunk size {chunk_size} is not a power of two in 4 KiB..=2 MiB")));
    }
    let file = File::open(memfile).map_err(|e| bad(format!("cannot open: {e}")))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    let len = meta.len();
    if !meta.is_file() || len == 0 || len % PAGE != 0 {
        return Err(bad(format!("not a regular file of a positive multiple of 4096 bytes ({len} bytes)")));
    }
    let _lock = store.lock(false)?;
    let extents = crate::extents::data_extents(&file, len);
    let mut pages = ZeroRuns::default();
    let mut chunks = Vec::new();
    let mut report = ImportReport::default();
    let mut buf = vec![0u8; crate::index(u64::from(chunk_size))];
    let mut next_extent = 0; // extents and chunks are both in file order: one walk
    for start in (0..len).step_by(crate::index(u64::from(chunk_size))) {
        let end = (start + u64::from(chunk_size)).min(len);
        let bytes = &mut buf[..crate::index(end - start)];
        while extents.get(next_extent).is_some_and(|&(_, extent_end)| extent_end <= start) {
            next_extent += 1;
        }
        let has_data = extents.get(next_extent).is_some_and(|&(extent_start, _)| extent_start < end);
        if has_data {
            file.read_exact_at(bytes, start).map_err(|e| bad(format!("read at {start:#x}: {e} (truncated?)")))?;
        } else {
            bytes.fill(0);
        }
        for (i, page) in bytes.chunks(crate::index(PAGE)).enumerate() {
            pages.push(start / PAGE + i as u64, crate::is_zero(page));
        }
        report.chunks += 1;
        if !has_data || crate::is_zero(bytes) {
            report.zero_chunks += 1;
            chunks.push(None);
            continue;
        }
        let id = ChunkId::of(bytes);
        if !store.has_chunk(&id) {
            let written = store.put_chunk(&id, &chunk::encode(bytes, &id, options.codec))?;
            report.new_chunks += usize::from(written > 0);
            report.bytes_written += written;
        }
        chunks.push(Some(id));
    }
    let identity = SnapshotIdentity::compute(len, |offset, buf| file.read_exact_at(buf, offset))
        .map_err(|e| bad(format!("reading its identity: {e}")))?;
    let manifest = Manifest { chunk_size, identity, regions: options.regions.clone(), zero_runs: pages.runs, chunks };
    store.write_manifest(name, &manifest)?;
    Ok(report)
}

/// Zero pages as runs, built page by page in order.
#[derive(Default)]
struct ZeroRuns {
    runs: Vec<(u64, u64)>,
}

impl ZeroRuns {
    fn push(&mut self, page: u64, zero: bool) {
        if !zero {
            return;
        }
        match self.runs.last_mut() {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => self.runs.push((page, 1)),
        }
    }
}
