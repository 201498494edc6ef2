//! The chunks of stored snapshots in RAM: each distinct chunk once, shared by every snapshot and
//! VM that references it, LZ4-compressed when that saves RAM. Decompressing a 64 KiB chunk costs
//! ~30–50 µs here, more than the fault it serves, so a compressed chunk gets a decompressed copy
//! the first time a VM uses it, within `--store-inflate-bytes`: the working sets — what VMs
//! touch — stay plain, the rest compressed (docs/snapshot-store-format.md, docs/results).
//!
//! Chunks come from a store directory on this host, or from an object store through the host's
//! disk cache ([`ChunkOrigin`]). A chunk being fetched is fetched once: every VM that needs it
//! meanwhile waits for that fetch. Demand faults fetch on their own connections; prefetches go
//! through a bounded set of fetch threads ([`ChunkPool::prefetch`]) and never delay a fault that
//! needs a chunk they have not started on.

use bytes::Bytes;
use snapstore::bucket::Lane;
use snapstore::chunk::{compress, decompress_into, shared};
use snapstore::remote::RemoteStore;
use snapstore::store::{Store, StoreError};
use snapstore::{ChunkId, Codec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

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
    pub(super) len: usize,
    /// [`Codec::None`] or [`Codec::Lz4`].
    pub(super) codec: Codec,
    pub(super) bytes: Bytes,
    inflated: OnceLock<Box<[u8]>>,
    budget: Arc<InflateBudget>,
}

impl HeldChunk {
    fn new(raw: Bytes, ram_codec: Codec, budget: &Arc<InflateBudget>) -> HeldChunk {
        let len = raw.len();
        // Kept compressed only when it saves at least 1/8: a barely compressible chunk would
        // cost a decompression for little RAM.
        let (codec, bytes) = match compress(&raw, ram_codec) {
            Some(packed) if packed.len() <= len - len / 8 => (ram_codec, shared(packed)),
            _ => (Codec::None, raw),
        };
        HeldChunk { len, codec, bytes, inflated: OnceLock::new(), budget: Arc::clone(budget) }
    }

    /// Bytes of RAM it holds.
    pub fn resident_bytes(&self) -> u64 {
        (self.bytes.len() + self.inflated.get().map_or(0, |copy| copy.len())) as u64
    }

    /// The chunk's bytes in place: raw, or the decompressed copy, made now if the budget
    /// allows. None when it must be decompressed for each use.
    pub(super) fn plain(&self) -> Option<&[u8]> {
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
    pub(super) fn copy_out(&self, from: usize, out: &mut [u8], whole: &mut Vec<u8>) -> Result<(), String> {
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

/// Where chunks not in RAM come from.
pub enum ChunkOrigin {
    /// A store directory on this host.
    Local(Store),
    /// An object store, through this host's disk cache.
    Remote(Box<RemoteStore>),
}

/// Why a chunk is not available (shared by every VM that waited for the same fetch).
#[derive(Clone, Debug)]
pub struct ChunkUnavailable {
    reason: Arc<str>,
    /// The fetch that was to bring it gave up on it (a pack range failed): a waiter fetches it
    /// on its own instead.
    retry: bool,
}

impl ChunkUnavailable {
    pub(super) fn new(reason: impl Into<Arc<str>>, retry: bool) -> ChunkUnavailable {
        ChunkUnavailable { reason: reason.into(), retry }
    }
}

impl std::fmt::Display for ChunkUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

pub(super) type Fetched = Result<Arc<HeldChunk>, ChunkUnavailable>;

/// A fetch in progress or promised: its result, once there.
#[derive(Default)]
pub(super) struct Pending {
    result: Mutex<Option<Fetched>>,
    done: Condvar,
    /// Someone is fetching it. A chunk a pack will bring is registered unclaimed: a demand
    /// fault that needs it before its range is under way claims it and fetches it itself.
    claimed: std::sync::atomic::AtomicBool,
}

impl Pending {
    fn claimed() -> Pending {
        Pending { claimed: true.into(), ..Pending::default() }
    }

    /// Takes the fetch on; false if someone has.
    pub(super) fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    fn wait(&self) -> Fetched {
        let mut result = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = &*result {
                return result.clone();
            }
            result = self.done.wait(result).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, fetched: Fetched) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(fetched);
        self.done.notify_all();
    }
}

pub(super) enum PoolEntry {
    Held { chunk: Arc<HeldChunk>, last_used: u64 },
    Fetching(Arc<Pending>),
}

/// Every chunk held in RAM, by id: each once, whichever snapshots reference it.
pub struct ChunkPool {
    origin: ChunkOrigin,
    ram_codec: Codec,
    inflate: Arc<InflateBudget>,
    entries: Mutex<HashMap<ChunkId, PoolEntry>>,
    clock: AtomicU64,
    /// Chunks to fetch from the object store ahead of need, in order; started on first use.
    fetch_queue: OnceLock<crossbeam_channel::Sender<ChunkId>>,
    fetch_threads: usize,
    /// Chunks to read from the disk cache ahead of need, in order: CPU work (each is hashed),
    /// done by a core's worth of threads, where fetches wait on the network and need many.
    disk_queue: OnceLock<crossbeam_channel::Sender<ChunkId>>,
    disk_readers: usize,
    /// Chunks read from disk whose bytes did not match their name.
    pub corrupt_reads: AtomicU64,
}

impl ChunkPool {
    /// An empty pool over `origin`, holding chunks compressed with `ram_codec` where it pays,
    /// and decompressed copies of those served, up to `inflate_bytes` in all; `fetch_threads`
    /// fetch remote chunks ahead of need.
    pub fn new(origin: ChunkOrigin, ram_codec: Codec, inflate_bytes: u64, fetch_threads: usize) -> ChunkPool {
        ChunkPool {
            origin,
            ram_codec,
            inflate: Arc::new(InflateBudget { used: AtomicU64::new(0), limit: inflate_bytes }),
            entries: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            fetch_queue: OnceLock::new(),
            fetch_threads: fetch_threads.max(1),
            disk_queue: OnceLock::new(),
            disk_readers: disk_readers(),
            corrupt_reads: AtomicU64::new(0),
        }
    }

    /// Where chunks come from.
    pub fn origin(&self) -> &ChunkOrigin {
        &self.origin
    }

    /// Threads that fetch remote chunks ahead of need.
    pub(super) fn fetch_threads(&self) -> usize {
        self.fetch_threads
    }

    /// Whether chunks come from an object store (fetched when first needed, not at load).
    pub fn is_remote(&self) -> bool {
        matches!(self.origin, ChunkOrigin::Remote(_))
    }

    /// Where snapshot `name`'s manifest is on this host (for a remote store, the disk cache's
    /// copy, written when the snapshot loads).
    pub fn manifest_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        match &self.origin {
            ChunkOrigin::Local(store) => store.manifest_path(name),
            ChunkOrigin::Remote(remote) => remote.cache().store().manifest_path(name),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<ChunkId, PoolEntry>> {
        // Entries are inserted and removed whole: a poisoned map is consistent.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Chunk `id`: the one in RAM, the one being fetched, else fetched now (outside the lock,
    /// on `lane`'s connections) and checked against its id.
    pub fn get(&self, id: &ChunkId, lane: Lane) -> Fetched {
        loop {
            let now = self.clock.fetch_add(1, Ordering::Relaxed);
            let wait_for = {
                let mut entries = self.lock();
                match entries.get_mut(id) {
                    Some(PoolEntry::Held { chunk, last_used }) => {
                        *last_used = now;
                        return Ok(Arc::clone(chunk));
                    }
                    Some(PoolEntry::Fetching(pending)) if !pending.claim() => Some(Arc::clone(pending)),
                    Some(PoolEntry::Fetching(_)) => None, // promised by a pack, not started: ours
                    None => {
                        entries.insert(*id, PoolEntry::Fetching(Arc::new(Pending::claimed())));
                        None
                    }
                }
            };
            match wait_for.map(|pending| pending.wait()) {
                Some(Err(e)) if e.retry => continue,
                Some(result) => return result,
                None => {}
            }
            // This thread fetches; whatever happens (even a panic), the waiters are answered.
            let mut fetch = FetchGuard { pool: self, id: *id, result: None };
            let fetched = self.fetch(id, lane).map(|raw| self.hold(raw));
            fetch.result = Some(fetched.clone());
            return fetched;
        }
    }

    /// `raw` (checked bytes) as the pool holds them. A remote chunk is held as it is: it was
    /// fetched because a VM or its working set needs it, and compressing it would cost ~100 µs
    /// on the restore's time to save RAM its plain copy would take back at the first use.
    pub(super) fn hold(&self, raw: Bytes) -> Arc<HeldChunk> {
        let codec = if self.is_remote() { Codec::None } else { self.ram_codec };
        Arc::new(HeldChunk::new(raw, codec, &self.inflate))
    }

    fn fetch(&self, id: &ChunkId, lane: Lane) -> Result<Bytes, ChunkUnavailable> {
        let fetched = match &self.origin {
            ChunkOrigin::Local(store) => store.read_chunk(id).map(shared).map_err(|e| {
                if matches!(e, StoreError::Chunk { .. }) {
                    self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                }
                e.to_string()
            }),
            ChunkOrigin::Remote(remote) => remote.chunk(id, lane).map_err(|e| e.to_string()),
        };
        fetched.map_err(|reason| ChunkUnavailable::new(reason, false))
    }

    /// Queues `ids` to be brought into the pool ahead of need, in order: from the disk cache
    /// by the disk readers, else from the object store by the fetch threads (those held or
    /// being fetched are skipped). Returns at once.
    pub fn prefetch(self: &Arc<Self>, ids: impl IntoIterator<Item = ChunkId>) {
        let ChunkOrigin::Remote(remote) = &self.origin else { return };
        for id in ids {
            let queue = if remote.cache().contains(&id) {
                self.queue(&self.disk_queue, self.disk_readers, "disk-read")
            } else {
                self.queue(&self.fetch_queue, self.fetch_threads, "fetch")
            };
            let _ = queue.send(id);
        }
    }

    /// The queue in `slot`, served by `threads` threads named `name-N` (started on first use).
    fn queue<'q>(
        self: &Arc<Self>,
        slot: &'q OnceLock<crossbeam_channel::Sender<ChunkId>>,
        threads: usize,
        name: &str,
    ) -> &'q crossbeam_channel::Sender<ChunkId> {
        slot.get_or_init(|| {
            let (sender, receiver) = crossbeam_channel::unbounded::<ChunkId>();
            for n in 0..threads {
                let (pool, receiver) = (Arc::downgrade(self), receiver.clone());
                let bring = move || {
                    while let Ok(id) = receiver.recv() {
                        let Some(pool) = pool.upgrade() else { return };
                        if !pool.lock().contains_key(&id) {
                            if let Err(e) = pool.get(&id, Lane::Background) {
                                tracing::warn!(chunk = %id, "prefetch: {e}");
                            }
                        }
                    }
                };
                if let Err(e) = std::thread::Builder::new().name(format!("{name}-{n}")).spawn(bring) {
                    tracing::error!("cannot start a {name} thread: {e}");
                }
            }
            sender
        })
    }

    /// Bytes of RAM the pool holds.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().values().map(PoolEntry::resident_bytes).sum()
    }

    /// Bytes of decompressed copies held (part of [`ChunkPool::resident_bytes`]).
    pub fn inflated_bytes(&self) -> u64 {
        self.inflate.used()
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.lock().values().filter(|entry| matches!(entry, PoolEntry::Held { .. })).count()
    }

    /// Whether no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops chunks no loaded snapshot references, least recently used first, until the pool
    /// holds at most `budget` bytes (or nothing unreferenced is left).
    pub fn trim(&self, budget: u64) {
        let mut entries = self.lock();
        let mut held: u64 = entries.values().map(PoolEntry::resident_bytes).sum();
        if held <= budget {
            return;
        }
        let mut idle: Vec<(u64, ChunkId)> = entries
            .iter()
            .filter_map(|(id, entry)| match entry {
                PoolEntry::Held { chunk, last_used } if Arc::strong_count(chunk) == 1 => Some((*last_used, *id)),
                _ => None,
            })
            .collect();
        idle.sort_unstable();
        for (_, id) in idle {
            if held <= budget {
                break;
            }
            if let Some(entry) = entries.remove(&id) {
                held -= entry.resident_bytes();
            }
        }
    }
}

impl PoolEntry {
    fn resident_bytes(&self) -> u64 {
        match self {
            PoolEntry::Held { chunk, .. } => chunk.resident_bytes(),
            PoolEntry::Fetching(_) => 0,
        }
    }
}

/// Threads reading chunks from the disk cache ahead of the VMs: half the cores (at least one),
/// so that the VMs' own threads and vCPUs keep the rest. (One reader restored 8% faster than
/// eight here, 16 restores each: a fault waits less for a chunk a descheduled reader claimed.)
fn disk_readers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

/// Ends a fetch: the chunk held (or the entry dropped when it failed), and its waiters answered.
pub(super) struct FetchGuard<'p> {
    pub(super) pool: &'p ChunkPool,
    pub(super) id: ChunkId,
    pub(super) result: Option<Fetched>,
}

impl FetchGuard<'_> {
    /// Ends the fetch with `result` now.
    pub(super) fn finish(mut self, result: Fetched) {
        self.result = Some(result);
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| Err(ChunkUnavailable::new("the fetch panicked", true)));
        let now = self.pool.clock.fetch_add(1, Ordering::Relaxed);
        let entry = match &result {
            Ok(chunk) => self.pool.lock().insert(self.id, PoolEntry::Held { chunk: Arc::clone(chunk), last_used: now }),
            // Not remembered: a later fault tries again (the store may be back).
            Err(_) => self.pool.lock().remove(&self.id),
        };
        if let Some(PoolEntry::Fetching(pending)) = entry {
            pending.finish(result);
        }
    }
}
