//! Retrying what fails transiently: bounded by a deadline, with exponential backoff.

use std::time::{Duration, Instant};

/// How long to keep trying a request that fails transiently.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Give up once this much time has passed since the first try.
    pub deadline: Duration,
    /// The first wait; each next one doubles, up to [`RetryPolicy::max_backoff`].
    pub first_backoff: Duration,
    /// The longest wait between tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's deadline passes; `retry_on`
/// says which failures are worth another try.
pub fn retry<T, E>(
    policy: &RetryPolicy,
    retry_on: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    loop {
        match attempt() {
            Err(e) if retry_on(&e) && started.elapsed() + backoff < policy.deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(policy.max_backoff);
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_stops_at_success_at_a_permanent_error_and_at_the_deadline() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(200),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
        };
        let mut tries = 0;
        assert_eq!(
            retry(
                &policy,
                |_: &bool| true,
                || {
                    tries += 1;
                    if tries < 3 {
                        Err(true)
                    } else {
                        Ok(tries)
                    }
                }
            ),
            Ok(3)
        );
        tries = 0;
        assert_eq!(
            retry(
                &policy,
                |transient: &bool| *transient,
                || {
                    tries += 1;
                    Err::<(), _>(false)
                }
            ),
            Err(false)
        );
        assert_eq!(tries, 1, "a permanent error is not retried");
        let started = Instant::now();
        assert_eq!(retry(&policy, |_: &bool| true, || Err::<(), _>(true)), Err(true));
        assert!(started.elapsed() < Duration::from_secs(2), "gives up at the deadline");
    }
}
