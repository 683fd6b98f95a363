//! The one retry policy of the page-server agents: exponential backoff from
//! an initial delay, doubling up to a cap, with optional jitter and an
//! optional limit on attempts.
//!
//! A [`Backoff`] is the state of one thing being retried (a connection, a
//! refused request): ask it for the next delay after each failure, reset it
//! after a success. When the attempts are used up it says so, and the caller
//! gives up loudly instead of retrying forever.
#![forbid(unsafe_code)]

use std::time::Duration;

/// How to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// No delay is longer than this.
    pub max: Duration,
    /// Failures allowed before giving up; `None`: retry for ever (the
    /// caller must bound the whole operation some other way).
    pub max_attempts: Option<u32>,
    /// Spread each delay uniformly over [delay/2, delay], so that many
    /// clients failing together do not retry together.
    pub jitter: bool,
}

impl BackoffPolicy {
    /// Starts retrying under this policy.
    pub fn start(self) -> Backoff {
        Backoff { policy: self, failures: 0, seed: initial_seed() }
    }
}

/// The retry state of one operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    /// xorshift state for the jitter (quality is irrelevant, cost matters).
    seed: u64,
}

/// Why there is no next delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// Failures seen (the policy's `max_attempts`).
    pub failures: u32,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gave up after {} attempts", self.failures)
    }
}

impl std::error::Error for Exhausted {}

impl Backoff {
    /// Records a failure; returns how long to wait before the next attempt,
    /// or [`Exhausted`] if the policy allows no more.
    pub fn next_delay(&mut self) -> Result<Duration, Exhausted> {
        self.failures = self.failures.saturating_add(1);
        if self.policy.max_attempts.is_some_and(|max| self.failures > max) {
            return Err(Exhausted { failures: self.failures - 1 });
        }
        let doublings = (self.failures - 1).min(31);
        let delay = self.policy.initial.saturating_mul(1u32 << doublings).min(self.policy.max);
        Ok(if self.policy.jitter { self.jittered(delay) } else { delay })
    }

    /// The operation succeeded: the next failure starts from the initial delay.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn jittered(&mut self, delay: Duration) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = delay / 2;
        let spread = half.as_nanos() as u64;
        half + Duration::from_nanos(if spread == 0 { 0 } else { self.seed % (spread + 1) })
    }
}

fn initial_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

#[cfg(test)]
mod tests;
