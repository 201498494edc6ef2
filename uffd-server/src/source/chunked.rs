//! Snapshots served from a content-addressed store (`snapstore`): a manifest's chunks, held in
//! the server's [`ChunkPool`] (each distinct chunk once, shared by every snapshot and VM).
//!
//! A snapshot of a store on this host brings all its chunks into the pool when it loads; one of
//! an object store brings none: each chunk is fetched when a fault or the prefetch of a working
//! set first needs it ([`PageSource::warm`] queues the plan's chunks, in plan order).
//!
//! Every chunk is hashed before it is held; one that does not match its name is never held. A
//! snapshot with such a chunk still loads: its other pages serve, and a fault inside the bad
//! chunk is answered from a good copy if one has come into the pool since (another snapshot, a
//! repaired file, the object store back), else with an error (the fault loop then poisons the
//! page: the guest gets a memory error for that page, never wrong bytes; docs/design.md).

use super::chunk_pool::{ChunkPool, HeldChunk};
use super::zero_pages::ZeroPages;
use super::{checked_end, PageSource, SourceError};
use crate::addr::{FileOffset, BASE_PAGE};
use snapstore::bucket::Lane;
use snapstore::chunk::decompress_into;
use snapstore::manifest::Manifest;
use snapstore::ChunkId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A stored snapshot's pages: its manifest's chunks, held in the shared pool.
pub struct ChunkedPages {
    chunk_size: u64,
    file_len: u64,
    /// Each chunk-sized range's chunk, once the pool has it (a zero range never has one).
    /// 16 bytes a range: with its id beside it, 3.5× that, 2% of the RAM of a server holding
    /// 20 snapshots (experiment 6b).
    held: Box<[OnceLock<Arc<HeldChunk>>]>,
    /// The chunk of each data range that may not be held: from a local store, those that could
    /// not be read at load; from an object store, every one (fetched on first use).
    wanted: HashMap<usize, ChunkId>,
    zero: ZeroPages,
    pool: Arc<ChunkPool>,
    /// The snapshot's name (its pack's name in an object store).
    name: String,
    /// Whether its working-set pack was asked for (the first time a plan is warmed).
    pack_requested: AtomicBool,
}

impl ChunkedPages {
    /// The pages of `manifest`. From a local store, every chunk is brought into `pool` now
    /// (those already there are shared); chunks that cannot be read are logged and served as
    /// errors, not refused: the rest serves. From an object store, none is fetched yet.
    pub fn load(manifest: &Manifest, pool: &Arc<ChunkPool>, snapshot: &str) -> ChunkedPages {
        let mut zero = ZeroPages::all_zero(manifest.file_len());
        let mut data_from = 0;
        for &(first, count) in &manifest.zero_runs {
            (data_from..first).for_each(|page| zero.set_data(index(page)));
            data_from = first + count;
        }
        (data_from..manifest.file_len() / BASE_PAGE).for_each(|page| zero.set_data(index(page)));
        let mut pages = ChunkedPages {
            chunk_size: u64::from(manifest.chunk_size),
            file_len: manifest.file_len(),
            held: manifest.chunks.iter().map(|_| OnceLock::new()).collect(),
            wanted: manifest.chunks.iter().enumerate().filter_map(|(i, chunk)| Some((i, (*chunk)?))).collect(),
            zero,
            pool: Arc::clone(pool),
            name: snapshot.to_string(),
            pack_requested: AtomicBool::new(false),
        };
        if !pool.is_remote() {
            for i in 0..pages.held.len() {
                if let Err(e) = pages.held(i, Lane::Background) {
                    tracing::error!(snapshot, "chunk not served: {e}");
                }
            }
            let held = &pages.held;
            pages.wanted.retain(|&i, _| held[i].get().is_none());
            pages.wanted.shrink_to_fit();
        }
        pages
    }

    /// Pages known to be all zeros.
    pub fn zero_page_count(&self) -> usize {
        self.zero.count()
    }

    /// Chunks not (yet) in the pool: for a local store, those that could not be loaded.
    pub fn bad_chunks(&self) -> usize {
        self.wanted.keys().filter(|&&i| self.held[i].get().is_none()).count()
    }

    /// The chunk of range `i`: held, else from the pool (held from then on); None for a zero
    /// range. A fetch runs on `lane`'s connections.
    fn held(&self, i: usize, lane: Lane) -> Result<Option<&Arc<HeldChunk>>, String> {
        let cell = &self.held[i];
        if let Some(held) = cell.get() {
            return Ok(Some(held));
        }
        let Some(id) = self.wanted.get(&i) else { return Ok(None) };
        let fetched = self.pool.get(id, lane).map_err(|e| format!("chunk {id}: {e}"))?;
        Ok(Some(cell.get_or_init(|| fetched)))
    }

    /// Copies `[from, from + out.len())` of chunk `chunk` into `out`.
    fn copy_chunk(&self, chunk: usize, from: usize, out: &mut [u8], whole: &mut Vec<u8>) -> Result<(), String> {
        match self.held(chunk, Lane::Demand)? {
            None => {
                out.fill(0);
                Ok(())
            }
            Some(held) => held.copy_out(from, out, whole),
        }
    }
}

impl PageSource for ChunkedPages {
    fn file_len(&self) -> u64 {
        self.file_len
    }

    fn is_zero(&self, offset: FileOffset, len: u64) -> bool {
        self.zero.covers(offset, len)
    }

    fn read<'s>(&'s self, offset: FileOffset, len: u64, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], SourceError> {
        let end = checked_end(offset, len, self.file_len)?;
        if len == 0 {
            return Ok(&[]);
        }
        let (first, last) = (offset.0 / self.chunk_size, (end - 1) / self.chunk_size);
        let read_error = |at: u64, len: u64, reason: String| SourceError::Read {
            offset: FileOffset(at),
            len,
            source: std::io::Error::other(reason),
        };
        // Inside one chunk: its plain bytes are served in place; a compressed one without a
        // decompressed copy is decompressed straight into the VM's buffer.
        // (Fetched on the demand lane: the reader is a fault, or the prefetcher placing a
        // chunk the fetch threads have not reached.)
        let single = if first == last { self.held(index(first), Lane::Demand) } else { Ok(None) };
        if let Some(held) = single.map_err(|e| read_error(offset.0, len, e))? {
            let from = index(offset.0 - first * self.chunk_size);
            if let Some(plain) = held.plain() {
                return Ok(&plain[from..from + index(len)]);
            }
            scratch.resize(held.len, 0);
            decompress_into(held.codec, &held.bytes, scratch).map_err(|e| read_error(offset.0, len, e.to_string()))?;
            return Ok(&scratch[from..from + index(len)]);
        }
        scratch.resize(index(len), 0);
        WHOLE_CHUNK.with_borrow_mut(|whole| {
            let mut at = offset.0;
            while at < end {
                let chunk = at / self.chunk_size;
                let piece_end = ((chunk + 1) * self.chunk_size).min(end);
                let from = index(at - chunk * self.chunk_size);
                let out = &mut scratch[index(at - offset.0)..index(piece_end - offset.0)];
                self.copy_chunk(index(chunk), from, out, whole).map_err(|e| read_error(at, piece_end - at, e))?;
                at = piece_end;
            }
            Ok(&scratch[..])
        })
    }

    fn contiguous_len(&self) -> u64 {
        self.chunk_size
    }

    fn warm(&self, offset: FileOffset, len: u64) {
        let Some(end) = offset.0.checked_add(len).filter(|&end| end <= self.file_len && len > 0) else { return };
        if self.pool.is_remote() && !self.pack_requested.swap(true, Ordering::AcqRel) {
            // A plan is being readied: its chunks come fastest as the snapshot's pack.
            self.pool.fetch_pack(&self.name, &self.wanted.values().copied().collect());
        }
        let (mut first, mut last) = (index(offset.0 / self.chunk_size), index((end - 1) / self.chunk_size));
        if !self.pool.is_remote() {
            // The chunks next to a plan's hold most of what a new input touches outside it
            // (experiment 7: 72 of the 77 data chunks a working set lacked): decompressed now
            // too, so that those faults read in place. (A remote snapshot's pack has a tail.)
            (first, last) = (first.saturating_sub(1), (last + 1).min(self.held.len() - 1));
        }
        let mut to_fetch: Vec<ChunkId> = Vec::new();
        for i in first..=last {
            match (self.held[i].get(), self.wanted.get(&i)) {
                (Some(held), _) => {
                    held.plain();
                }
                (None, Some(id)) if to_fetch.last() != Some(id) => to_fetch.push(*id),
                _ => {}
            }
        }
        if !to_fetch.is_empty() && self.pool.is_remote() {
            self.pool.prefetch(to_fetch);
        }
    }

    fn resident_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.held
            .iter()
            .filter_map(|cell| cell.get().filter(|held| seen.insert(Arc::as_ptr(held))))
            .map(|held| held.resident_bytes())
            .sum()
    }
}

thread_local! {
    /// A whole decompressed chunk, when a read takes part of one (per fault thread: per VM).
    static WHOLE_CHUNK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn index(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::chunk_pool::ChunkOrigin;
    use snapstore::import::{import, ImportOptions};
    use snapstore::store::Store;
    use snapstore::Codec;

    /// A store holding `a` and `b`: 4 chunks of 64 KiB each, the first two shared, the last
    /// chunk of each all zeros.
    fn two_snapshots(dir: &std::path::Path) -> (Store, Vec<u8>, Vec<u8>) {
        let chunk = |seed: u8| (0..65536u32).map(|i| u8::try_from(i % 97).unwrap_or(0) ^ seed).collect::<Vec<u8>>();
        let a = [chunk(1), chunk(2), chunk(3), vec![0; 65536]].concat();
        let b = [chunk(1), chunk(2), chunk(4), vec![0; 65536]].concat();
        let store = Store::create(&dir.join("store")).expect("store");
        let options = ImportOptions { chunk_size: 65536, codec: Codec::Zstd, regions: Vec::new() };
        for (name, bytes) in [("a", &a), ("b", &b)] {
            let file = dir.join(name);
            std::fs::write(&file, bytes).expect("write");
            import(&store, name, &file, &options).expect("import");
        }
        (store, a, b)
    }

    fn read_all(pages: &ChunkedPages) -> Vec<u8> {
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        // Reads that straddle chunks, and reads inside one.
        assert!(pages.read(FileOffset(4 * 65536), 0, &mut scratch).is_ok_and(<[u8]>::is_empty));
        for (offset, len) in [(0, 100_000), (100_000, 96_608), (196_608, 65536)] {
            out.extend_from_slice(pages.read(FileOffset(offset), len, &mut scratch).expect("read"));
        }
        out
    }

    #[test]
    fn shared_chunks_are_held_once_and_bytes_come_back_exact() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, a, b) = two_snapshots(dir.path());
        let pool = Arc::new(ChunkPool::new(ChunkOrigin::Local(store.clone()), Codec::Lz4, 0, 1));
        let pages_a = ChunkedPages::load(&store.read_manifest("a").expect("a"), &pool, "a");
        let pages_b = ChunkedPages::load(&store.read_manifest("b").expect("b"), &pool, "b");
        assert_eq!(pool.len(), 4, "chunks 1, 2 shared; 3 and 4 each; zero chunks not held");
        assert_eq!(read_all(&pages_a), a);
        assert_eq!(read_all(&pages_b), b);
        assert!(pages_a.is_zero(FileOffset(3 * 65536), 65536) && !pages_a.is_zero(FileOffset(0), 4096));
        assert!(pool.resident_bytes() < pages_a.resident_bytes() + pages_b.resident_bytes());
        assert_eq!(pool.inflated_bytes(), 0, "no budget: every read decompresses");

        let inflating = Arc::new(ChunkPool::new(ChunkOrigin::Local(store.clone()), Codec::Lz4, 65536, 1));
        let pages = ChunkedPages::load(&store.read_manifest("a").expect("a"), &inflating, "a");
        assert_eq!(read_all(&pages), a);
        assert_eq!(inflating.inflated_bytes(), 65536, "one plain copy, the budget's worth");
        drop(pages);
        inflating.trim(0);
        assert_eq!((inflating.len(), inflating.inflated_bytes()), (0, 0), "dropped chunks give their copies back");
    }

    #[test]
    fn trim_drops_only_unreferenced_chunks_least_recently_used_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _, b) = two_snapshots(dir.path());
        let pool = Arc::new(ChunkPool::new(ChunkOrigin::Local(store.clone()), Codec::None, 0, 1));
        let pages_a = ChunkedPages::load(&store.read_manifest("a").expect("a"), &pool, "a");
        let pages_b = ChunkedPages::load(&store.read_manifest("b").expect("b"), &pool, "b");
        drop(pages_a);
        pool.trim(0);
        assert_eq!(pool.len(), 3, "a's own chunk went; the shared ones b holds stay");
        assert_eq!(read_all(&pages_b), b);
        drop(pages_b);
        pool.trim(65536);
        assert_eq!(pool.len(), 1, "down to the budget, oldest first");
    }

    #[test]
    fn a_corrupt_chunk_fails_its_reads_unless_a_good_copy_is_in_the_pool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, a, b) = two_snapshots(dir.path());
        let pool = Arc::new(ChunkPool::new(ChunkOrigin::Local(store.clone()), Codec::Lz4, 0, 1));
        let pages_a = ChunkedPages::load(&store.read_manifest("a").expect("a"), &pool, "a");
        let shared = store.read_manifest("b").expect("b").chunks[0].expect("data");
        let own = store.read_manifest("b").expect("b").chunks[2].expect("data");
        for id in [shared, own] {
            let path = store.chunk_path(&id);
            let mut bytes = std::fs::read(&path).expect("read");
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&path, bytes).expect("write");
        }
        let pages_b = ChunkedPages::load(&store.read_manifest("b").expect("b"), &pool, "b");
        assert_eq!(pages_b.bad_chunks(), 1, "the shared chunk came from a's good copy");
        let mut scratch = Vec::new();
        assert_eq!(pages_b.read(FileOffset(0), 65536, &mut scratch).expect("good copy"), &b[..65536]);
        assert!(pages_b.read(FileOffset(2 * 65536), 4096, &mut scratch).is_err(), "never the corrupt bytes");
        assert_eq!(pool.corrupt_reads.load(Ordering::Relaxed), 2, "at load, and again at the read");
        assert_eq!(read_all(&pages_a), a);
    }
}
