//! Per-VM counters, updated lock-free by the fault loop and read at any time by the stats
//! endpoint. Relaxed atomics: each counter is exact, a report is not an atomic cut across them.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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
    pub fn record(&self, latency: Duration) {
        let ns = latency.as_nanos().clamp(1, u64::MAX as u128) as u64;
        let bucket = (63 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Relaxed);
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return (1u64 << (i + 1)) as f64 / 1000.0;
            }
        }
        (1u64 << BUCKETS) as f64 / 1000.0
    }
}

/// Counters of one VM. Page counts are in 4 KiB pages whatever the region's page size.
#[derive(Default)]
pub struct VmStats {
    /// Page-fault events served.
    pub faults: AtomicU64,
    /// Pages placed from the snapshot with UFFDIO_COPY.
    pub copied_pages: AtomicU64,
    /// Zero pages mapped with UFFDIO_ZEROPAGE (read faults on all-zero snapshot pages).
    pub zeropage_pages: AtomicU64,
    /// Zero pages placed by copying from a zero buffer (write faults, hugetlbfs).
    pub zero_copied_pages: AtomicU64,
    /// Faults on removed (ballooned) ranges, served as zeros.
    pub removed_faults: AtomicU64,
    /// REMOVE events received.
    pub remove_events: AtomicU64,
    /// Faults whose page was already present (placed by a concurrent fault or prefetch).
    pub already_present: AtomicU64,
    pub latency: LatencyHistogram,
    /// Pages the prefetch plan (or synchronous install) holds.
    pub prefetch_planned_pages: AtomicU64,
    /// Pages placed by prefetch or synchronous install.
    pub prefetched_pages: AtomicU64,
    /// Planned pages found present (a demand fault came first).
    pub prefetch_present_pages: AtomicU64,
    /// Planned pages skipped because the guest removed them.
    pub prefetch_removed_pages: AtomicU64,
    /// Demand faults while the background prefetch was still running.
    pub faults_during_prefetch: AtomicU64,
    /// Demand faults in a plan batch nobody had started: the fault thread placed the batch.
    pub faults_unreached_plan: AtomicU64,
    /// Demand faults on pages outside the plan.
    pub faults_outside_plan: AtomicU64,
    /// Microseconds from attach until the background prefetch finished (0: not finished).
    pub prefetch_done_us: AtomicU64,
    /// Microseconds spent loading the working set and planning, before the first fault is served.
    pub prefetch_plan_us: AtomicU64,
    /// Pages placed from a loading-set file rather than from the snapshot.
    pub loading_set_pages: AtomicU64,
}

/// A serialisable view of [`VmStats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VmStatsReport {
    pub faults: u64,
    pub copied_pages: u64,
    pub copied_bytes: u64,
    pub zeropage_pages: u64,
    pub zero_copied_pages: u64,
    pub removed_faults: u64,
    pub remove_events: u64,
    pub already_present: u64,
    pub fault_latency_p50_us: f64,
    pub fault_latency_p99_us: f64,
    pub prefetch_planned_pages: u64,
    pub prefetched_pages: u64,
    pub prefetch_present_pages: u64,
    pub prefetch_removed_pages: u64,
    pub faults_during_prefetch: u64,
    pub faults_unreached_plan: u64,
    pub faults_outside_plan: u64,
    pub prefetch_done_us: u64,
    pub prefetch_plan_us: u64,
    pub loading_set_pages: u64,
}

impl VmStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn report(&self) -> VmStatsReport {
        let copied_pages = self.copied_pages.load(Relaxed);
        VmStatsReport {
            faults: self.faults.load(Relaxed),
            copied_pages,
            copied_bytes: copied_pages * crate::addr::BASE_PAGE,
            zeropage_pages: self.zeropage_pages.load(Relaxed),
            zero_copied_pages: self.zero_copied_pages.load(Relaxed),
            removed_faults: self.removed_faults.load(Relaxed),
            remove_events: self.remove_events.load(Relaxed),
            already_present: self.already_present.load(Relaxed),
            fault_latency_p50_us: self.latency.quantile_us(0.5),
            fault_latency_p99_us: self.latency.quantile_us(0.99),
            prefetch_planned_pages: self.prefetch_planned_pages.load(Relaxed),
            prefetched_pages: self.prefetched_pages.load(Relaxed),
            prefetch_present_pages: self.prefetch_present_pages.load(Relaxed),
            prefetch_removed_pages: self.prefetch_removed_pages.load(Relaxed),
            faults_during_prefetch: self.faults_during_prefetch.load(Relaxed),
            faults_unreached_plan: self.faults_unreached_plan.load(Relaxed),
            faults_outside_plan: self.faults_outside_plan.load(Relaxed),
            prefetch_done_us: self.prefetch_done_us.load(Relaxed),
            prefetch_plan_us: self.prefetch_plan_us.load(Relaxed),
            loading_set_pages: self.loading_set_pages.load(Relaxed),
        }
    }
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
}
