//! Whether the machine has a CPU to spare: then deferred prefetch batches need not wait.
//!
//! Deferred batches (pages few recorded runs touched) wait until the guest has not faulted for
//! a while, so that on a loaded machine they do not take CPU time from guests that need it
//! (experiment 5). But a guest that computes between its faults is never quiet that long.
//! It then faults on the deferred pages one by one, each fault costing what placing ~16 pages
//! would. When no thread is waiting for a CPU, placing them delays nobody.
//!
//! The test is the kernel's count of runnable threads (`nr_running`, the fourth field of
//! `/proc/loadavg`, the calling thread included) against the machine's online CPUs. It is read at
//! most once a millisecond for the whole server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// How long a reading holds.
const READING_HOLDS_US: u64 = 1000;

/// Whether no runnable thread on the machine waits for a CPU, as of the last millisecond.
pub fn machine_has_spare_cpu() -> bool {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static READ_AT_US: AtomicU64 = AtomicU64::new(u64::MAX);
    static SPARE: AtomicBool = AtomicBool::new(false);
    let now_us = u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX);
    let read_at = READ_AT_US.load(Ordering::Relaxed);
    if read_at != u64::MAX && now_us.saturating_sub(read_at) < READING_HOLDS_US {
        return SPARE.load(Ordering::Relaxed);
    }
    READ_AT_US.store(now_us, Ordering::Relaxed);
    let spare = runnable_threads().is_some_and(|runnable| runnable <= cpus());
    SPARE.store(spare, Ordering::Relaxed);
    spare
}

/// The machine's online CPUs (`nr_running` counts the whole machine's threads), counted once.
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| {
        let online = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN).ok().flatten();
        online.and_then(|n| usize::try_from(n).ok()).unwrap_or(1).max(1)
    })
}

/// Runnable threads on the machine now (None: unreadable; then nothing is spare).
fn runnable_threads() -> Option<usize> {
    parse_runnable(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// `nr_running` from `/proc/loadavg`: "0.52 0.58 0.59 3/467 12345" gives 3.
fn parse_runnable(loadavg: &str) -> Option<usize> {
    loadavg.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runnable_count_and_refuses_anything_else() {
        assert_eq!(parse_runnable("0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(parse_runnable("0.52 0.58 0.59 17/467 12345"), Some(17));
        assert_eq!(parse_runnable("0.52 0.58 0.59"), None);
        assert_eq!(parse_runnable("0.52 0.58 0.59 x/467 1"), None);
        // This machine's own file parses, and counts at least the thread reading it.
        assert!(runnable_threads().is_some_and(|n| n >= 1));
    }
}
