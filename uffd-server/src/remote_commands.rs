//! The binary's object-store commands: `push`, `pull`, and the `serve` options that serve
//! snapshots from a bucket (part of `main.rs`, not of the library).

use anyhow::{bail, Context, Result};
use snapstore::bucket::{Bucket, RetryPolicy, S3Address, S3Config};
use snapstore::disk_cache::DiskCache;
use snapstore::push::{pull, push, PullScope, PushOptions};
use snapstore::remote::RemoteStore;
use snapstore::shared_set::{compact, merged};
use snapstore::store::Store;
use std::path::PathBuf;
use std::time::Duration;
use uffd_server::config::RemoteStoreConfig;

#[derive(clap::Args)]
pub struct PushArgs {
    /// The local store holding the snapshot.
    #[arg(long)]
    store: PathBuf,
    /// The snapshot.
    #[arg(long)]
    name: String,
    /// Where: s3://BUCKET[/PREFIX] (the bucket is created if missing).
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    to: String,
    /// The snapshot's working-set file, published with it (`serve --prefetch union` on other
    /// hosts prefetches from it).
    #[arg(long)]
    working_set: Option<PathBuf>,
    /// How the chunks of the working-set pack are compressed (the chunks themselves are
    /// uploaded as the store holds them). zstd: the fewest bytes on the wire; lz4 decompresses
    /// ~3× faster but measured no faster restore here (docs/object-store.md).
    #[arg(long, value_enum, default_value = "zstd")]
    pack_codec: crate::store_commands::CodecArg,
    /// The pack's tail: chunks next to the working set's that it does not name (a VM given
    /// another input touches them), up to this percentage of the working set's bytes.
    #[arg(long, default_value_t = 15)]
    pack_tail_percent: u64,
    /// Requests at once.
    #[arg(long, default_value_t = 16)]
    threads: usize,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Where the snapshot is: s3://BUCKET[/PREFIX].
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    from: String,
    /// The snapshot.
    #[arg(long)]
    name: String,
    /// Every chunk, not only those of the snapshot's working set.
    #[arg(long)]
    all: bool,
    /// Requests at once.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    #[command(flatten)]
    cache: DiskCacheArgs,
}

#[derive(clap::Args)]
pub struct DiskCacheArgs {
    /// This host's disk cache of fetched chunks (created if missing; kept across restarts).
    #[arg(long)]
    disk_cache: Option<PathBuf>,
    /// Bytes of chunk files the disk cache may hold, kept uncompressed (a 64 KiB chunk takes
    /// 64 KiB); least recently used removed first.
    #[arg(long, default_value = "8G", value_parser = crate::parse_bytes)]
    disk_cache_bytes: u64,
}

/// `serve` options for snapshots in an object store.
#[derive(clap::Args)]
pub struct RemoteServeArgs {
    /// A bucket written by `push`: serves its snapshots named by --snapshot NAME, or all of
    /// them if none is named. (`--snapshot NAME=s3://BUCKET/PREFIX/NAME` names one directly.)
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub remote: Option<String>,
    #[command(flatten)]
    cache: DiskCacheArgs,
    /// Chunks fetched at once ahead of the VMs (demand faults have their own connections).
    #[arg(long, default_value_t = 8)]
    fetch_threads: usize,
    /// Chunks fetched are written to the disk cache once no chunk was fetched or read for this
    /// long (a restore's burst is over); until then they are held in RAM (at most 64 MiB) and
    /// read from there, and a server stopping writes them.
    #[arg(long, default_value_t = 100)]
    disk_cache_quiet_ms: u64,
    /// How long one chunk is tried (with backoff) before the VM needing it gets an error.
    #[arg(long, default_value_t = 30_000)]
    remote_deadline_ms: u64,
    /// Keep what VMs teach on this host: do not publish runs and learned pages to the bucket
    /// for other hosts (a measurement that needs a fixed working set, say).
    #[arg(long)]
    no_share_learning: bool,
}

fn retry_policy(deadline_ms: u64) -> RetryPolicy {
    RetryPolicy { deadline: Duration::from_millis(deadline_ms), ..RetryPolicy::default() }
}

fn open_bucket(address: &str) -> Result<Bucket> {
    let address = S3Address::parse(address)?;
    let config = S3Config::from_env()?;
    Ok(Bucket::new(&config, address)?)
}

pub fn run_push(args: &PushArgs) -> Result<()> {
    let store = Store::open(&args.store)?;
    let bucket = open_bucket(&args.to)?;
    bucket.create_if_missing().with_context(|| format!("cannot create the bucket of {}", args.to))?;
    let options = PushOptions {
        working_set: args.working_set.as_deref(),
        pack_codec: args.pack_codec.into(),
        pack_tail_percent: args.pack_tail_percent,
        threads: args.threads,
    };
    let report = push(&store, &args.name, &bucket, &options, &RetryPolicy::default())
        .with_context(|| format!("cannot push `{}` to {}", args.name, args.to))?;
    println!(
        "pushed {} to {}: {} chunks, {} uploaded ({} already there), {} bytes sent",
        args.name,
        bucket.address(),
        report.chunks,
        report.uploaded,
        report.chunks - report.uploaded,
        report.bytes
    );
    Ok(())
}

pub fn run_pull(args: &PullArgs) -> Result<()> {
    let Some(dir) = &args.cache.disk_cache else { bail!("pull needs --disk-cache DIR: where the chunks go") };
    let remote = RemoteStore::new(
        open_bucket(&args.from)?,
        DiskCache::open(dir, args.cache.disk_cache_bytes)?,
        RetryPolicy::default(),
    );
    let scope = if args.all { PullScope::All } else { PullScope::WorkingSet };
    let chunks = pull(&remote, &args.name, scope, args.threads)
        .with_context(|| format!("cannot pull `{}` from {}", args.name, args.from))?;
    let fetched = remote.counters.chunk_gets.load(std::sync::atomic::Ordering::Relaxed);
    println!("{} in {}: {chunks} chunks cached ({fetched} fetched now)", args.name, dir.display());
    Ok(())
}

/// The remote store `serve` is to read, if any: from `--remote`, or from `NAME=s3://…`
/// snapshots (which must share one bucket and prefix), with the snapshot names to serve.
pub fn remote_store(
    args: &RemoteServeArgs,
    specs: &[(String, String)],
) -> Result<Option<(RemoteStoreConfig, Vec<String>)>> {
    let mut address = args.remote.as_deref().map(S3Address::parse).transpose()?;
    let mut names = Vec::new();
    for (name, url) in specs {
        let (prefix, last) = url.rsplit_once('/').filter(|(p, _)| p.len() > "s3:/".len()).unwrap_or((url, ""));
        if last != name {
            bail!("--snapshot {name}={url}: the address must end in the snapshot's name (s3://BUCKET/PREFIX/{name})");
        }
        let this = S3Address::parse(prefix)?;
        if address.as_ref().is_some_and(|known| *known != this) {
            bail!("--snapshot {name}={url}: every remote snapshot must come from one bucket and prefix");
        }
        address = Some(this);
        names.push(name.clone());
    }
    let Some(address) = address else { return Ok(None) };
    let Some(disk_cache) = args.cache.disk_cache.clone() else {
        bail!(
            "serving from {address} needs --disk-cache DIR (chunks, manifests and working sets fetched are kept there)"
        )
    };
    let config = RemoteStoreConfig {
        address,
        disk_cache,
        disk_cache_bytes: args.cache.disk_cache_bytes,
        disk_cache_quiet: Duration::from_millis(args.disk_cache_quiet_ms),
        retry: retry_policy(args.remote_deadline_ms),
        fetch_threads: args.fetch_threads.clamp(1, 256),
        share_learning: !args.no_share_learning,
    };
    Ok(Some((config, names)))
}

/// Every snapshot in the remote store.
pub fn remote_names(config: &RemoteStoreConfig) -> Result<Vec<String>> {
    let remote = config.open()?;
    remote.names().with_context(|| format!("cannot list the snapshots in {}", config.address))
}

/// Snapshot `name`'s working set as every host has learned it (the set pushed with it merged
/// with every run other hosts published: `snapstore::shared_set`), written into the disk cache
/// (where online refinement then updates it); None if it has none.
pub fn fetch_working_set(config: &RemoteStoreConfig, name: &str) -> Result<Option<PathBuf>> {
    let remote = config.open()?;
    let (manifest, _) = remote.manifest(name).with_context(|| format!("cannot fetch the manifest of `{name}`"))?;
    let merged = merged(remote.bucket(), name, &manifest.identity, remote.retry_policy())
        .with_context(|| format!("cannot fetch the working set of `{name}`"))?;
    let Some((set, runs)) = merged else { return Ok(None) };
    let dir = config.disk_cache.join("working-sets");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    prefetch::format::write_atomic(&path, &set).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(
        snapshot = name,
        runs = set.runs,
        published_runs = runs.len(),
        "working set fetched from the object store"
    );
    Ok(Some(path))
}

#[derive(clap::Args)]
pub struct CompactArgs {
    /// Where the snapshot is: s3://BUCKET[/PREFIX].
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    from: String,
    /// The snapshot.
    #[arg(long)]
    name: String,
}

/// Folds the runs hosts published into the snapshot's working set (run one at a time).
pub fn run_compact(args: &CompactArgs) -> Result<()> {
    let bucket = open_bucket(&args.from)?;
    let manifest_key = snapstore::store::manifest_relative(&args.name)?;
    let manifest = bucket
        .get(&manifest_key, snapstore::bucket::Lane::Background)?
        .with_context(|| format!("no snapshot `{}` in {}", args.name, args.from))?;
    let identity = snapstore::manifest::Manifest::decode(&manifest)?.identity;
    let folded = compact(&bucket, &args.name, &identity, &RetryPolicy::default())
        .with_context(|| format!("cannot compact the working set of `{}`", args.name))?;
    println!("{}: {folded} published runs folded into the working set", args.name);
    Ok(())
}
