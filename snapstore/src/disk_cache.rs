//! A host's disk cache of chunks fetched from an object store: a store directory (same layout,
//! same chunk files) kept within a byte budget, least recently used chunks removed first.
//!
//! Chunks are kept uncompressed, and a hit maps its file (the page cache's pages, locked)
//! instead of reading it into new memory: a chunk read from disk is held in RAM for every VM
//! that needs it, and holding it in fresh memory cost its first touch, 16 page faults per
//! 64 KiB (~50 µs here, a third of a hit), plus the decompression (docs/results, section 7).
//! Mapped, a warm cache restored as fast as RAM (by hand: median ~30 against ~56 ms when hits
//! were LZ4-decompressed into new buffers). The price is disk: raw files take ~2.3× the bytes
//! of LZ4 ones on runtime memory, so a budget holds fewer chunks. Files of older builds (LZ4,
//! or without the check) are still read and decompressed. Mappings are capped (a quarter of
//! `vm.max_map_count`), and a hit that cannot be mapped or locked (`RLIMIT_MEMLOCK` without
//! `CAP_IPC_LOCK`) is read instead.
//!
//! It survives restarts: at open the files found are indexed, ordered by modification time,
//! and a hit sets the file's time (behind, off the reader's time: setting it can wait for the
//! file system's journal), so the order is kept across runs.
//!
//! Every chunk read from it is checked; one that fails is removed and fetched again. A chunk
//! comes in checked against its id (BLAKE3, from the bucket), and its file carries the
//! XXH3-128 of its content ([`crate::chunk::encode_checked`]): the header must name the chunk
//! and the content match the check. That catches damage on disk at ~4 µs per 64 KiB, where
//! BLAKE3 again took ~40 µs and kept a warm cache from staying ahead of its VMs (experiment 7:
//! 1.19–1.41× the restore from RAM with BLAKE3, 1.06–1.20× with XXH3, 0.99–1.22× with no check
//! at all). A mapped file is locked before it is checked, so the page cache cannot drop what
//! was checked and read it back from disk unchecked. The directory is the server's own (mode
//! 0700): a user who can write there can also change what the server runs. Files without the
//! check (older builds) are checked with BLAKE3.

use crate::store::{Store, StoreError};
use crate::ChunkId;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

struct Index {
    /// Each chunk file: its size, and when it was last used (a counter, larger is later).
    files: HashMap<ChunkId, (u64, u64)>,
    bytes: u64,
    clock: u64,
}

impl Index {
    /// The next use's time.
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Chunk `id`'s file of `len` bytes, used now (counted once in the bytes).
    fn insert(&mut self, id: ChunkId, len: u64) {
        let now = self.tick();
        if let Some((old, _)) = self.files.insert(id, (len, now)) {
            self.bytes -= old;
        }
        self.bytes += len;
    }

    /// Marks chunk `id` used now; whether it is indexed.
    fn mark_used(&mut self, id: &ChunkId) -> bool {
        let now = self.tick();
        self.files.get_mut(id).map(|(_, used)| *used = now).is_some()
    }
}

/// Work done behind the callers' back, at low priority.
enum Behind {
    /// A chunk was added to those held back.
    Held,
    /// A chunk read: its file's time is set, so that the order survives a restart.
    Touch(ChunkId),
    /// Write every chunk held back now, then answer (the server is stopping).
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Chunks given to the writer and not written yet. They are read from here meanwhile, so a
/// chunk held back is never fetched again.
#[derive(Default)]
struct Held {
    /// Oldest first: the order they are written in.
    order: VecDeque<ChunkId>,
    chunks: HashMap<ChunkId, Bytes>,
    bytes: usize,
}

/// When the writer behind writes the chunks it is given.
#[derive(Clone, Copy, Debug)]
struct HoldBack {
    /// Nothing (no chunk, no hit) has come in for this long: the burst that brought them (a
    /// restore) is over.
    quiet: Duration,
    /// Chunk bytes held back at most; past it the oldest are written at once, so that a host
    /// that is never quiet does not hold them all in RAM.
    max_bytes: usize,
}

/// A cold restore's chunks land in ~100 ms (experiment 7); compressing (LZ4, then) and writing them
/// meanwhile, even at nice 19, made it ~1.15× slower on 2 cores (docs/results, section 7).
/// Held-back chunks are mostly the RAM pool's own buffers (shared), not copies.
const HOLD_BACK: HoldBack = HoldBack { quiet: Duration::from_millis(100), max_bytes: 64 << 20 };

/// Where [`DiskCache::get`] found a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// In its file, mapped (or read) and checked.
    File,
    /// Still in RAM, held back for the writer (a fetch made earlier, not on disk yet).
    HeldBack,
}

/// Chunk files on local disk, within a budget.
pub struct DiskCache {
    store: Store,
    budget: u64,
    index: Arc<Mutex<Index>>,
    /// Work done behind, at low priority ([`DiskCache::put_behind`], hits' file times).
    behind: OnceLock<std::sync::mpsc::Sender<Behind>>,
    held: Arc<Mutex<Held>>,
    hold_back: HoldBack,
    /// The files mapped for hits still held, and how many may be.
    maps: Arc<MapSlots>,
}

impl DiskCache {
    /// The cache at `dir` (created if missing, mode 0700), holding at most `budget` bytes of
    /// chunk files; what is already there is kept, the oldest removed if it is over budget.
    pub fn open(dir: &Path, budget: u64) -> Result<DiskCache, StoreError> {
        let store = Store::create(dir)?;
        let (ids, temps) = store.chunk_files()?;
        // Left by a process killed mid-write: never a whole chunk.
        temps.iter().for_each(|temp| drop(std::fs::remove_file(temp)));
        let mut found: Vec<(SystemTime, ChunkId, u64)> = ids
            .into_iter()
            .filter_map(|id| {
                let meta = std::fs::symlink_metadata(store.chunk_path(&id)).ok()?;
                Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), id, meta.len()))
            })
            .collect();
        found.sort_unstable();
        let mut index = Index { files: HashMap::new(), bytes: 0, clock: 0 };
        for (_, id, len) in found {
            index.insert(id, len);
        }
        let cache = DiskCache {
            store,
            budget,
            index: Arc::new(Mutex::new(index)),
            behind: OnceLock::new(),
            held: Arc::default(),
            hold_back: HOLD_BACK,
            maps: Arc::new(MapSlots { live: AtomicUsize::new(0), max: max_map_count() / 4 }),
        };
        evict(&cache.store, budget, &mut cache.lock());
        Ok(cache)
    }

    /// Writes chunks given to [`DiskCache::put_behind`] once nothing has come in for `quiet`
    /// (100 ms if not set).
    pub fn write_after_quiet(mut self, quiet: Duration) -> DiskCache {
        self.hold_back.quiet = quiet;
        self
    }

    /// The directory (also where cached manifests and working sets are kept).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Bytes of chunk files held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.lock().files.len()
    }

    /// Whether no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether chunk `id` is cached: its file (checked when it is read), or held back for the
    /// writer.
    pub fn contains(&self, id: &ChunkId) -> bool {
        // One lock at a time (a guard in the condition would live to the end of it).
        let indexed = self.lock().files.contains_key(id);
        let held = indexed || lock(&self.held).chunks.contains_key(id);
        held || self.adopt(id)
    }

    /// Indexes chunk `id`'s file if another process wrote it since this cache was opened
    /// (`uffd-server pull` pre-warming a host whose server runs, a predecessor's last writes
    /// after a handover); whether there is one. Its content is checked when it is read.
    fn adopt(&self, id: &ChunkId) -> bool {
        // A failed lookup costs ~2 µs; only chunks about to be fetched get here.
        let Ok(meta) = std::fs::symlink_metadata(self.store.chunk_path(id)) else { return false };
        if !meta.is_file() {
            return false;
        }
        let mut index = self.lock();
        index.insert(*id, meta.len());
        evict(&self.store, self.budget, &mut index);
        index.files.contains_key(id)
    }

    /// Chunks held back for the writer, and their bytes.
    pub fn held_back(&self) -> (usize, usize) {
        let held = lock(&self.held);
        (held.order.len(), held.bytes)
    }

    /// The bytes of chunk `id` if it is held back for the writer, or cached in a file that
    /// matches its name (a bad one is removed); and which of the two it was.
    pub fn get(&self, id: &ChunkId) -> Option<(Bytes, Found)> {
        if let Some(bytes) = lock(&self.held).chunks.get(id) {
            return Some((bytes.clone(), Found::HeldBack));
        }
        let known = self.lock().mark_used(id);
        if !known && !self.adopt(id) {
            return None;
        }
        let path = self.store.chunk_path(id);
        let file = match std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(&path) {
            Ok(file) => Ok(file),
            // Removed behind this index's back: by another process sharing the directory (a
            // handover's other side, a `pull`) making room in its own budget. Not damage.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(chunk = %id, "disk cache: chunk file gone; it will be fetched");
                self.forget(id);
                return None;
            }
            Err(e) => Err(e.to_string()),
        };
        let read = |file| self.read(file, id);
        match file.and_then(read) {
            Ok(bytes) => {
                // Setting a file's time can wait for the file system's journal: not on a
                // fault's time.
                let _ = self.send_behind(Behind::Touch(*id));
                Some((bytes, Found::File))
            }
            Err(e) => {
                tracing::warn!(chunk = %id, "disk cache: chunk damaged or unreadable ({e}); removing it");
                let _ = std::fs::remove_file(&path);
                self.forget(id);
                None
            }
        }
    }

    /// Chunk `id`'s bytes from its open file: in place, mapped, when it is stored raw; else read
    /// and decompressed (an older build's file, or no mapping to be had).
    fn read(&self, file: std::fs::File, id: &ChunkId) -> Result<Bytes, String> {
        if let Some(mapped) = self.map(&file, id)? {
            return Ok(Bytes::from_owner(mapped));
        }
        crate::chunk::read_checked(file, id).map(crate::chunk::shared).map_err(|e| e.to_string())
    }

    /// Chunk `id`'s file mapped and locked, its content checked; None if it is not stored raw
    /// or cannot be mapped (the cap reached, or locking refused): then it is read.
    fn map(&self, file: &std::fs::File, id: &ChunkId) -> Result<Option<MappedChunk>, String> {
        let Some(slot) = MapSlot::take(&self.maps) else { return Ok(None) };
        // SAFETY: memmap2 marks mapping unsafe because a file changed in place while mapped
        // changes the bytes under their reader. The cache's files never are: they are written
        // whole under a temporary name and renamed (by this process, by another server or a
        // `pull` sharing the directory), and removed by unlinking, which leaves a mapping
        // intact. The directory is the server's own (see the module doc).
        let map = match unsafe { memmap2::Mmap::map(file) } {
            Ok(map) => map,
            Err(e) => {
                tracing::debug!(chunk = %id, "disk cache: file not mapped ({e}); reading it");
                return Ok(None);
            }
        };
        if crate::chunk::header(&map).map_err(|e| e.to_string())?.codec != crate::Codec::None {
            return Ok(None);
        }
        if let Err(e) = map.lock() {
            tracing::debug!(chunk = %id, "disk cache: file not locked in memory ({e}); reading it");
            return Ok(None);
        }
        let Some(range) = crate::chunk::raw_checked(&map, id).map_err(|e| e.to_string())? else { return Ok(None) };
        Ok(Some(MappedChunk { map, range, _slot: slot }))
    }

    /// Files mapped for hits whose bytes are still held.
    pub fn mapped(&self) -> usize {
        self.maps.live.load(Ordering::Acquire)
    }

    /// Keeps `bytes` (chunk `id`'s bytes, already checked against it) as a raw chunk file,
    /// making room within the budget. A zero budget keeps nothing.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<(), StoreError> {
        put(&self.store, self.budget, &self.index, id, bytes)
    }

    /// As [`DiskCache::put`], later, on a writer thread of the lowest CPU priority, once
    /// nothing has come in for a while (or too many wait): a host restoring VMs spends its cores
    /// on them, and the disk copy is only for next time. Meanwhile the chunk is read from RAM;
    /// [`DiskCache::flush`] writes what is held back (a server stopping), and so does dropping
    /// the cache.
    pub fn put_behind(&self, id: &ChunkId, bytes: Bytes) {
        if self.lock().files.contains_key(id) {
            return;
        }
        {
            let mut held = lock(&self.held);
            if held.chunks.contains_key(id) {
                return;
            }
            held.bytes += bytes.len();
            held.order.push_back(*id);
            held.chunks.insert(*id, bytes);
        }
        if !self.send_behind(Behind::Held) {
            // No writer: nothing would ever write or drop it.
            let mut held = lock(&self.held);
            if let Some(bytes) = held.chunks.remove(id) {
                held.bytes -= bytes.len();
                held.order.retain(|queued| queued != id);
            }
        }
    }

    /// Writes every chunk held back, waiting at most `within` for it; whether all were
    /// written. Chunks given meanwhile are written too.
    pub fn flush(&self, within: Duration) -> bool {
        let Some(sender) = self.behind.get() else { return true };
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        if sender.send(Behind::Flush(done)).is_err() {
            return false; // the writer could not start
        }
        finished.recv_timeout(within).is_ok()
    }

    /// Gives `work` to the writer (started on first use); false if there is none.
    fn send_behind(&self, work: Behind) -> bool {
        let sender = self.behind.get_or_init(|| {
            let (sender, receiver) = std::sync::mpsc::channel::<Behind>();
            let writer = Writer {
                store: self.store.clone(),
                budget: self.budget,
                index: Arc::clone(&self.index),
                hold_back: self.hold_back,
                held: Arc::clone(&self.held),
            };
            let work = move || {
                lower_priority();
                writer.run(&receiver);
            };
            if let Err(e) = std::thread::Builder::new().name("disk-cache".into()).spawn(work) {
                tracing::error!("cannot start the disk cache writer: {e}");
            }
            sender
        });
        sender.send(work).is_ok()
    }

    fn forget(&self, id: &ChunkId) {
        let mut index = self.lock();
        if let Some((len, _)) = index.files.remove(id) {
            index.bytes -= len;
        }
    }
}

/// The thread that does the work behind: file times at once, chunks held back until quiet.
struct Writer {
    store: Store,
    budget: u64,
    index: Arc<Mutex<Index>>,
    hold_back: HoldBack,
    held: Arc<Mutex<Held>>,
}

impl Writer {
    fn run(self, receiver: &Receiver<Behind>) {
        // Writing: quiet was reached; one chunk at a time, back to holding if anything comes.
        let mut writing = false;
        loop {
            let nothing_held = lock(&self.held).order.is_empty();
            let next = match (nothing_held, writing) {
                (true, _) => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
                (false, true) => receiver.recv_timeout(Duration::ZERO),
                (false, false) => receiver.recv_timeout(self.hold_back.quiet),
            };
            match next {
                Ok(Behind::Held) => {
                    writing = false;
                    while lock(&self.held).bytes > self.hold_back.max_bytes {
                        self.write_oldest();
                    }
                }
                Ok(Behind::Touch(id)) => {
                    writing = false;
                    touch(&self.store.chunk_path(&id));
                }
                Ok(Behind::Flush(done)) => {
                    while self.write_oldest() {}
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    writing = true;
                    self.write_oldest();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    while self.write_oldest() {}
                    return;
                }
            }
        }
    }

    /// Writes the oldest chunk held back, if any (whether there was one). It stays readable
    /// from RAM until its file is in the index.
    fn write_oldest(&self) -> bool {
        let oldest = {
            let held = lock(&self.held);
            held.order.front().and_then(|id| Some((*id, held.chunks.get(id)?.clone())))
        };
        let Some((id, bytes)) = oldest else { return false };
        if let Err(e) = put(&self.store, self.budget, &self.index, &id, &bytes) {
            tracing::warn!(chunk = %id, "disk cache: could not keep the chunk: {e}");
        }
        let mut held = lock(&self.held);
        held.order.pop_front();
        if let Some(bytes) = held.chunks.remove(&id) {
            held.bytes -= bytes.len();
        }
        true
    }
}

/// A cache file mapped and locked in memory: its chunk's bytes, served in place.
struct MappedChunk {
    map: memmap2::Mmap,
    range: std::ops::Range<usize>,
    _slot: MapSlot,
}

impl AsRef<[u8]> for MappedChunk {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// How many files a cache may hold mapped, and how many it does.
struct MapSlots {
    live: AtomicUsize,
    max: usize,
}

/// One mapping of [`MapSlots`], given back when dropped.
struct MapSlot(Arc<MapSlots>);

impl MapSlot {
    fn take(slots: &Arc<MapSlots>) -> Option<MapSlot> {
        let taken = slots.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < slots.max).then_some(n + 1));
        taken.ok().map(|_| MapSlot(Arc::clone(slots)))
    }
}

impl Drop for MapSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The mappings a process may have (`vm.max_map_count`; the kernel's default if unreadable).
fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(65_530)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Updated in whole steps: a poisoned index or queue is consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn put(store: &Store, budget: u64, index: &Mutex<Index>, id: &ChunkId, bytes: &[u8]) -> Result<(), StoreError> {
    if lock(index).files.contains_key(id) {
        return Ok(());
    }
    // Kept raw, to be mapped: see the module doc.
    let file = crate::chunk::encode_checked(bytes, id, crate::Codec::None);
    let len = file.len() as u64;
    if len > budget {
        return Ok(());
    }
    store.put_chunk(id, &file)?;
    let mut index = lock(index);
    index.insert(*id, len);
    evict(store, budget, &mut index);
    Ok(())
}

/// Sets the time of the chunk file at `path` to now (never through a symlink).
fn touch(path: &Path) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let (keep, now) = (TimeSpec::UTIME_OMIT, TimeSpec::UTIME_NOW);
    if let Err(e) = utimensat(None, path, &keep, &now, UtimensatFlags::NoFollowSymlink) {
        tracing::debug!(path = %path.display(), "disk cache: file time not set: {e}");
    }
}

/// Removes least recently used chunks until the cache fits its budget.
fn evict(store: &Store, budget: u64, index: &mut Index) {
    if index.bytes <= budget {
        return;
    }
    let mut by_age: Vec<(u64, ChunkId)> = index.files.iter().map(|(id, &(_, used))| (used, *id)).collect();
    by_age.sort_unstable();
    for (_, id) in by_age {
        if index.bytes <= budget {
            break;
        }
        if let Some((len, _)) = index.files.remove(&id) {
            index.bytes -= len;
            let _ = std::fs::remove_file(store.chunk_path(&id));
        }
    }
}

/// Puts the calling thread at the lowest CPU priority (nice 19).
fn lower_priority() {
    // SAFETY: gettid takes no arguments and cannot fail.
    let Ok(tid) = u32::try_from(unsafe { nix::libc::gettid() }) else { return };
    // SAFETY: setpriority takes no pointers; on Linux PRIO_PROCESS with a thread id sets that
    // thread's nice value only.
    let result = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid, 19) };
    if result != 0 {
        tracing::debug!("disk cache writer keeps its priority: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn chunk(seed: u8) -> (ChunkId, Vec<u8>) {
        let bytes: Vec<u8> = (0..65536u32).map(|i| u8::try_from(i % 61).unwrap_or(0) ^ seed).collect();
        (ChunkId::of(&bytes), bytes)
    }

    /// What `get` returns, as plain bytes.
    fn read(cache: &DiskCache, id: &ChunkId) -> Option<(Vec<u8>, Found)> {
        cache.get(id).map(|(bytes, found)| (bytes.to_vec(), found))
    }

    fn modified(cache: &DiskCache, id: &ChunkId) -> SystemTime {
        std::fs::metadata(cache.store().chunk_path(id)).and_then(|m| m.modified()).expect("chunk file")
    }

    #[test]
    fn a_hit_is_remembered_across_a_restart_and_a_damaged_file_is_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = DiskCache::open(dir.path(), u64::MAX).expect("open");
        let chunks = [chunk(1), chunk(2), chunk(3)];
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for (n, (id, bytes)) in chunks.iter().enumerate() {
            cache.put(id, bytes).expect("put");
            let file = std::fs::File::options().write(true).open(cache.store().chunk_path(id)).expect("open");
            file.set_modified(an_hour_ago + Duration::from_secs(n as u64)).expect("set time");
        }
        let [(a, a_bytes), (b, _), (c, _)] = &chunks;
        assert_eq!(read(&cache, a), Some((a_bytes.clone(), Found::File)));
        // The hit's file time is set behind the reader: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while modified(&cache, a) <= modified(&cache, c) {
            assert!(Instant::now() < deadline, "the hit's file time was never set");
            std::thread::sleep(Duration::from_millis(5));
        }
        let file_len = std::fs::metadata(cache.store().chunk_path(c)).expect("c").len();
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 2 * file_len).expect("reopen");
        assert!(reopened.contains(a) && reopened.contains(c), "the used chunk and the newest stay");
        assert!(!reopened.contains(b), "the least recently used chunk goes first, after a restart too");

        let path = reopened.store().chunk_path(c);
        let mut damaged = std::fs::read(&path).expect("read");
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        std::fs::write(&path, damaged).expect("write");
        assert_eq!(read(&reopened, c), None, "a damaged chunk is never returned");
        assert!(!reopened.contains(c) && !path.exists(), "and it is removed, to be fetched again");
        assert_eq!(read(&reopened, a), Some((a_bytes.clone(), Found::File)));
    }

    #[test]
    fn a_hit_maps_its_raw_file_and_files_it_cannot_map_are_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cache = DiskCache::open(dir.path(), u64::MAX).expect("open");
        cache.maps = Arc::new(MapSlots { live: AtomicUsize::new(0), max: 1 });
        let [(a, a_bytes), (b, b_bytes), (c, c_bytes)] = [chunk(1), chunk(2), chunk(3)];
        cache.put(&a, &a_bytes).expect("put a");
        cache.put(&b, &b_bytes).expect("put b");
        let a_path = cache.store().chunk_path(&a);
        let header = crate::chunk::header(&std::fs::read(&a_path).expect("a's file")).expect("header");
        assert_eq!(header.codec, crate::Codec::None, "kept raw, to be mapped");
        // An older build's file: LZ4, written by another process.
        cache.store().put_chunk(&c, &crate::chunk::encode_checked(&c_bytes, &c, crate::Codec::Lz4)).expect("put c");

        let (held_a, _) = cache.get(&a).expect("a hit");
        assert_eq!((&held_a[..], cache.mapped()), (&a_bytes[..], 1), "served from its mapped file");
        std::fs::remove_file(&a_path).expect("evict a's file");
        assert_eq!(&held_a[..], &a_bytes[..], "a mapping outlives its file's removal");
        let (held_b, _) = cache.get(&b).expect("b hit");
        assert_eq!((&held_b[..], cache.mapped()), (&b_bytes[..], 1), "beyond the cap, read");
        let (held_c, _) = cache.get(&c).expect("c hit");
        assert_eq!((&held_c[..], cache.mapped()), (&c_bytes[..], 1), "an LZ4 file is read and decompressed");
        drop(held_a);
        assert_eq!(cache.mapped(), 0, "the mapping goes with the last holder of its bytes");
        let (held_b, _) = cache.get(&b).expect("b hit");
        assert_eq!((&held_b[..], cache.mapped()), (&b_bytes[..], 1));
    }

    #[test]
    fn chunks_put_behind_are_held_back_up_to_the_bound_and_written_when_the_cache_closes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cache = DiskCache::open(dir.path(), u64::MAX).expect("open");
        // Never quiet during the test: only the bound and the close write.
        cache.hold_back = HoldBack { quiet: Duration::from_secs(3600), max_bytes: 2 * 65536 };
        let chunks: Vec<_> = (1..=5).map(chunk).collect();
        for (id, bytes) in &chunks {
            cache.put_behind(id, Bytes::from(bytes.clone()));
        }
        let files: Vec<_> = chunks.iter().map(|(id, _)| cache.store().chunk_path(id)).collect();
        let on_disk = |file: &std::path::PathBuf| file.exists();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files[..3].iter().all(on_disk) {
            assert!(Instant::now() < deadline, "the chunks past the bound were never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!files[3..].iter().any(on_disk), "the two newest are held back");
        assert_eq!(cache.held_back(), (2, 2 * 65536));
        for (id, bytes) in &chunks[3..] {
            assert!(cache.contains(id), "a chunk held back counts as cached");
            assert_eq!(read(&cache, id), Some((bytes.clone(), Found::HeldBack)), "and is read from RAM meanwhile");
        }
        drop(cache);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files.iter().all(on_disk) {
            assert!(Instant::now() < deadline, "what was held back was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        let reopened = DiskCache::open(dir.path(), u64::MAX).expect("reopen");
        for (id, bytes) in &chunks {
            assert_eq!(read(&reopened, id), Some((bytes.clone(), Found::File)), "chunk {id}");
        }
    }

    #[test]
    fn a_flush_writes_what_is_held_back_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = DiskCache::open(dir.path(), u64::MAX).expect("open").write_after_quiet(Duration::from_secs(3600));
        assert!(cache.flush(Duration::from_secs(10)), "nothing given: nothing to wait for");
        let chunks: Vec<_> = (1..=3).map(chunk).collect();
        for (id, bytes) in &chunks {
            cache.put_behind(id, Bytes::from(bytes.clone()));
        }
        cache.put_behind(&chunks[0].0, Bytes::from(chunks[0].1.clone()));
        assert_eq!(cache.held_back(), (3, 3 * 65536), "a chunk given twice is held once");
        assert_eq!(cache.len(), 0, "never quiet: nothing written yet");
        assert!(cache.flush(Duration::from_secs(10)), "the flush ends");
        assert_eq!((cache.held_back(), cache.len()), ((0, 0), 3));
        for (id, _) in &chunks {
            assert!(cache.store().chunk_path(id).exists(), "chunk {id} is on disk after the flush");
        }
        let (id, bytes) = chunk(4);
        cache.put_behind(&id, Bytes::from(bytes));
        assert_eq!(cache.held_back().0, 1, "held back again after a flush");
        assert!(cache.flush(Duration::from_secs(10)) && cache.contains(&id));
    }

    #[test]
    fn a_chunk_file_another_process_removed_is_forgotten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = DiskCache::open(dir.path(), u64::MAX).expect("open");
        let (id, bytes) = chunk(7);
        cache.put(&id, &bytes).expect("put");
        let file_len = std::fs::metadata(cache.store().chunk_path(&id)).expect("chunk file").len();
        assert_eq!((cache.len(), cache.bytes()), (1, file_len));
        std::fs::remove_file(cache.store().chunk_path(&id)).expect("remove");
        assert_eq!(read(&cache, &id), None, "gone: fetched again by the caller");
        assert!(!cache.contains(&id));
        assert_eq!((cache.len(), cache.bytes()), (0, 0), "and out of the index and its budget");
    }

    #[test]
    fn a_chunk_file_another_process_wrote_is_found_and_indexed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let serving = DiskCache::open(dir.path(), u64::MAX).expect("open");
        // `pull` into the same directory while a server runs.
        let pulling = DiskCache::open(dir.path(), u64::MAX).expect("open");
        let [(a, a_bytes), (b, b_bytes), (c, _)] = [chunk(1), chunk(2), chunk(3)];
        pulling.put(&a, &a_bytes).expect("put");
        pulling.put(&b, &b_bytes).expect("put");
        assert!(serving.contains(&a), "found on disk");
        assert_eq!(read(&serving, &b), Some((b_bytes.clone(), Found::File)), "read without a contains first");
        assert_eq!(read(&serving, &a), Some((a_bytes.clone(), Found::File)));
        assert_eq!(serving.len(), 2, "both indexed (counted in the budget) from now on");
        assert!(!serving.contains(&c) && serving.get(&c).is_none(), "a chunk nobody wrote is not there");
    }
}
