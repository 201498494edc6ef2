//! Prefetch policies, and the plan each one makes of a working set.
//!
//! The policies are the ones the experiments compare: nothing (lazy), SnapFaaS's eager copy,
//! REAP's first recorded run placed synchronously, and ours, the union over runs placed in the
//! background with the pages most runs need first.

use crate::plan::{plan, Plan, PlanConfig};
use crate::working_set::WorkingSet;
use crate::PageIndex;

/// What is brought in ahead of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchPolicy {
    /// Nothing: every page comes by demand fault (lazy).
    None,
    /// The whole snapshot, before the first fault is served (SnapFaaS). Its plan covers the
    /// guest's regions, which only the server knows: see [`Plan::whole`].
    Eager,
    /// The first recorded run, synchronously before the first fault is served (REAP).
    Reap,
    /// The union over recorded runs, in the background in priority order (ours).
    Union,
}

impl PrefetchPolicy {
    /// Whether the policy plans from a working set.
    pub fn needs_working_set(self) -> bool {
        matches!(self, PrefetchPolicy::Reap | PrefetchPolicy::Union)
    }
}

/// The plan `policy` makes of `set`: `reap` the first run in first-touch order, placed before
/// the first fault; `union` the pages seen in at least `min_frequency` of the runs, in the
/// background, with the pages seen in fewer than half the runs deferred. `none` and `eager`
/// plan nothing from a working set. `is_zero` tells all-zero snapshot pages.
pub fn plan_for(
    set: &WorkingSet,
    policy: PrefetchPolicy,
    min_frequency: f64,
    is_zero: impl Fn(PageIndex) -> bool,
    config: PlanConfig,
) -> Plan {
    match policy {
        PrefetchPolicy::None | PrefetchPolicy::Eager => Plan::default(),
        PrefetchPolicy::Reap => {
            let first_run: Vec<(PageIndex, f64)> =
                set.first_run.iter().enumerate().map(|(rank, &page)| (page, rank as f64)).collect();
            let batches = plan(&first_run, is_zero, config);
            Plan { deferred_from: batches.len(), batches, synchronous: true }
        }
        PrefetchPolicy::Union => {
            Plan::background(plan(&set.select(min_frequency), is_zero, config), Some(set.minority_priority()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SnapshotIdentity;
    use crate::record::{Run, Touch};

    fn set() -> WorkingSet {
        let mut set = WorkingSet::new(SnapshotIdentity { len: 1 << 20, fingerprint: 1 });
        let run = |pages: &[u64]| Run { touches: pages.iter().map(|&page| Touch { page, write: false }).collect() };
        set.merge(&run(&[40, 10, 20]));
        set.merge(&run(&[10, 20, 90]));
        set.merge(&run(&[10, 20, 70]));
        set
    }

    #[test]
    fn each_policy_plans_what_it_promises() {
        let config = PlanConfig { bridge_gap_pages: 0, max_batch_pages: 16 };
        let firsts = |plan: &Plan| plan.batches.iter().map(|b| b.first_page).collect::<Vec<_>>();
        let reap = plan_for(&set(), PrefetchPolicy::Reap, 0.0, |_| false, config);
        assert_eq!((firsts(&reap), reap.synchronous), (vec![40, 10, 20], true));
        let union = plan_for(&set(), PrefetchPolicy::Union, 0.0, |_| false, config);
        // 10 and 20 (every run) first; then, deferred, the pages of one run each by mean rank
        // (40: rank 0; 70 and 90: rank 2, the lower page first).
        assert_eq!(firsts(&union), vec![10, 20, 40, 70, 90]);
        assert_eq!((union.deferred_from, union.synchronous), (2, false));
        let majority = plan_for(&set(), PrefetchPolicy::Union, 0.5, |_| false, config);
        assert_eq!(firsts(&majority), vec![10, 20]);
        assert!(plan_for(&set(), PrefetchPolicy::None, 0.0, |_| false, config).is_empty());
        assert!(PrefetchPolicy::Union.needs_working_set() && !PrefetchPolicy::Eager.needs_working_set());
    }
}
