//! Working sets of microVM restores: what a function touches, learned across many runs, and
//! how to bring it in ahead of the guest.
//!
//! Data flow, one module each: [`record`] (one run's first touches, bounded by a window) →
//! [`working_set`] (the union over runs, with per-page statistics) → [`format`] (the file,
//! merged atomically) → [`policy`] (which pages, when) → [`plan`] (contiguous batches in
//! priority order) → [`prefetcher`] (which batch next, following the guest); [`loading_set`]
//! stores a plan with its bytes for snapshots read from disk.
//!
//! A working set is a hint, never data: a stale or lost one may cost a wasted copy or a demand
//! fault, it can never make the server serve a wrong byte.

#![warn(missing_docs)]

pub mod format;
pub mod identity;
pub mod loading_set;
pub mod plan;
pub mod policy;
pub mod prefetcher;
pub mod record;
pub mod working_set;

/// Index of a 4 KiB page in a snapshot memory file (file offset / 4096).
pub type PageIndex = u64;

/// FNV-1a, 64 bit, continuing from `state` ([`FNV_OFFSET`] to start): the fingerprint of a
/// snapshot, the checksum of a working-set file, the digest of a memory file's stamp. Any change
/// confined to one byte always changes it (each step is a bijection of the state).
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// FNV-1a's initial state.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
