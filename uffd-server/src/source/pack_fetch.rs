//! Fetching a snapshot's working-set pack (`snapstore::pack`) into the chunk pool: the chunks
//! its VMs will touch, in the order they touch them, in ~1 MiB ranged GETs run a few at once,
//! each chunk held (and waiters woken) as its range lands.
//!
//! The chunks are promised in the pool before any range is fetched, so VMs and the prefetcher
//! wait for the pack rather than fetching them one by one. A promise is only a promise: a demand
//! fault needing a chunk whose range has not started claims it and fetches it on its own
//! connections; a range that fails after its retries hands its chunks back, and their waiters
//! fetch them one by one.

use super::chunk_pool::{ChunkOrigin, ChunkPool, ChunkUnavailable, FetchGuard, Pending, PoolEntry};
use snapstore::bucket::Lane;
use snapstore::pack::{decode_index, index_len, PackEntry, PackIndex, HEADER_LEN};
use snapstore::remote::RemoteStore;
use snapstore::ChunkId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes per ranged GET: large enough that a GET's fixed cost (~1–2 ms here) is small against
/// its transfer, small enough that the first chunks land early and ranges run in parallel.
const RANGE_BYTES: u64 = 1 << 20;
/// The first range's bytes; each next one twice the last, up to [`RANGE_BYTES`].
const FIRST_RANGE: u64 = 128 << 10;
/// The first GET: the header and index of a pack of up to ~1,800 chunks.
const HEAD_BYTES: u64 = 64 << 10;
/// The largest index read (a pack of ~1.8 M chunks, 120 GiB of working set).
const MAX_INDEX: usize = 64 << 20;

/// One ranged GET of a pack: the chunks in it, with their offsets in the pack.
struct Range {
    start: u64,
    end: u64,
    chunks: Vec<PackEntry>,
}

impl ChunkPool {
    /// Starts fetching snapshot `name`'s working-set pack, if it has one, for the chunks of it
    /// that `needed` names and that are neither in RAM nor in the disk cache. Returns once the
    /// index is read and the chunks are promised; the ranges are fetched by background threads.
    pub fn fetch_pack(self: &Arc<Self>, name: &str, needed: &HashSet<ChunkId>) {
        let ChunkOrigin::Remote(remote) = self.origin() else { return };
        if needed.iter().all(|id| remote.cache().contains(id)) {
            return; // a warm host: no GET at all
        }
        let index = match read_index(remote, name) {
            Ok(Some(index)) => index,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(snapshot = name, "working-set pack not used: {e}");
                return;
            }
        };
        // The working set's ranges first, then the tail's.
        let mut parts: [Vec<PackEntry>; 2] = [Vec::new(), Vec::new()];
        {
            let mut pool = self.lock();
            for (n, entry) in index.entries.into_iter().enumerate() {
                let id = entry.id;
                if needed.contains(&id) && !pool.contains_key(&id) && !remote.cache().contains(&id) {
                    pool.insert(id, PoolEntry::Fetching(Arc::new(Pending::default())));
                    parts[usize::from(n >= index.working)].push(entry);
                }
            }
        }
        let promised = parts[0].len() + parts[1].len();
        let mut ranges = plan_ranges(&parts[0]);
        ranges.extend(plan_ranges(&parts[1]));
        let ranges = Arc::new(ranges);
        let tail = parts[1].len();
        tracing::info!(
            snapshot = name,
            chunks = promised,
            tail,
            ranges = ranges.len(),
            "fetching the working-set pack"
        );
        let next = Arc::new(AtomicUsize::new(0));
        for n in 0..self.fetch_threads().min(ranges.len()) {
            let (pool, ranges, next, name) =
                (Arc::clone(self), Arc::clone(&ranges), Arc::clone(&next), name.to_string());
            let fetcher = move || {
                while let Some(range) = ranges.get(next.fetch_add(1, Ordering::Relaxed)) {
                    pool.fetch_range(&name, range);
                }
            };
            if let Err(e) = std::thread::Builder::new().name(format!("pack-{n}")).spawn(fetcher) {
                tracing::error!("cannot start a pack fetch thread: {e}");
            }
        }
    }

    /// Fetches one range and holds its chunks (those no demand fault has claimed meanwhile).
    fn fetch_range(&self, name: &str, range: &Range) {
        let ChunkOrigin::Remote(remote) = self.origin() else { return };
        // A guard per claimed chunk: if anything below panics, its waiters fetch it themselves.
        let mut claimed: Vec<(PackEntry, FetchGuard<'_>)> = range
            .chunks
            .iter()
            .filter(|entry| self.claim(&entry.id))
            .map(|&entry| (entry, FetchGuard { pool: self, id: entry.id, result: None }))
            .collect();
        if claimed.is_empty() {
            return;
        }
        let fetched = remote.pack_range(name, range.start, range.end, Lane::Background);
        // Each chunk's waiters are woken as soon as it is held (its guard ends with the turn).
        for (PackEntry { id, offset, len }, guard) in claimed.drain(..) {
            let file = fetched.as_ref().ok().and_then(Option::as_ref).and_then(|bytes| {
                let from = usize::try_from(offset - range.start).ok()?;
                bytes.get(from..from + usize::try_from(len).ok()?)
            });
            let held = match file.map(|file| snapstore::chunk::decode(file, &id)) {
                Some(Ok(raw)) => {
                    let raw = snapstore::chunk::shared(raw);
                    remote.keep(&id, raw.clone());
                    Ok(self.hold(raw))
                }
                // Refused or missing: its waiters fetch it on their own (and check it again).
                Some(Err(e)) => Err(ChunkUnavailable::new(format!("pack of {name}: chunk {id}: {e}"), true)),
                None => Err(ChunkUnavailable::new(format!("pack of {name}: range not fetched"), true)),
            };
            if let Err(e) = &held {
                tracing::warn!("{e}");
            }
            guard.finish(held);
        }
    }

    /// Claims the promised fetch of `id`; false if it is held, gone, or someone fetches it.
    fn claim(&self, id: &ChunkId) -> bool {
        matches!(self.lock().get(id), Some(PoolEntry::Fetching(pending)) if pending.claim())
    }
}

/// Snapshot `name`'s pack index: (chunk, offset, length) in pack order; None without a pack.
fn read_index(remote: &RemoteStore, name: &str) -> Result<Option<PackIndex>, String> {
    let Some(mut head) = remote.pack_range(name, 0, HEAD_BYTES, Lane::Background).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let len = index_len(&head).map_err(|e| e.to_string())?;
    if len > MAX_INDEX {
        return Err(format!("an index of {len} bytes is larger than any working set"));
    }
    if head.len() < len {
        let rest =
            remote.pack_range(name, head.len() as u64, len as u64, Lane::Background).map_err(|e| e.to_string())?;
        head.extend(rest.unwrap_or_default());
    }
    let index = decode_index(head.get(..len.max(HEADER_LEN)).unwrap_or(&head)).map_err(|e| e.to_string())?;
    Ok(Some(index))
}

/// Groups chunks (in pack order) into ranges of contiguous pack bytes of ~[`RANGE_BYTES`].
fn plan_ranges(chunks: &[PackEntry]) -> Vec<Range> {
    let mut ranges: Vec<Range> = Vec::new();
    for &entry in chunks {
        let PackEntry { offset, len, .. } = entry;
        // The first ranges small, so that the first chunks land soon; then up to RANGE_BYTES.
        let limit = (FIRST_RANGE << ranges.len().saturating_sub(1).min(8)).min(RANGE_BYTES);
        match ranges.last_mut() {
            Some(range) if range.end == offset && range.end - range.start < limit => {
                range.end = offset + len;
                range.chunks.push(entry);
            }
            _ => ranges.push(Range { start: offset, end: offset + len, chunks: vec![entry] }),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_contiguous_chunks_growing_from_the_first() {
        let entry = |n: u64, offset: u64| PackEntry {
            id: ChunkId([u8::try_from(n % 256).unwrap_or(0); 32]),
            offset,
            len: 64 << 10,
        };
        // 64 contiguous chunks of 64 KiB, a gap, then one more.
        let mut chunks: Vec<PackEntry> = (0..64).map(|n| entry(n, 100 + n * (64 << 10))).collect();
        chunks.push(entry(64, 100 + 65 * (64 << 10)));
        let ranges = plan_ranges(&chunks);
        let sizes: Vec<u64> = ranges.iter().map(|r| r.end - r.start).collect();
        assert_eq!(&sizes[..4], &[128 << 10, 256 << 10, 512 << 10, 1 << 20], "small first, doubling");
        assert!(sizes[..sizes.len() - 1].iter().all(|&s| s <= RANGE_BYTES));
        assert_eq!(ranges.last().map(|r| r.chunks.len()), Some(1), "a gap starts a new range");
        assert_eq!(ranges.iter().map(|r| r.chunks.len()).sum::<usize>(), 65, "every chunk in one range");
        for range in &ranges {
            let (first, last) = (range.chunks[0], range.chunks[range.chunks.len() - 1]);
            assert_eq!((range.start, range.end), (first.offset, last.offset + last.len));
        }
    }
}
