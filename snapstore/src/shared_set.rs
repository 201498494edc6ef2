//! A working set many hosts learn into at once, in a bucket.
//!
//! No host ever rewrites what another wrote. The set pushed with the snapshot is the base
//! (`working-sets/NAME`); each run a host records, and each batch of pages it learns online, is
//! an object of its own (`working-sets/NAME.runs/HOST-PID-NANOS-RANDOM`), written once. A reader
//! merges the base with every run object: a union, which merges in any order and so needs no
//! coordination. `compact` folds the run objects it listed into the base, then deletes exactly
//! those keys: a run written meanwhile has another key and stays. Run one compactor at a time
//! (two racing on the base could each drop the other's folded runs).

use crate::bucket::{retry, Bucket, BucketError, Lane, RetryPolicy};
use crate::push::{working_set_relative, PushError};
use prefetch::identity::SnapshotIdentity;
use prefetch::working_set::WorkingSet;

/// The key prefix of snapshot `name`'s run objects.
fn runs_relative(name: &str) -> Result<String, PushError> {
    Ok(format!("{}.runs/", working_set_relative(name)?))
}

/// Publishes `learned` (a set holding what one VM taught: a run, or pages learned online) as a
/// run object of its own; its key.
pub fn publish(bucket: &Bucket, name: &str, learned: &WorkingSet, policy: &RetryPolicy) -> Result<String, PushError> {
    let bytes = prefetch::format::encode(learned)
        .map_err(|e| PushError::WorkingSet { path: name.into(), reason: e.to_string() })?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let unique = blake3::hash(format!("{host}{nanos}{:?}", std::thread::current().id()).as_bytes()).to_hex();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let key = format!("{}{host}-{}-{nanos}-{}", runs_relative(name)?, std::process::id(), &unique[..12]);
    retry(policy, BucketError::is_transient, || bucket.put(&key, &bytes))?;
    Ok(key)
}

/// Snapshot `name`'s working set as all hosts have learned it: the base merged with every run
/// object (those of another snapshot's identity, or unreadable, are skipped with a warning).
/// None if there is neither. Also the run keys merged.
pub fn merged(
    bucket: &Bucket,
    name: &str,
    identity: &SnapshotIdentity,
    policy: &RetryPolicy,
) -> Result<Option<(WorkingSet, Vec<String>)>, PushError> {
    let decode = |key: &str, bytes: &[u8]| match prefetch::format::decode(bytes, identity) {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(key, "working set skipped: {e}");
            None
        }
    };
    let base_key = working_set_relative(name)?;
    let base = retry(policy, BucketError::is_transient, || bucket.get(&base_key, Lane::Background))?;
    let mut set = base.and_then(|bytes| decode(&base_key, &bytes));
    let keys: Vec<String> =
        retry(policy, BucketError::is_transient, || bucket.list(&runs_relative(name).unwrap_or_default()))?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
    let mut merged_keys = Vec::new();
    for key in keys {
        let Some(run) = retry(policy, BucketError::is_transient, || bucket.get(&key, Lane::Background))?
            .and_then(|b| decode(&key, &b))
        else {
            continue;
        };
        set.get_or_insert_with(|| WorkingSet::new(*identity)).merge_set(&run);
        merged_keys.push(key);
    }
    Ok(set.map(|set| (set, merged_keys)))
}

/// Folds every run object into the base; the number of runs folded.
pub fn compact(
    bucket: &Bucket,
    name: &str,
    identity: &SnapshotIdentity,
    policy: &RetryPolicy,
) -> Result<usize, PushError> {
    let Some((set, keys)) = merged(bucket, name, identity, policy)? else { return Ok(0) };
    if keys.is_empty() {
        return Ok(0);
    }
    let bytes = prefetch::format::encode(&set)
        .map_err(|e| PushError::WorkingSet { path: name.into(), reason: e.to_string() })?;
    let base_key = working_set_relative(name)?;
    retry(policy, BucketError::is_transient, || bucket.put(&base_key, &bytes))?;
    for key in &keys {
        retry(policy, BucketError::is_transient, || bucket.delete(key))?;
    }
    Ok(keys.len())
}
