//! Rate limits for the log lines a peer can trigger at will (stray bytes, refused handshakes,
//! faults that cannot be served): a VMM must not be able to fill the disk with our log.
//!
//! Each limiter lets [`LINES_PER_SECOND`] lines through per second and counts the rest; the
//! first line of a later second says how many were suppressed.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Lines let through per second by one limiter.
pub const LINES_PER_SECOND: u32 = 10;

/// One limiter: per VM, or per snapshot socket for refused connections.
pub struct LogLimit {
    window_start: Cell<Instant>,
    lines: Cell<u32>,
    suppressed: Cell<u64>,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit { window_start: Cell::new(Instant::now()), lines: Cell::new(0), suppressed: Cell::new(0) }
    }
}

impl LogLimit {
    /// Whether a line may be logged now; if lines were suppressed before, says so first.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        if now.duration_since(self.window_start.get()) >= Duration::from_secs(1) {
            self.window_start.set(now);
            self.lines.set(0);
            let suppressed = self.suppressed.replace(0);
            if suppressed > 0 {
                tracing::warn!(suppressed, "log lines suppressed (more than {LINES_PER_SECOND} a second)");
            }
        }
        if self.lines.get() < LINES_PER_SECOND {
            self.lines.set(self.lines.get() + 1);
            true
        } else {
            self.suppressed.set(self.suppressed.get() + 1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_ten_lines_a_second_through() {
        let limit = LogLimit::default();
        let t0 = limit.window_start.get();
        let allowed = (0..1000).filter(|_| limit.allow_at(t0)).count();
        assert_eq!((allowed, limit.suppressed.get()), (10, 990));
        assert!(limit.allow_at(t0 + Duration::from_millis(1500)), "a new second");
        assert_eq!(limit.suppressed.get(), 0, "reported and reset");
    }
}
