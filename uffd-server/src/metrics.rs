//! Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`): what an operator's dashboards
//! scrape. Every series is per snapshot (label `snapshot`); per-VM numbers stay in
//! `uffd-server stats --json`, since a label per VM would grow without bound.
//!
//! Nothing here touches the fault path: the VMs' counters and histograms are atomics that each
//! scrape reads and sums (`Registry::per_snapshot`); a VM the registry forgets is folded into
//! its snapshot's totals first, so counters never go down. The exposition is the
//! `prometheus-client` crate's (OpenMetrics text: counters get `_total`). Metrics and their
//! meaning: `docs/operations.md`.

use crate::addr::BASE_PAGE;
use crate::control::RemoteReport;
use crate::registry::{Registry, SnapshotView};
use crate::source::chunk_pool::{ChunkOrigin, ChunkPool};
use crate::source::store::SnapshotStore;
use crate::stats::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use snapstore::remote::RemoteStore;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Histogram bounds, seconds: 1 µs … 100 ms (a fault served here takes ~5–50 µs; a stall behind
/// an install or a slow disk, milliseconds).
const BOUNDS: [f64; 16] =
    [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1];

/// A counter of a snapshot's view: name, help, value.
type Count = (&'static str, &'static str, fn(&SnapshotView) -> u64);

const COUNTERS: [Count; 14] = [
    ("uffd_vms_attached", "VMs attached", |v| v.vms_attached),
    ("uffd_vms_ended", "VMs that ended (VMM gone, or an error)", |v| v.vms_attached - v.vms_live),
    ("uffd_vms_taken_over", "VMs taken over from a predecessor (handover or crash recovery)", |v| {
        v.stats.taken_over.load(Relaxed)
    }),
    ("uffd_faults", "page faults served", |v| v.stats.faults.load(Relaxed)),
    ("uffd_pages_copied", "4 KiB pages copied from the snapshot by demand faults", |v| {
        v.stats.copied_pages.load(Relaxed)
    }),
    ("uffd_pages_zero", "4 KiB zero pages placed by demand faults (mapped or copied)", |v| {
        v.stats.zeropage_pages.load(Relaxed) + v.stats.zero_copied_pages.load(Relaxed)
    }),
    ("uffd_faults_removed", "faults on ranges the guest gave back, served as zeros", |v| {
        v.stats.removed_faults.load(Relaxed)
    }),
    ("uffd_placed_bytes", "bytes placed into guests, demand faults and prefetch", |v| {
        let s = &v.stats;
        let pages = [&s.copied_pages, &s.zeropage_pages, &s.zero_copied_pages, &s.prefetched_pages];
        pages.iter().map(|c| c.load(Relaxed)).sum::<u64>() * BASE_PAGE
    }),
    ("uffd_prefetch_planned_pages", "4 KiB pages the prefetch plans held", |v| {
        v.stats.prefetch_planned_pages.load(Relaxed)
    }),
    ("uffd_prefetch_placed_pages", "4 KiB pages placed by prefetch", |v| v.stats.prefetched_pages.load(Relaxed)),
    ("uffd_prefetch_pulled_forward", "faults that overtook the plan and pulled a batch forward", |v| {
        v.stats.faults_unreached_plan.load(Relaxed)
    }),
    ("uffd_prefetch_deferred_pages", "planned 4 KiB pages deferred until the guest is quiet", |v| {
        v.stats.prefetch_deferred_pages.load(Relaxed)
    }),
    ("uffd_poisoned_pages", "4 KiB pages poisoned because their bytes could not be had", |v| {
        v.stats.poisoned_pages.load(Relaxed)
    }),
    ("uffd_stage_panics", "panics contained while serving", |v| v.stats.stage_panics.load(Relaxed)),
];

/// A histogram of a snapshot's view: name, help, the histogram.
type Latencies = (&'static str, &'static str, fn(&SnapshotView) -> &Histogram);

const HISTOGRAMS: [Latencies; 2] = [
    ("uffd_fault_service_seconds", "time to serve a fault, from its start to its page placed", |v| &v.stats.latency),
    (
        "uffd_vcpu_stall_seconds",
        "time a faulting vCPU waited on the server: from the fault event's read to its page placed",
        |v| &v.stats.stall,
    ),
];

/// The server's metrics, read at each scrape.
pub struct Metrics {
    registry: Arc<Registry>,
    store: Arc<SnapshotStore>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Metrics over `registry`'s VMs and `store`'s snapshots.
    pub fn new(registry: Arc<Registry>, store: Arc<SnapshotStore>) -> Metrics {
        Metrics { registry, store }
    }

    /// The exposition, as a scrape gets it.
    pub fn encode(self: &Arc<Self>) -> Result<String, std::fmt::Error> {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut views = self.registry.per_snapshot();
        // Every snapshot served has its series, from the first scrape on.
        for (snapshot, _) in self.store.resident_by_snapshot() {
            views.entry(snapshot).or_default();
        }
        for (name, help, value) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (snapshot, view) in &views {
                let labels = [("snapshot", snapshot.as_str())];
                metric.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&value(view), None)?;
            }
        }
        let mut refused = encoder.encode_descriptor(
            "uffd_vms_refused",
            "connections refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for (snapshot, view) in &views {
            for (reason, count) in &view.refused {
                let labels = [("snapshot", snapshot.as_str()), ("reason", reason)];
                refused.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(count, None)?;
            }
        }
        let mut live = encoder.encode_descriptor("uffd_vms_live", "VMs attached now", None, MetricType::Gauge)?;
        for (snapshot, view) in &views {
            live.encode_family(&[("snapshot", snapshot.as_str())])?.encode_gauge(&view.vms_live)?;
        }
        encode_latencies(&mut encoder, &views)?;
        self.encode_store(&mut encoder)
    }
}

/// The latency histograms of each snapshot.
fn encode_latencies(encoder: &mut DescriptorEncoder, views: &BTreeMap<String, SnapshotView>) -> std::fmt::Result {
    for (name, help, histogram) in HISTOGRAMS {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (snapshot, view) in views {
            let h = histogram(view);
            let buckets = h.buckets_seconds(&BOUNDS);
            let labels = [("snapshot", snapshot.as_str())];
            metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum_seconds(),
                h.count(),
                &buckets,
                None,
            )?;
        }
    }
    Ok(())
}

impl Metrics {
    /// The snapshot store's series.
    fn encode_store(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut resident = encoder.encode_descriptor(
            "uffd_snapshot_resident_bytes",
            "RAM a loaded snapshot holds",
            None,
            MetricType::Gauge,
        )?;
        for (snapshot, bytes) in self.store.resident_by_snapshot() {
            resident.encode_family(&[("snapshot", snapshot.as_str())])?.encode_gauge(&bytes)?;
        }
        encoder
            .encode_descriptor(
                "uffd_snapshot_evictions",
                "idle snapshots evicted to stay in --cache-bytes",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.store.evictions(), None)?;
        match self.store.chunk_pool() {
            Some(pool) => encode_chunk_pool(encoder, &self.store, pool),
            None => Ok(()),
        }
    }
}

/// The chunk pool of stored snapshots (`--store`): each chunk counted once.
fn encode_chunk_pool(encoder: &mut DescriptorEncoder, store: &SnapshotStore, pool: &ChunkPool) -> std::fmt::Result {
    let gauges = [
        (
            "uffd_chunk_pool_bytes",
            "RAM the chunk pool holds, each chunk once (plain copies included)",
            pool.resident_bytes(),
        ),
        ("uffd_chunk_pool_inflated_bytes", "of which plain copies of compressed chunks", pool.inflated_bytes()),
        ("uffd_chunk_pool_chunks", "distinct chunks held", pool.len() as u64),
    ];
    for (name, help, value) in gauges {
        encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)?;
    }
    let corrupt = pool.corrupt_reads.load(std::sync::atomic::Ordering::Relaxed);
    encoder
        .encode_descriptor(
            "uffd_chunk_corrupt_reads",
            "chunks read from disk whose bytes did not hash to their name (never served)",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&corrupt, None)?;
    match pool.origin() {
        ChunkOrigin::Remote(remote) => encode_remote(encoder, store, remote),
        ChunkOrigin::Local(_) => Ok(()),
    }
}

/// What an object store was asked for (the counters `stats` reports), and the disk cache.
fn encode_remote(encoder: &mut DescriptorEncoder, store: &SnapshotStore, remote: &RemoteStore) -> std::fmt::Result {
    let report = RemoteReport::of(store).unwrap_or_default();
    let counters = [
        ("uffd_remote_chunk_gets", "chunks fetched from the object store", report.chunk_gets),
        ("uffd_remote_chunk_bytes", "bytes of chunk objects received", report.chunk_bytes),
        ("uffd_remote_failed_gets", "chunk GETs that failed or returned a bad chunk (each retry)", report.failed_gets),
        ("uffd_disk_cache_hits", "chunks read intact from the disk cache's files", report.disk_hits),
        (
            "uffd_disk_cache_held_back_hits",
            "chunks read back from RAM while the disk cache held them for its writer",
            report.held_back_hits,
        ),
    ];
    for (name, help, value) in counters {
        encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    let cache = remote.cache();
    let gauges = [
        ("uffd_disk_cache_bytes", "bytes of chunk files in the disk cache", cache.bytes()),
        ("uffd_disk_cache_chunks", "chunks in the disk cache", cache.len() as u64),
        (
            "uffd_disk_cache_held_back_bytes",
            "bytes of fetched chunks held in RAM until the disk cache writes them",
            cache.held_back().1 as u64,
        ),
        (
            "uffd_disk_cache_mapped_chunks",
            "disk-cache hits held as their files mapped in place (the others were read into memory)",
            cache.mapped() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers that
/// do not ask for OpenMetrics: a counter family is named `x_total` there (OpenMetrics names it
/// `x` and its sample `x_total`; Prometheus 2.42's parser, Debian's `promtool`, reads the
/// OpenMetrics form as counters without help), and there is no `# EOF`.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: Vec<&str> =
        openmetrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines().filter(|&line| line != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Answers `GET /metrics` on `server` until the process ends: OpenMetrics to a scraper that asks
/// for it (Prometheus does), the classic text format to any other.
pub fn serve(server: &tiny_http::Server, metrics: &Arc<Metrics>) {
    let header = |value: &str| tiny_http::Header::from_bytes(&b"Content-Type"[..], value.as_bytes()).ok();
    let openmetrics = header("application/openmetrics-text; version=1.0.0; charset=utf-8");
    let classic = header("text/plain; version=0.0.4; charset=utf-8");
    for request in server.incoming_requests() {
        let wants_openmetrics = request
            .headers()
            .iter()
            .any(|h| h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text"));
        let response = match (request.method(), request.url()) {
            (tiny_http::Method::Get, "/metrics") => match metrics.encode() {
                Ok(text) => {
                    let (body, content_type) = if wants_openmetrics {
                        (text, openmetrics.clone())
                    } else {
                        (classic_text(&text), classic.clone())
                    };
                    let response = tiny_http::Response::from_string(body);
                    match content_type {
                        Some(content_type) => response.with_header(content_type),
                        None => response,
                    }
                }
                Err(_) => tiny_http::Response::from_string("encoding the metrics failed\n").with_status_code(500),
            },
            _ => tiny_http::Response::from_string("not found: GET /metrics\n").with_status_code(404),
        };
        if let Err(e) = request.respond(response) {
            tracing::debug!("metrics response failed: {e}");
        }
    }
}
