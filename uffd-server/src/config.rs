//! What a server serves and how: its configuration, checked before any socket is bound.

use crate::control::CONTROL_SOCKET;
use crate::source::snapshot::Storage;
use crate::vm::demand::Demand;
use prefetch::plan::PlanConfig;
use prefetch::policy::PrefetchPolicy;
use prefetch::record::RecordWindow;
use std::path::PathBuf;
use std::time::Duration;

/// A server's configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the sockets are: `NAME.sock` per snapshot, and the control socket.
    pub socket_dir: PathBuf,
    /// (name, memory file) pairs; the socket of `name` is `socket_dir/name.sock`.
    pub snapshots: Vec<(String, PathBuf)>,
    /// Snapshots served from a chunk store (`uffd-server import`), if any.
    pub chunk_store: Option<ChunkStoreConfig>,
    /// RAM budget for loaded snapshots; idle ones are evicted beyond it.
    pub cache_bytes: u64,
    /// Snapshots held in RAM, or read from their files on each fault.
    pub storage: Storage,
    /// How demand faults are served.
    pub demand: Demand,
    /// When non-empty, only peers with one of these uids may attach.
    pub allow_uids: Vec<u32>,
    /// How long a connecting VMM may take to send its handshake.
    pub handshake_timeout: Duration,
    /// How long a VM waits for its snapshot to load before it is refused.
    pub load_wait: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<String>,
    /// The working-set file of the (single) snapshot: recorded into, prefetched from, refined.
    pub working_set: Option<PathBuf>,
    /// A loading-set file of the (single) snapshot: `union` prefetches its batches from it.
    pub loading_set: Option<PathBuf>,
    /// Serve or record.
    pub mode: Mode,
    /// Where each VM is journaled for a successor (crash recovery, handover); None: nowhere.
    pub journal_dir: Option<PathBuf>,
    /// Take every socket and VM over from the server running on the socket directory.
    pub takeover: bool,
    /// The socket of the single snapshot, at exactly this path (instead of `NAME.sock` in the
    /// socket directory).
    pub socket_path: Option<PathBuf>,
}

/// Snapshots served from a content-addressed chunk store.
#[derive(Clone, Debug)]
pub struct ChunkStoreConfig {
    /// Where the store is.
    pub origin: StoreOrigin,
    /// The snapshots of it to serve.
    pub names: Vec<String>,
    /// Load the snapshots of an object store when the server starts (in the background: the
    /// server does not wait for the bucket), not when their first VM attaches. Set when they
    /// were named; a whole bucket's snapshots load on first use.
    pub load_remote_at_start: bool,
    /// How chunks are held in RAM: LZ4 where it saves ≥ 1/8, or as they are.
    pub ram_codec: snapstore::Codec,
    /// RAM for decompressed copies of the compressed chunks VMs use (the hot ones).
    pub inflate_bytes: u64,
}

/// Where a chunk store is.
#[derive(Clone, Debug)]
pub enum StoreOrigin {
    /// A store directory on this host.
    Local(PathBuf),
    /// A bucket (S3 API), read through a disk cache on this host.
    Remote(RemoteStoreConfig),
}

/// A store in an object store, and this host's tiers in front of it.
#[derive(Clone, Debug)]
pub struct RemoteStoreConfig {
    /// `s3://BUCKET/PREFIX`.
    pub address: snapstore::bucket::S3Address,
    /// The disk cache's directory (chunks, and the manifests and working sets fetched).
    pub disk_cache: PathBuf,
    /// Bytes of chunk files the disk cache may hold.
    pub disk_cache_bytes: u64,
    /// How long no chunk is fetched or read before the chunks held back are written.
    pub disk_cache_quiet: std::time::Duration,
    /// How long one chunk is tried before its VM gets an error.
    pub retry: snapstore::bucket::RetryPolicy,
    /// Chunks fetched at once ahead of need (demand fetches have their own connections).
    pub fetch_threads: usize,
    /// Publish what VMs teach (runs, pages learned online) for other hosts to merge.
    pub share_learning: bool,
}

impl RemoteStoreConfig {
    /// The store it names, through its disk cache, reached as the environment says
    /// (`snapstore::bucket::S3Config::from_env`). No request is made yet.
    pub fn open(&self) -> Result<snapstore::remote::RemoteStore, ServerError> {
        let bucket = snapstore::bucket::S3Config::from_env()
            .and_then(|s3| snapstore::bucket::Bucket::new(&s3, self.address.clone()))
            .map_err(|e| ServerError::Remote(e.to_string()))?;
        let cache = snapstore::disk_cache::DiskCache::open(&self.disk_cache, self.disk_cache_bytes)
            .map_err(|e| ServerError::ChunkStore(Box::new(e)))?
            .write_after_quiet(self.disk_cache_quiet);
        Ok(snapstore::remote::RemoteStore::new(bucket, cache, self.retry))
    }
}

/// What the server does with the VMs it serves.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Serve, prefetching by `policy`; with a working set, demand faults on pages new to it are
    /// merged into it when the VM ends (online refinement).
    Serve {
        /// What is placed ahead of the guest.
        policy: PrefetchPolicy,
        /// `union`: only pages seen in at least this fraction of the runs.
        min_frequency: f64,
        /// How pages become batches.
        plan: PlanConfig,
    },
    /// Serve on demand and merge each VM's first touches into the working set as a run.
    Record {
        /// When a VM's run stops recording.
        window: RecordWindow,
    },
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum ServerError {
    #[error("no snapshot given")]
    NoSnapshots,
    #[error("snapshot name `{0}` is not valid: use letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("snapshot name `{0}` is given twice")]
    DuplicateName(String),
    #[error("a working-set file belongs to exactly one snapshot, got {0} snapshots")]
    WorkingSetNeedsOneSnapshot(usize),
    #[error("{0:?} needs a working set (--working-set)")]
    PolicyNeedsWorkingSet(PrefetchPolicy),
    #[error("a loading set is prefetched by --prefetch union, and belongs to exactly one snapshot")]
    LoadingSetNeedsUnion,
    #[error("{0}")]
    Socket(#[from] crate::sockets::SocketError),
    #[error("cannot serve metrics on {0}: {1}")]
    Metrics(String, String),
    #[error("{0}")]
    ChunkStore(Box<snapstore::store::StoreError>),
    #[error("object store: {0}")]
    Remote(String),
    #[error("{0}")]
    Snapshot(Box<crate::source::snapshot::SnapshotError>),
    #[error("journal: {0}")]
    Journal(String),
    #[error("takeover failed: {0}")]
    Takeover(String),
    #[error("--socket-path names the socket of one snapshot, got {0} snapshots")]
    SocketPathNeedsOneSnapshot(usize),
    #[error("{0}")]
    Io(String),
}

impl ServerConfig {
    /// Checks that the configuration makes sense before anything is bound or loaded.
    pub fn validate(&self) -> Result<(), ServerError> {
        let all = self.names();
        if all.is_empty() {
            return Err(ServerError::NoSnapshots);
        }
        if self.socket_path.is_some() && all.len() != 1 {
            return Err(ServerError::SocketPathNeedsOneSnapshot(all.len()));
        }
        if self.working_set.is_some() && all.len() != 1 {
            return Err(ServerError::WorkingSetNeedsOneSnapshot(all.len()));
        }
        let policy = self.policy();
        let loading_set_plans = policy == Some(PrefetchPolicy::Union) && self.loading_set.is_some();
        if let Some(policy) = policy.filter(|p| p.needs_working_set()) {
            if self.working_set.is_none() && !loading_set_plans {
                return Err(ServerError::PolicyNeedsWorkingSet(policy));
            }
        }
        if self.loading_set.is_some() && (policy != Some(PrefetchPolicy::Union) || all.len() != 1) {
            return Err(ServerError::LoadingSetNeedsUnion);
        }
        let mut names = std::collections::BTreeSet::new();
        for name in all {
            if !is_valid_name(name) {
                return Err(ServerError::BadName(name.into()));
            }
            if !names.insert(name) {
                return Err(ServerError::DuplicateName(name.into()));
            }
        }
        Ok(())
    }

    /// Every snapshot served: memory files, then the chunk store's.
    pub fn names(&self) -> Vec<&str> {
        let files = self.snapshots.iter().map(|(name, _)| name.as_str());
        files.chain(self.chunk_store.iter().flat_map(|store| store.names.iter().map(String::as_str))).collect()
    }

    /// The prefetch policy when serving; None when recording.
    pub fn policy(&self) -> Option<PrefetchPolicy> {
        match self.mode {
            Mode::Serve { policy, .. } => Some(policy),
            Mode::Record { .. } => None,
        }
    }

    /// Whether what VMs learn is published to the object store they are served from.
    pub fn shares_learning(&self) -> bool {
        matches!(&self.chunk_store, Some(ChunkStoreConfig { origin: StoreOrigin::Remote(remote), .. }) if remote.share_learning)
    }

    /// The socket of snapshot `name`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        match &self.socket_path {
            Some(path) => path.clone(),
            None => self.socket_dir.join(format!("{name}.sock")),
        }
    }

    /// Who may connect to the snapshot sockets.
    pub fn access(&self) -> crate::sockets::Access {
        if self.allow_uids.is_empty() {
            crate::sockets::Access::Owner
        } else {
            crate::sockets::Access::CheckedPeers
        }
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != CONTROL_SOCKET.trim_end_matches(".sock")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}
