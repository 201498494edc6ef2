//! The snapshot store: every snapshot the server knows, loaded on first use (or preloaded) and
//! shared by all VMs restored from it.
//!
//! Each snapshot loads on its own: a slow or hung file holds up only the VMs of that snapshot,
//! for at most the load wait (`--load-wait-ms`), never another snapshot or `stats`. A memory file
//! that changed since it was loaded (its stamp: device, inode, size, mtime, ctime) is loaded
//! again for the next VM; VMs already running keep the copy they started with. A memory budget
//! evicts idle snapshots, least recently used first; a snapshot some VM still uses is never
//! evicted (its pages may be needed by the next fault).

use super::chunk_pool::ChunkPool;
use super::snapshot::{FileStamp, Snapshot, SnapshotError, Storage};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where one snapshot's load stands.
enum State {
    Unloaded,
    /// A thread is loading it; others wait on the slot's condvar.
    Loading,
    Loaded {
        snapshot: Arc<Snapshot>,
        last_used: Instant,
    },
}

/// One snapshot the server knows.
struct Slot {
    /// Its memory file, or its manifest in the chunk store.
    path: PathBuf,
    /// Served from the chunk store.
    stored: bool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Slot {
    fn new(path: PathBuf, stored: bool) -> Slot {
        Slot { path, stored, state: Mutex::new(State::Unloaded), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A state is replaced whole: a poisoned lock holds a consistent one.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every snapshot the server serves, by name.
pub struct SnapshotStore {
    slots: BTreeMap<String, Slot>,
    budget_bytes: u64,
    storage: Storage,
    load_wait: Duration,
    evictions: std::sync::atomic::AtomicU64,
    /// Chunks of stored snapshots, each held once.
    pool: Option<Arc<ChunkPool>>,
    /// Snapshots of an object store load at start (else when their first VM attaches).
    load_remote_at_start: bool,
}

impl SnapshotStore {
    /// A store of `snapshots` (name, memory file), none loaded yet, holding at most
    /// `budget_bytes` of idle snapshots in RAM; a VM waits at most `load_wait` for a load.
    pub fn new(
        snapshots: impl IntoIterator<Item = (String, PathBuf)>,
        budget_bytes: u64,
        storage: Storage,
        load_wait: Duration,
    ) -> Self {
        let slots = snapshots.into_iter().map(|(name, path)| (name, Slot::new(path, false))).collect();
        SnapshotStore {
            slots,
            budget_bytes,
            storage,
            load_wait,
            evictions: Default::default(),
            pool: None,
            load_remote_at_start: false,
        }
    }

    /// Adds snapshots `names` of the chunk store `pool` reads from (their chunks held once in
    /// the pool, within the same budget); from an object store, loaded at start if
    /// `load_remote_at_start` ([`SnapshotStore::remote_preload_names`]).
    pub fn with_stored(
        mut self,
        pool: Arc<ChunkPool>,
        names: &[String],
        load_remote_at_start: bool,
    ) -> Result<Self, SnapshotError> {
        self.load_remote_at_start = load_remote_at_start;
        for name in names {
            let path = pool
                .manifest_path(name)
                .map_err(|source| SnapshotError::Store { name: name.clone(), source: Box::new(source) })?;
            self.slots.insert(name.clone(), Slot::new(path, true));
        }
        self.pool = Some(pool);
        Ok(self)
    }

    /// The snapshots to load at start before serving: in name order, while their files fit in
    /// the budget. Those of an object store are not among them
    /// ([`SnapshotStore::remote_preload_names`]).
    pub fn preload_names(&self) -> Vec<String> {
        let mut planned = 0;
        let mut names = Vec::new();
        let remote = self.pool.as_ref().is_some_and(|pool| pool.is_remote());
        for (name, slot) in self.slots.iter().filter(|(_, slot)| !(slot.stored && remote)) {
            let size = std::fs::metadata(&slot.path).map_or(0, |m| m.len());
            if planned + size <= self.budget_bytes {
                planned += size;
                names.push(name.clone());
            }
        }
        names
    }

    /// The snapshots of an object store to load at start, without waiting for them: their
    /// manifests, plans, and the first fetches of their working sets (a remote snapshot holds
    /// no chunk at load, so the budget does not limit them). None unless they were named.
    pub fn remote_preload_names(&self) -> Vec<String> {
        let remote = self.pool.as_ref().is_some_and(|pool| pool.is_remote());
        if !(remote && self.load_remote_at_start) {
            return Vec::new();
        }
        self.slots.iter().filter(|(_, slot)| slot.stored).map(|(name, _)| name.clone()).collect()
    }

    /// The loaded snapshot `name`, loading it if needed (or again, if its file changed).
    pub fn get(&self, name: &str) -> Result<Arc<Snapshot>, SnapshotError> {
        self.get_prepared(name, &|_| {})
    }

    /// As [`SnapshotStore::get`], running `prepare` on a snapshot it (re)loads before any VM
    /// may use it, as a preload does.
    pub fn get_prepared(&self, name: &str, prepare: &dyn Fn(&Snapshot)) -> Result<Arc<Snapshot>, SnapshotError> {
        let slot = self.slots.get(name).ok_or_else(|| SnapshotError::Unknown(name.into()))?;
        let started = Instant::now();
        let mut state = slot.lock();
        loop {
            match &mut *state {
                State::Loaded { snapshot, last_used } => {
                    if FileStamp::at(&slot.path).is_ok_and(|now| now == snapshot.stamp()) {
                        *last_used = Instant::now();
                        return Ok(Arc::clone(snapshot));
                    }
                    tracing::warn!(
                        snapshot = name,
                        "memory file changed since it was loaded: loading it again (running VMs keep their copy)"
                    );
                    *state = State::Unloaded;
                }
                State::Loading => {
                    let waited = started.elapsed();
                    if waited >= self.load_wait {
                        return Err(SnapshotError::LoadTimeout { name: name.into(), waited_ms: waited.as_millis() });
                    }
                    state = slot
                        .changed
                        .wait_timeout(state, self.load_wait - waited)
                        .map_or_else(|p| p.into_inner().0, |(s, _)| s);
                }
                State::Unloaded => {
                    *state = State::Loading;
                    drop(state);
                    return self.load(name, slot, prepare);
                }
            }
        }
    }

    /// Loads `slot` (marked Loading by the caller), outside every lock, and runs `prepare` on
    /// it before any VM may use it.
    fn load(&self, name: &str, slot: &Slot, prepare: &dyn Fn(&Snapshot)) -> Result<Arc<Snapshot>, SnapshotError> {
        let started = Instant::now();
        let loaded = match (&self.pool, slot.stored) {
            (Some(pool), true) => Snapshot::load_stored(name, pool),
            _ => Snapshot::load(name, &slot.path, self.storage),
        }
        .inspect(prepare)
        .map(Arc::new);
        let mut state = slot.lock();
        *state = match &loaded {
            Ok(snapshot) => State::Loaded { snapshot: Arc::clone(snapshot), last_used: Instant::now() },
            Err(_) => State::Unloaded,
        };
        slot.changed.notify_all();
        drop(state);
        let snapshot = loaded?;
        tracing::info!(
            snapshot = name,
            bytes = snapshot.len(),
            resident = snapshot.pages().resident_bytes(),
            zero_pages = snapshot.zero_page_count(),
            ms = started.elapsed().as_millis(),
            "snapshot loaded"
        );
        self.evict_idle(name);
        Ok(snapshot)
    }

    /// Bytes of RAM held by loaded snapshots: memory files, plus the chunk pool (each chunk
    /// once, however many snapshots hold it).
    pub fn resident_bytes(&self) -> u64 {
        let files: u64 = self
            .slots
            .values()
            .filter(|slot| !slot.stored)
            .map(|slot| loaded(&slot.lock()).map_or(0, |s| s.pages().resident_bytes()))
            .sum();
        files + self.pool.as_ref().map_or(0, |pool| pool.resident_bytes())
    }

    /// The chunk pool of stored snapshots, if any are served.
    pub fn chunk_pool(&self) -> Option<&Arc<ChunkPool>> {
        self.pool.as_ref()
    }

    /// Writes the chunks the disk cache of an object store holds back (the server is stopping:
    /// they would be fetched again), waiting at most `within`.
    pub fn flush_disk_cache(&self, within: Duration) {
        let Some(super::chunk_pool::ChunkOrigin::Remote(remote)) = self.pool.as_ref().map(|pool| pool.origin()) else {
            return;
        };
        let (chunks, bytes) = remote.cache().held_back();
        if chunks == 0 {
            return;
        }
        let started = Instant::now();
        if remote.cache().flush(within) {
            let ms = started.elapsed().as_millis();
            tracing::info!(chunks, bytes, ms, "disk cache: chunks held back written");
        } else {
            let (left, _) = remote.cache().held_back();
            tracing::warn!(
                left,
                "disk cache: chunks held back not all written in {within:?}; they will be fetched again"
            );
        }
    }

    /// The object store snapshot `name` is served from, if it is.
    pub fn remote_of(&self, name: &str) -> Option<&snapstore::remote::RemoteStore> {
        let slot = self.slots.get(name).filter(|slot| slot.stored)?;
        match self.pool.as_ref().map(|pool| pool.origin()) {
            Some(super::chunk_pool::ChunkOrigin::Remote(remote)) if slot.stored => Some(remote),
            _ => None,
        }
    }

    /// RAM held per snapshot (0 when not loaded; a chunk shared by several counts in each).
    pub fn resident_by_snapshot(&self) -> Vec<(String, u64)> {
        let held = |slot: &Slot| loaded(&slot.lock()).map_or(0, |s| s.pages().resident_bytes());
        self.slots.iter().map(|(name, slot)| (name.clone(), held(slot))).collect()
    }

    /// Idle snapshots evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Names of the snapshots currently held.
    pub fn loaded(&self) -> Vec<String> {
        self.names_in(|state| matches!(state, State::Loaded { .. }))
    }

    /// Names of the snapshots being loaded now.
    pub fn loading(&self) -> Vec<String> {
        self.names_in(|state| matches!(state, State::Loading))
    }

    /// Marks `names` as loading before their loads start, so that `stats` says so from the
    /// server's first moment and VMs arriving meanwhile wait for them; each is then loaded by
    /// [`SnapshotStore::finish_preload`].
    pub fn begin_preload(&self, names: &[String]) {
        for name in names {
            if let Some(slot) = self.slots.get(name) {
                *slot.lock() = State::Loading;
            }
        }
    }

    /// Loads a snapshot marked by [`SnapshotStore::begin_preload`], running `prepare` on it
    /// (e.g. planning its working set) before VMs may use it.
    pub fn finish_preload(&self, name: &str, prepare: &dyn Fn(&Snapshot)) -> Result<Arc<Snapshot>, SnapshotError> {
        let slot = self.slots.get(name).ok_or_else(|| SnapshotError::Unknown(name.into()))?;
        self.load(name, slot, prepare)
    }

    fn names_in(&self, wanted: impl Fn(&State) -> bool) -> Vec<String> {
        self.slots.iter().filter(|(_, slot)| wanted(&slot.lock())).map(|(name, _)| name.clone()).collect()
    }

    fn evict_idle(&self, keep: &str) {
        loop {
            // Chunks no loaded snapshot needs go first, least recently used first.
            if let Some(pool) = &self.pool {
                let files = self.resident_bytes() - pool.resident_bytes();
                pool.trim(self.budget_bytes.saturating_sub(files));
            }
            if self.resident_bytes() <= self.budget_bytes {
                return;
            }
            // Idle: nobody but the store holds it.
            let victim = self
                .slots
                .iter()
                .filter(|(name, _)| name.as_str() != keep)
                .filter_map(|(name, slot)| match &*slot.lock() {
                    State::Loaded { snapshot, last_used } if Arc::strong_count(snapshot) == 1 => {
                        Some((*last_used, name))
                    }
                    _ => None,
                })
                .min()
                .map(|(_, name)| name.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    budget = self.budget_bytes,
                    resident = self.resident_bytes(),
                    "snapshots in use exceed the cache budget; nothing idle to evict"
                );
                return;
            };
            if let Some(slot) = self.slots.get(&victim) {
                let mut state = slot.lock();
                if matches!(&*state, State::Loaded { snapshot, .. } if Arc::strong_count(snapshot) == 1) {
                    *state = State::Unloaded;
                }
            }
            self.evictions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(snapshot = victim, "idle snapshot evicted to stay within the cache budget");
        }
    }
}

fn loaded(state: &State) -> Option<&Arc<Snapshot>> {
    match state {
        State::Loaded { snapshot, .. } => Some(snapshot),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_idle_snapshots_lru_but_never_one_in_use() {
        let dir = std::env::temp_dir().join(format!("store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut snapshots = Vec::new();
        for name in ["a", "b", "c"] {
            let path = dir.join(name);
            std::fs::write(&path, vec![1u8; 4 * 4096]).expect("write");
            snapshots.push((name.to_string(), path));
        }
        // Room for two 16 KiB snapshots.
        let store = SnapshotStore::new(snapshots, 2 * 4 * 4096, Storage::Memory, Duration::from_secs(1));
        let a = store.get("a").expect("a");
        drop(store.get("b").expect("b"));
        drop(store.get("c").expect("c")); // over budget: b is idle and older than c, a is in use
        assert_eq!(store.loaded(), vec!["a".to_string(), "c".to_string()]);
        drop(a);
        drop(store.get("b").expect("b again")); // a is idle now and the least recently used
        assert_eq!(store.loaded(), vec!["b".to_string(), "c".to_string()]);
        assert!(matches!(store.get("nope"), Err(SnapshotError::Unknown(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
