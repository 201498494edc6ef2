//! The snapshot store: every snapshot the server knows, loaded on first use and shared by all
//! VMs restored from it. A memory budget evicts idle snapshots, least recently used first; a
//! snapshot some VM still uses is never evicted (its pages may be needed by the next fault).

use super::snapshot::{Snapshot, SnapshotError, Storage};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// One snapshot the server knows: its file, and its pages while loaded.
struct Entry {
    path: PathBuf,
    loaded: Option<Arc<Snapshot>>,
    last_used: Instant,
}

/// Every snapshot the server serves, by name.
pub struct SnapshotStore {
    entries: Mutex<BTreeMap<String, Entry>>,
    budget_bytes: u64,
    storage: Storage,
}

impl SnapshotStore {
    /// A store of `snapshots` (name, memory file), none loaded yet, holding at most
    /// `budget_bytes` of idle snapshots in RAM.
    pub fn new(snapshots: impl IntoIterator<Item = (String, PathBuf)>, budget_bytes: u64, storage: Storage) -> Self {
        let now = Instant::now();
        let entries =
            snapshots.into_iter().map(|(name, path)| (name, Entry { path, loaded: None, last_used: now })).collect();
        SnapshotStore { entries: Mutex::new(entries), budget_bytes, storage }
    }

    /// The snapshots' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Loads snapshots in name order while they fit in the budget, so the first VMs do not wait.
    pub fn preload(&self) -> Vec<Result<Arc<Snapshot>, SnapshotError>> {
        let mut results = Vec::new();
        for name in self.names() {
            let fits = {
                let entries = self.lock();
                let size = entries.get(&name).and_then(|e| std::fs::metadata(&e.path).ok()).map_or(0, |m| m.len());
                resident_bytes(&entries) + size <= self.budget_bytes
            };
            if fits {
                results.push(self.get(&name));
            }
        }
        results
    }

    /// The loaded snapshot `name`, loading it if needed. The lock is held while loading so that
    /// two VMs arriving at once load it once; running VMs never take this lock.
    pub fn get(&self, name: &str) -> Result<Arc<Snapshot>, SnapshotError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| SnapshotError::Unknown(name.into()))?;
        entry.last_used = Instant::now();
        if let Some(snapshot) = &entry.loaded {
            return Ok(Arc::clone(snapshot));
        }
        let started = Instant::now();
        let snapshot = Arc::new(Snapshot::load(name, &entry.path, self.storage)?);
        tracing::info!(
            snapshot = name,
            bytes = snapshot.len(),
            resident = snapshot.pages().resident_bytes(),
            zero_pages = snapshot.zero_page_count(),
            ms = started.elapsed().as_millis(),
            "snapshot loaded"
        );
        entry.loaded = Some(Arc::clone(&snapshot));
        self.evict_idle(&mut entries, name);
        Ok(snapshot)
    }

    /// Bytes of RAM held by loaded snapshots.
    pub fn resident_bytes(&self) -> u64 {
        resident_bytes(&self.lock())
    }

    /// Names of the snapshots currently held in memory.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, e)| e.loaded.is_some()).map(|(n, _)| n.clone()).collect()
    }

    fn evict_idle(&self, entries: &mut BTreeMap<String, Entry>, keep: &str) {
        while resident_bytes(entries) > self.budget_bytes {
            // Idle: nobody but the store holds it.
            let victim = entries
                .iter()
                .filter(|(name, e)| {
                    name.as_str() != keep && e.loaded.as_ref().is_some_and(|s| Arc::strong_count(s) == 1)
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    budget = self.budget_bytes,
                    resident = resident_bytes(entries),
                    "snapshots in use exceed the cache budget; nothing idle to evict"
                );
                return;
            };
            if let Some(entry) = entries.get_mut(&victim) {
                entry.loaded = None;
            }
            tracing::info!(snapshot = victim, "idle snapshot evicted to stay within the cache budget");
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave an entry half-updated in a way that
        // matters (a load either stored its Arc or did not), so poisoning is ignored.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn resident_bytes(entries: &BTreeMap<String, Entry>) -> u64 {
    entries.values().filter_map(|e| e.loaded.as_ref()).map(|s| s.pages().resident_bytes()).sum()
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
        let store = SnapshotStore::new(snapshots, 2 * 4 * 4096, Storage::Memory);
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
