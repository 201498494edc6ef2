//! Per-VM counters, updated lock-free by the VM's thread and read at any time by the control
//! socket. Relaxed atomics: each counter is exact, a report is not an atomic cut across them.
//!
//! Every counter is named once, in [`vm_counters!`]: the atomics, the report (JSON of
//! `uffd-server stats`), and the `name=value` list of the log line and the stats table all come
//! from that list.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Adds `n` to `counter`.
pub fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

/// Sub-buckets per power of two: the relative error of a recorded value is at most 1/64
/// (~1.6%).
const SUB_BUCKET_BITS: u32 = 6;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Values up to 2^40 ns (~18 minutes); larger ones count in the last bucket.
const MAX_EXPONENT: u32 = 40;
const BUCKETS: usize = (MAX_EXPONENT - SUB_BUCKET_BITS + 2) as usize * SUB_BUCKETS;

/// A latency histogram of nanoseconds with log-linear buckets (HdrHistogram's layout: 64
/// linear sub-buckets per power of two), recorded lock-free from the fault path and read at
/// any time. Written by hand rather than with the `hdrhistogram` crate: its concurrent form
/// needs recorder handles and a refresh that blocks, where this is one relaxed atomic add.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }
}

/// The bucket of `ns`.
fn bucket_of(ns: u64) -> usize {
    let Some(exponent) = ns.checked_ilog2().filter(|&e| e >= SUB_BUCKET_BITS) else {
        return usize::try_from(ns).unwrap_or(0); // below 64: one bucket per value
    };
    let exponent = exponent.min(MAX_EXPONENT);
    let sub = usize::try_from((ns >> (exponent - SUB_BUCKET_BITS)) & (SUB_BUCKETS as u64 - 1)).unwrap_or(0);
    ((exponent - SUB_BUCKET_BITS + 1) as usize * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

/// The largest value (ns) bucket `index` holds.
fn upper_of(index: usize) -> u64 {
    let (block, sub) = (index / SUB_BUCKETS, (index % SUB_BUCKETS) as u64);
    if block == 0 {
        return sub;
    }
    ((SUB_BUCKETS as u64 + sub + 1) << (block - 1)) - 1
}

impl Histogram {
    /// Counts one latency.
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Adds every count of `other` (per-snapshot totals, VMs that are forgotten).
    pub fn absorb(&self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            mine.fetch_add(theirs.load(Relaxed), Relaxed);
        }
        self.sum_ns.fetch_add(other.sum_ns.load(Relaxed), Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// Their sum, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns.load(Relaxed) as f64 / 1e9
    }

    /// The value at quantile `q` (0..=1) in microseconds, within 1.6%; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen as f64 >= (q * total as f64).max(1.0) {
                return upper_of(index) as f64 / 1000.0;
            }
        }
        upper_of(BUCKETS - 1) as f64 / 1000.0
    }

    /// Counts per `bounds` (seconds, ascending), non-cumulative, with a last +Inf bucket: the
    /// buckets of a Prometheus histogram. A fine bucket counts under the first bound not below
    /// its largest value.
    pub fn buckets_seconds(&self, bounds: &[f64]) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = bounds.iter().map(|&b| (b, 0)).chain([(f64::INFINITY, 0)]).collect();
        for (index, bucket) in self.buckets.iter().enumerate() {
            let count = bucket.load(Relaxed);
            if count > 0 {
                let seconds = upper_of(index) as f64 / 1e9;
                let slot = out.iter().position(|&(bound, _)| seconds <= bound).unwrap_or(out.len() - 1);
                out[slot].1 += count;
            }
        }
        out
    }
}

macro_rules! vm_counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Counters of one VM. Page counts are in 4 KiB pages whatever the region's page size.
        #[derive(Default)]
        pub struct VmStats {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
            /// Fault-service latency: from the start of serving a fault to its page placed.
            pub latency: Histogram,
            /// vCPU stall: from the fault event's read to its page placed and the thread woken
            /// (the time it waited behind other faults and installs included).
            pub stall: Histogram,
        }

        /// A serialisable view of [`VmStats`].
        #[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
        pub struct VmStatsReport {
            $($(#[doc = $doc])+ pub $name: u64,)+
            /// Bytes copied from the snapshot by demand faults.
            pub copied_bytes: u64,
            /// Median fault-service latency (within 1.6%).
            pub fault_latency_p50_us: f64,
            /// 99th percentile fault-service latency (within 1.6%).
            pub fault_latency_p99_us: f64,
            /// Median vCPU stall per fault (within 1.6%).
            #[serde(default)]
            pub stall_p50_us: f64,
            /// 99th percentile vCPU stall per fault.
            #[serde(default)]
            pub stall_p99_us: f64,
            /// Total vCPU stall, all faults of the VM, in milliseconds.
            #[serde(default)]
            pub stall_total_ms: f64,
        }

        impl VmStats {
            /// Adds every counter and histogram of `other` to these.
            pub fn absorb(&self, other: &VmStats) {
                $(self.$name.fetch_add(other.$name.load(Relaxed), Relaxed);)+
                self.latency.absorb(&other.latency);
                self.stall.absorb(&other.stall);
            }

            /// The counters now.
            pub fn report(&self) -> VmStatsReport {
                let report = VmStatsReport {
                    $($name: self.$name.load(Relaxed),)+
                    copied_bytes: 0,
                    fault_latency_p50_us: self.latency.quantile_us(0.5),
                    fault_latency_p99_us: self.latency.quantile_us(0.99),
                    stall_p50_us: self.stall.quantile_us(0.5),
                    stall_p99_us: self.stall.quantile_us(0.99),
                    stall_total_ms: self.stall.sum_seconds() * 1e3,
                };
                VmStatsReport { copied_bytes: report.copied_pages * crate::addr::BASE_PAGE, ..report }
            }
        }

        impl VmStatsReport {
            /// Every counter as `name=value`, in one line (the log line, the stats table).
            pub fn summary(&self) -> String {
                let mut line = String::new();
                $(line.push_str(&format!("{}={} ", stringify!($name), self.$name));)+
                line.push_str(&format!(
                    "copied_bytes={} fault_p50_us={} fault_p99_us={} stall_p50_us={} stall_p99_us={} stall_total_ms={:.3}",
                    self.copied_bytes, self.fault_latency_p50_us, self.fault_latency_p99_us,
                    self.stall_p50_us, self.stall_p99_us, self.stall_total_ms
                ));
                line
            }
        }
    };
}

vm_counters! {
    /// Page-fault events served.
    faults,
    /// Pages placed from the snapshot with UFFDIO_COPY by demand faults.
    copied_pages,
    /// Zero pages mapped with UFFDIO_ZEROPAGE by demand faults (read faults on all-zero pages).
    zeropage_pages,
    /// Zero pages placed by copying from a zero buffer (write faults, hugetlbfs).
    zero_copied_pages,
    /// Faults on removed (ballooned) ranges, served as zeros.
    removed_faults,
    /// REMOVE events received.
    remove_events,
    /// Faults that found part of their cluster present (placed by a concurrent fault or a
    /// prefetch) and woke it.
    already_present,
    /// Pages the prefetch plan (or synchronous install) holds.
    prefetch_planned_pages,
    /// Pages placed by prefetch or synchronous install.
    prefetched_pages,
    /// Planned pages found present (a demand fault came first).
    prefetch_present_pages,
    /// Planned pages skipped because the guest removed them.
    prefetch_removed_pages,
    /// Planned pages in deferred batches (seen in fewer than half the runs).
    prefetch_deferred_pages,
    /// Demand faults while the background prefetch was still running.
    faults_during_prefetch,
    /// Demand faults in a plan batch nobody had started: the fault thread placed the batch.
    faults_unreached_plan,
    /// Demand faults on pages outside the plan.
    faults_outside_plan,
    /// Microseconds from attach until the prefetch finished (0: not finished).
    prefetch_done_us,
    /// Microseconds spent loading the working set and planning, before the first fault is served.
    prefetch_plan_us,
    /// Microseconds from attach until the plan's first batch was placed (0: none yet).
    prefetch_first_batch_us,
    /// Pages placed from a loading-set file rather than from the snapshot.
    loading_set_pages,
    /// Panics contained: a dropped prefetch or learning stage, or a VM ended by one.
    stage_panics,
    /// Pages poisoned because their bytes could not be had (the memory file changed or failed).
    poisoned_pages,
    /// 1 for a VM this server took over from a predecessor (a handover or crash recovery).
    taken_over,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent_of_the_values_fed() {
        let h = Histogram::default();
        assert_eq!(h.quantile_us(0.5), 0.0);
        // 1, 2, … 1000 µs: the q quantile is q × 1000 µs.
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, expected) in [(0.01, 10.0), (0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.quantile_us(q);
            assert!((got - expected).abs() / expected <= 0.02, "q{q}: {got} µs, expected {expected}");
        }
        assert_eq!(h.count(), 1000);
        assert!((h.sum_seconds() - 0.5005).abs() < 1e-9);
        h.record(Duration::from_secs(3600)); // beyond the range: the last bucket
        assert_eq!(h.count(), 1001);
    }

    #[test]
    fn buckets_round_trip_and_prometheus_buckets_add_up() {
        for ns in [0u64, 1, 63, 64, 65, 127, 128, 1000, 4095, 4096, 1 << 30, (1 << 40) - 1] {
            let bucket = bucket_of(ns);
            assert!(upper_of(bucket) >= ns && (bucket == 0 || upper_of(bucket - 1) < ns), "{ns}");
        }
        let h = Histogram::default();
        // Clear of the bounds: a value within 1.6% above a bound may count under the next.
        for ns in [900u64, 3_000, 30_000, 300_000, 3_000_000, 300_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let buckets = h.buckets_seconds(&[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]);
        let counts: Vec<u64> = buckets.iter().map(|&(_, c)| c).collect();
        assert_eq!(counts, vec![1, 1, 1, 1, 1, 0, 1], "each value under the first bound not below it");
        let merged = Histogram::default();
        merged.absorb(&h);
        merged.absorb(&h);
        assert_eq!(merged.count(), 12);
    }

    #[test]
    fn the_summary_names_every_counter_once() {
        let stats = VmStats::default();
        count(&stats.faults, 3);
        count(&stats.copied_pages, 2);
        let summary = stats.report().summary();
        assert!(summary.starts_with("faults=3 copied_pages=2 "), "{summary}");
        assert!(summary.contains(" stage_panics=0 ") && summary.contains("copied_bytes=8192 "), "{summary}");
        assert_eq!(summary.matches("faults=").count(), 2, "faults and removed_faults, each once");
    }
}
