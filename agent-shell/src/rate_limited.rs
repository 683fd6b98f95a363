//! Warnings about refusals at most once per period: a flood of refused
//! connections or RPCs must show in the log without flooding it (the
//! metrics count every one).
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a refusal of one kind is logged at most.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A warning that is due at most once per [`WARN_EVERY`].
#[derive(Debug)]
pub struct RateLimited {
    /// When it was last due, and how many times it was not due since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub const fn new() -> Self {
        Self { state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` if the warning is due now, `n` the times it was skipped
    /// since it was last due; `None` if it was due less than
    /// [`WARN_EVERY`] ago.
    pub fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, skipped) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|last| now.duration_since(last) < WARN_EVERY) {
            *skipped += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(skipped))
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_period_with_the_count_skipped() {
        let warning = RateLimited::new();
        assert_eq!(warning.due(), Some(0));
        assert_eq!(warning.due(), None);
        assert_eq!(warning.due(), None);
        warning.state.lock().expect("lock").0 = Some(Instant::now() - WARN_EVERY);
        assert_eq!(warning.due(), Some(2));
    }
}
