//! Snapshots served from a content-addressed store (`snapstore`): each distinct chunk is held
//! in RAM once, in a [`ChunkPool`] shared by every snapshot and VM that references it, LZ4-
//! compressed when that makes it smaller (decompressing a 64 KiB chunk costs less than the
//! fault it serves: docs/snapshot-store-format.md).
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
use std::sync::{Arc, Mutex, MutexGuard};

/// One chunk in RAM.
pub struct HeldChunk {
    len: usize,
    /// [`Codec::None`] or [`Codec::Lz4`].
    codec: Codec,
    bytes: Box<[u8]>,
}

impl HeldChunk {
    fn new(raw: Vec<u8>, ram_codec: Codec) -> HeldChunk {
        let len = raw.len();
        // Kept compressed only when it saves at least 1/8: a barely compressible chunk would
        // cost a decompression per fault for little RAM.
        match compress(&raw, ram_codec) {
            Some(packed) if packed.len() <= len - len / 8 => {
                HeldChunk { len, codec: ram_codec, bytes: packed.into_boxed_slice() }
            }
            _ => HeldChunk { len, codec: Codec::None, bytes: raw.into_boxed_slice() },
        }
    }

    /// Bytes of RAM it holds.
    pub fn resident_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Writes `[from, from + out.len())` of the chunk into `out`, through `whole` (a buffer of
    /// the chunk's length) when the chunk is compressed.
    fn copy_out(&self, from: usize, out: &mut [u8], whole: &mut Vec<u8>) -> Result<(), String> {
        match self.codec {
            Codec::None => out.copy_from_slice(&self.bytes[from..from + out.len()]),
            codec => {
                whole.resize(self.len, 0);
                decompress_into(codec, &self.bytes, whole).map_err(|e| e.to_string())?;
                out.copy_from_slice(&whole[from..from + out.len()]);
            }
        }
        Ok(())
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
    entries: Mutex<HashMap<ChunkId, PoolEntry>>,
    clock: AtomicU64,
    /// Chunks read from disk whose bytes did not match their name.
    pub corrupt_reads: AtomicU64,
}

impl ChunkPool {
    /// An empty pool over `store`, holding chunks compressed with `ram_codec` where it pays.
    pub fn new(store: Store, ram_codec: Codec) -> ChunkPool {
        ChunkPool {
            store,
            ram_codec,
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
        let chunk = Arc::new(HeldChunk::new(raw, self.ram_codec));
        // Another load may have brought it meanwhile: keep one copy.
        let entry = self.lock().entry(*id).or_insert(PoolEntry { chunk, last_used: now }).chunk.clone();
        Ok(entry)
    }

    /// Bytes of RAM the pool holds.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().values().map(|entry| entry.chunk.resident_bytes()).sum()
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
        let (first, last) = (offset.0 / self.chunk_size, end.saturating_sub(1) / self.chunk_size);
        let read_error = |at: u64, len: u64, reason: String| SourceError::Read {
            offset: FileOffset(at),
            len,
            source: std::io::Error::other(reason),
        };
        // Inside one chunk: a raw chunk's bytes are served in place, a compressed one is
        // decompressed straight into the VM's buffer.
        if let (true, Slot::Held(held)) = (first == last, &self.slots[index(first)]) {
            let from = index(offset.0 - first * self.chunk_size);
            if held.codec == Codec::None {
                return Ok(&held.bytes[from..from + index(len)]);
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
