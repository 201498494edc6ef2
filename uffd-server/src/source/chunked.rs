//! Snapshots served from a content-addressed store (`snapstore`): each distinct chunk is held
//! in RAM once, in a [`ChunkPool`] shared by every snapshot and VM that references it, LZ4-
//! compressed when that saves RAM. Decompressing a 64 KiB chunk costs ~30–50 µs here, more than
//! the fault it serves, so a compressed chunk gets a decompressed copy the first time a VM uses
//! it, within `--store-inflate-bytes`: the working sets — what VMs touch — stay plain, the rest
//! compressed (docs/snapshot-store-format.md, the measurements in docs/results).
//!
//! Every chunk is hashed when it is read from disk; one that does not match its name is never
//! held. A snapshot with such a chunk still loads: its other pages serve, and a fault inside the
//! bad chunk is answered from a good copy if any snapshot has brought one into the pool since,
//! else with an error (the fault loop then poisons the page: the guest gets a memory error for
//! that page, never wrong bytes; docs/design.md).

use super::zero_pages::ZeroPages;
use super::{checked_end, PageSource, SourceError};
use crate::addr::{FileOffset, BASE_PAGE};
use snapstore::chunk::{compress, decompress_into};
use snapstore::manifest::Manifest;
use snapstore::store::{Store, StoreError};
use snapstore::{ChunkId, Codec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// RAM for decompressed copies of compressed chunks: what is in use, and the most there may be.
pub struct InflateBudget {
    used: AtomicU64,
    limit: u64,
}

impl InflateBudget {
    fn reserve(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used + bytes).filter(|&n| n <= self.limit))
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes of decompressed copies held.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One chunk in RAM: as it is, or LZ4-compressed plus, once it has been served and while the
/// inflate budget allows, a decompressed copy that later faults and prefetches read in place
/// (decompressing here runs at ~2 GB/s, slower than placing the bytes: docs/results).
pub struct HeldChunk {
    len: usize,
    /// [`Codec::None`] or [`Codec::Lz4`].
    codec: Codec,
    bytes: Box<[u8]>,
    inflated: OnceLock<Box<[u8]>>,
    budget: Arc<InflateBudget>,
}

impl HeldChunk {
    fn new(raw: Vec<u8>, ram_codec: Codec, budget: &Arc<InflateBudget>) -> HeldChunk {
        let len = raw.len();
        // Kept compressed only when it saves at least 1/8: a barely compressible chunk would
        // cost a decompression for little RAM.
        let (codec, bytes) = match compress(&raw, ram_codec) {
            Some(packed) if packed.len() <= len - len / 8 => (ram_codec, packed),
            _ => (Codec::None, raw),
        };
        HeldChunk { len, codec, bytes: bytes.into_boxed_slice(), inflated: OnceLock::new(), budget: Arc::clone(budget) }
    }

    /// Bytes of RAM it holds.
    pub fn resident_bytes(&self) -> u64 {
        (self.bytes.len() + self.inflated.get().map_or(0, |copy| copy.len())) as u64
    }

    /// The chunk's bytes in place: raw, or the decompressed copy, made now if the budget
    /// allows. None when it must be decompressed for each use.
    fn plain(&self) -> Option<&[u8]> {
        if self.codec == Codec::None {
            return Some(&self.bytes);
        }
        if let Some(copy) = self.inflated.get() {
            return Some(copy);
        }
        if !self.budget.reserve(self.len as u64) {
            return None;
        }
        let mut copy = vec![0u8; self.len].into_boxed_slice();
        if decompress_into(self.codec, &self.bytes, &mut copy).is_err() || self.inflated.set(copy).is_err() {
            // Corrupt in RAM (never expected: it was hashed before it was compressed), or
            // another thread inflated it meanwhile.
            self.budget.release(self.len as u64);
        }
        self.inflated.get().map(|copy| &copy[..])
    }

    /// Writes `[from, from + out.len())` of the chunk into `out`, through `whole` (a buffer of
    /// the chunk's length) when it must be decompressed.
    fn copy_out(&self, from: usize, out: &mut [u8], whole: &mut Vec<u8>) -> Result<(), String> {
        if let Some(plain) = self.plain() {
            out.copy_from_slice(&plain[from..from + out.len()]);
            return Ok(());
        }
        whole.resize(self.len, 0);
        decompress_into(self.codec, &self.bytes, whole).map_err(|e| e.to_string())?;
        out.copy_from_slice(&whole[from..from + out.len()]);
        Ok(())
    }
}

impl Drop for HeldChunk {
    fn drop(&mut self) {
        if let Some(copy) = self.inflated.get() {
            self.budget.release(copy.len() as u64);
        }
    }
}

struct PoolEntry {
    chunk: Arc<HeldChunk>,
    last_used: u64,
}

/// Every chunk held in RAM, by id: each once, whichever snapshots reference it.
pub struct ChunkPool {
    store: Store,
    ram_codec: Codec,
    inflate: Arc<InflateBudget>,
    entries: Mutex<HashMap<ChunkId, PoolEntry>>,
    clock: AtomicU64,
    /// Chunks read from disk whose bytes did not match their name.
    pub corrupt_reads: AtomicU64,
}

impl ChunkPool {
    /// An empty pool over `store`, holding chunks compressed with `ram_codec` where it pays,
    /// and decompressed copies of those served, up to `inflate_bytes` in all.
    pub fn new(store: Store, ram_codec: Codec, inflate_bytes: u64) -> ChunkPool {
        ChunkPool {
            store,
            ram_codec,
            inflate: Arc::new(InflateBudget { used: AtomicU64::new(0), limit: inflate_bytes }),
            entries: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            corrupt_reads: AtomicU64::new(0),
        }
    }

    /// The store the chunks come from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ChunkId, PoolEntry>> {
        // Entries are inserted and removed whole: a poisoned map is consistent.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Chunk `id`: the one in RAM, else read from disk (outside the lock) and checked.
    pub fn get(&self, id: &ChunkId) -> Result<Arc<HeldChunk>, StoreError> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.lock().get_mut(id) {
            entry.last_used = now;
            return Ok(Arc::clone(&entry.chunk));
        }
        let raw = self.store.read_chunk(id).inspect_err(|e| {
            if matches!(e, StoreError::Chunk { .. }) {
                self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        let chunk = Arc::new(HeldChunk::new(raw, self.ram_codec, &self.inflate));
        // Another load may have brought it meanwhile: keep one copy.
        let entry = self.lock().entry(*id).or_insert(PoolEntry { chunk, last_used: now }).chunk.clone();
        Ok(entry)
    }

    /// Bytes of RAM the pool holds.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().values().map(|entry| entry.chunk.resident_bytes()).sum()
    }

    /// Bytes of decompressed copies held (part of [`ChunkPool::resident_bytes`]).
    pub fn inflated_bytes(&self) -> u64 {
        self.inflate.used()
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Drops chunks no loaded snapshot references, least recently used first, until the pool
    /// holds at most `budget` bytes (or nothing unreferenced is left).
    pub fn trim(&self, budget: u64) {
        let mut entries = self.lock();
        let mut held: u64 = entries.values().map(|entry| entry.chunk.resident_bytes()).sum();
        if held <= budget {
            return;
        }
        let mut idle: Vec<(u64, ChunkId)> = entries
            .iter()
            .filter(|(_, entry)| Arc::strong_count(&entry.chunk) == 1)
            .map(|(id, entry)| (entry.last_used, *id))
            .collect();
        idle.sort_unstable();
        for (_, id) in idle {
            if held <= budget {
                break;
            }
            if let Some(entry) = entries.remove(&id) {
                held -= entry.chunk.resident_bytes();
            }
        }
    }
}

/// Where one chunk-sized range of a stored snapshot comes from.
enum Slot {
    Zero,
    Held(Arc<HeldChunk>),
    /// Could not be read or did not match its name when the snapshot loaded.
    Bad(ChunkId),
}

/// A stored snapshot's pages: its manifest's chunks, held in the shared pool.
pub struct ChunkedPages {
    chunk_size: u64,
    file_len: u64,
    slots: Vec<Slot>,
    zero: ZeroPages,
    pool: Arc<ChunkPool>,
}

impl ChunkedPages {
    /// Brings every chunk of `manifest` into `pool` (those already there are shared). Chunks
    /// that cannot be read are logged and served as errors, not refused: the rest serves.
    pub fn load(manifest: &Manifest, pool: &Arc<ChunkPool>, snapshot: &str) -> ChunkedPages {
        let mut zero = ZeroPages::all_zero(manifest.file_len());
        let mut data_from = 0;
        for &(first, count) in &manifest.zero_runs {
            (data_from..first).for_each(|page| zero.set_data(index(page)));
            data_from = first + count;
        }
        (data_from..manifest.file_len() / BASE_PAGE).for_each(|page| zero.set_data(index(page)));
        let slots = manifest
            .chunks
            .iter()
            .map(|chunk| match chunk {
                None => Slot::Zero,
                Some(id) => match pool.get(id) {
                    Ok(held) => Slot::Held(held),
                    Err(e) => {
                        tracing::error!(snapshot, chunk = %id, "chunk not served: {e}");
                        Slot::Bad(*id)
                    }
                },
            })
            .collect();
        ChunkedPages {
            chunk_size: u64::from(manifest.chunk_size),
            file_len: manifest.file_len(),
            slots,
            zero,
            pool: Arc::clone(pool),
        }
    }

    /// Pages known to be all zeros.
    pub fn zero_page_count(&self) -> usize {
        self.zero.count()
    }

    /// Chunks that could not be loaded.
    pub fn bad_chunks(&self) -> usize {
        self.slots.iter().filter(|slot| matches!(slot, Slot::Bad(_))).count()
    }

    /// Copies `[from, from + out.len())` of chunk `chunk` into `out`.
    fn copy_chunk(&self, chunk: usize, from: usize, out: &mut [u8], whole: &mut Vec<u8>) -> Result<(), String> {
        match &self.slots[chunk] {
            Slot::Zero => {
                out.fill(0);
                Ok(())
            }
            Slot::Held(held) => held.copy_out(from, out, whole),
            // A good copy may have come into the pool since (another snapshot, a repaired file).
            Slot::Bad(id) => self.pool.get(id).map_err(|e| e.to_string())?.copy_out(from, out, whole),
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
        if let (true, Slot::Held(held)) = (first == last, &self.slots[index(first)]) {
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

    fn warm(&self, offset: FileOffset, len: u64) {
        let Some(end) = offset.0.checked_add(len).filter(|&end| end <= self.file_len && len > 0) else { return };
        for chunk in offset.0 / self.chunk_size..=(end - 1) / self.chunk_size {
            if let Slot::Held(held) = &self.slots[index(chunk)] {
                held.plain();
            }
        }
    }

    fn resident_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.slots
            .iter()
            .filter_map(|slot| match slot {
                Slot::Held(held) if seen.insert(Arc::as_ptr(held)) => Some(held.resident_bytes()),
                _ => None,
            })
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
    use snapstore::import::{import, ImportOptions};

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
        let pool = Arc::new(ChunkPool::new(store.clone(), Codec::Lz4, 0));
        let pages_a = ChunkedPages::load(&store.read_manifest("a").expect("a"), &pool, "a");
        let pages_b = ChunkedPages::load(&store.read_manifest("b").expect("b"), &pool, "b");
        assert_eq!(pool.len(), 4, "chunks 1, 2 shared; 3 and 4 each; zero chunks not held");
        assert_eq!(read_all(&pages_a), a);
        assert_eq!(read_all(&pages_b), b);
        assert!(pages_a.is_zero(FileOffset(3 * 65536), 65536) && !pages_a.is_zero(FileOffset(0), 4096));
        assert!(pool.resident_bytes() < pages_a.resident_bytes() + pages_b.resident_bytes());
        assert_eq!(pool.inflated_bytes(), 0, "no budget: every read decompresses");

        let inflating = Arc::new(ChunkPool::new(store.clone(), Codec::Lz4, 65536));
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
        let pool = Arc::new(ChunkPool::new(store.clone(), Codec::None, 0));
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
        let pool = Arc::new(ChunkPool::new(store.clone(), Codec::Lz4, 0));
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
