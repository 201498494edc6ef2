//! Measurements shared by the benchmarks (`benches/`) and the latency experiments
//! (`src/bin/experiments`): one implementation of each, run with more rounds by the benches.

pub mod bandwidth;
pub mod delay_proxy;
pub mod fault_path;

/// The median of `values` (NaN if empty).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The `q` quantile of `values` by nearest rank (NaN if empty).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[vmm_shim::share(v.len() - 1, q)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_of_the_sorted_values() {
        let values = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&values), 3.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 0.99), 5.0);
        assert!(median(&[]).is_nan());
    }
}
