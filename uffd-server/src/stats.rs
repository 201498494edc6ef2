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

/// Log2 buckets of nanoseconds: bucket i counts latencies in [2^i, 2^(i+1)) ns; 2^40 ns ≈ 18 min.
const BUCKETS: usize = 40;

/// A fault-service latency histogram with power-of-two buckets.
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        let bucket = (ns.ilog2() as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Relaxed);
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen as f64 >= (q * total as f64).max(1.0) {
                return (1u64 << (i + 1)) as f64 / 1000.0;
            }
        }
        (1u64 << BUCKETS) as f64 / 1000.0
    }
}

macro_rules! vm_counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Counters of one VM. Page counts are in 4 KiB pages whatever the region's page size.
        #[derive(Default)]
        pub struct VmStats {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
            /// Fault-service latency.
            pub latency: LatencyHistogram,
        }

        /// A serialisable view of [`VmStats`].
        #[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
        pub struct VmStatsReport {
            $($(#[doc = $doc])+ pub $name: u64,)+
            /// Bytes copied from the snapshot by demand faults.
            pub copied_bytes: u64,
            /// Median fault-service latency (upper bound of its power-of-two bucket).
            pub fault_latency_p50_us: f64,
            /// 99th percentile fault-service latency (upper bound of its bucket).
            pub fault_latency_p99_us: f64,
        }

        impl VmStats {
            /// The counters now.
            pub fn report(&self) -> VmStatsReport {
                let report = VmStatsReport {
                    $($name: self.$name.load(Relaxed),)+
                    copied_bytes: 0,
                    fault_latency_p50_us: self.latency.quantile_us(0.5),
                    fault_latency_p99_us: self.latency.quantile_us(0.99),
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
                    "copied_bytes={} fault_p50_us={} fault_p99_us={}",
                    self.copied_bytes, self.fault_latency_p50_us, self.fault_latency_p99_us
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
    /// Pages placed from a loading-set file rather than from the snapshot.
    loading_set_pages,
    /// Panics contained: a dropped prefetch or learning stage, or a VM ended by one.
    stage_panics,
    /// Pages poisoned because their bytes could not be had (the memory file changed or failed).
    poisoned_pages,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_report_bucket_upper_bounds() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), 0.0);
        for _ in 0..99 {
            h.record(Duration::from_nanos(5_000)); // bucket [4096, 8192) ns
        }
        h.record(Duration::from_millis(3)); // bucket [2^21, 2^22) ns
        assert_eq!(h.quantile_us(0.5), 8.192);
        assert_eq!(h.quantile_us(0.99), 8.192);
        assert_eq!(h.quantile_us(1.0), 4194.304);
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
