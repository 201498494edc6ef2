//! Snapshot memory files with known content: pseudo-random pages with a share of all-zero ones.

use std::path::{Path, PathBuf};

/// splitmix64: tiny, seedable, good enough to make every page distinct.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A snapshot file written by a test, with its content kept for verification.
pub struct SnapshotFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl SnapshotFile {
    /// `len` bytes (a multiple of 4096); each page is all zeros with probability `zero_fraction`,
    /// else random.
    pub fn random(dir: &Path, name: &str, len: usize, zero_fraction: f64, seed: u64) -> SnapshotFile {
        assert_eq!(len % 4096, 0);
        let mut rng = Rng::new(seed);
        let mut bytes = vec![0u8; len];
        for page in bytes.chunks_mut(4096) {
            if rng.next_f64() >= zero_fraction {
                for word in page.chunks_mut(8) {
                    word.copy_from_slice(&rng.next_u64().to_ne_bytes());
                }
            }
        }
        Self::from_bytes(dir, name, bytes)
    }

    pub fn from_bytes(dir: &Path, name: &str, bytes: Vec<u8>) -> SnapshotFile {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("write snapshot file");
        SnapshotFile { path, bytes }
    }

    pub fn zero_pages(&self) -> usize {
        self.bytes.chunks(4096).filter(|p| p.iter().all(|&b| b == 0)).count()
    }

    pub fn pages(&self) -> usize {
        self.bytes.len() / 4096
    }
}

/// Writes a working set of `runs` (file pages in first-touch order) for `snap` at `path`.
pub fn write_working_set(path: &Path, snap: &SnapshotFile, runs: &[Vec<u64>]) {
    use prefetch::record::{Run, Touch};
    let mut set = prefetch::working_set::WorkingSet::new(prefetch::identity::SnapshotIdentity::of(&snap.bytes));
    for pages in runs {
        set.merge(&Run { touches: pages.iter().map(|&page| Touch { page, write: false }).collect() });
    }
    prefetch::format::write_atomic(path, &set).expect("write working set");
}
