//! Where the migration is: its phase, and why it failed if it did.
//!
//! Phases only move forward, and `Failed` is final: once a migration has
//! failed nothing reports it complete, whatever finishes afterwards. The
//! phase is published on a watch channel so that gRPC health follows it
//! (NOT_SERVING once failed, see [`crate::service`]).
#![forbid(unsafe_code)]

use std::sync::Mutex;

use pageserver_proto::v1::MigrationPhase;
use tokio::sync::watch;

/// Migration phase of the target agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    WaitingForHandoff,
    Precopy,
    PrecopyConverged,
    Postcopy,
    Complete,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::WaitingForHandoff,
        Phase::Precopy,
        Phase::PrecopyConverged,
        Phase::Postcopy,
        Phase::Complete,
        Phase::Failed,
    ];

    /// The `phase` label of `pageserver_target_phase` and the word in logs.
    pub fn name(self) -> &'static str {
        MigrationPhase::from(self).label()
    }
}

impl From<Phase> for MigrationPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::WaitingForHandoff => MigrationPhase::WaitingForHandoff,
            Phase::Precopy => MigrationPhase::Precopy,
            Phase::PrecopyConverged => MigrationPhase::PrecopyConverged,
            Phase::Postcopy => MigrationPhase::Postcopy,
            Phase::Complete => MigrationPhase::Complete,
            Phase::Failed => MigrationPhase::Failed,
        }
    }
}

/// The current phase and the failure, shared by everything in the agent.
#[derive(Debug)]
pub struct PhaseTracker {
    phase: watch::Sender<Phase>,
    /// The first reason the migration failed for.
    error: Mutex<Option<String>>,
}

impl Default for PhaseTracker {
    fn default() -> Self {
        Self { phase: watch::Sender::new(Phase::WaitingForHandoff), error: Mutex::new(None) }
    }
}

impl PhaseTracker {
    pub fn get(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves forward to `to`; returns false (and changes nothing) if the
    /// migration is already there or further, or has failed. Use
    /// [`PhaseTracker::fail`] to fail it.
    pub fn advance(&self, to: Phase) -> bool {
        debug_assert_ne!(to, Phase::Failed, "failing goes through fail(), with a reason");
        self.phase.send_if_modified(|current| {
            let forward = *current < to && *current != Phase::Failed && to != Phase::Failed;
            if forward {
                *current = to;
            }
            forward
        })
    }

    /// Fails the migration (from any phase, even `Complete`: a fault loop
    /// that dies after completion can no longer serve the guest). The first
    /// reason is kept; later ones are only logged.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        {
            let mut error = self.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match &*error {
                None => {
                    tracing::error!("migration failed: {reason}");
                    *error = Some(reason);
                }
                Some(first) => tracing::error!("after the migration failed ({first}): {reason}"),
            }
        }
        self.phase.send_if_modified(|current| std::mem::replace(current, Phase::Failed) != Phase::Failed);
    }

    /// Fails the migration with `reason` only if `still` holds for its
    /// phase, decided under the phase's lock: no phase change slips in
    /// between (a stop that fails a migration before its switchover, and
    /// the migration completing, cannot both happen). Returns whether it
    /// failed it; `still` is never asked about `Failed`.
    pub fn fail_if(&self, still: impl FnOnce(Phase) -> bool, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.phase.send_if_modified(|current| {
            if *current == Phase::Failed || !still(*current) {
                return false;
            }
            let mut error = self.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if error.is_none() {
                tracing::error!("migration failed: {reason}");
                *error = Some(reason);
            }
            *current = Phase::Failed;
            true
        })
    }

    /// Why the migration failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Watches the phase (for health).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let p = PhaseTracker::default();
        assert!(p.advance(Phase::Precopy));
        assert!(p.advance(Phase::Postcopy));
        assert!(!p.advance(Phase::PrecopyConverged), "no way back");
        assert!(!p.advance(Phase::Postcopy), "no change is not an advance");
        assert_eq!(p.get(), Phase::Postcopy);
    }

    #[test]
    fn failed_is_final_and_keeps_the_first_reason() {
        let p = PhaseTracker::default();
        p.advance(Phase::Complete);
        p.fail("the fault loop stopped");
        p.fail("something later");
        assert_eq!(p.get(), Phase::Failed);
        assert!(!p.advance(Phase::Complete), "a failed migration never completes");
        assert_eq!(p.error().as_deref(), Some("the fault loop stopped"));
    }

    #[test]
    fn fail_if_fails_only_in_the_phases_it_is_told() {
        let p = PhaseTracker::default();
        p.advance(Phase::Postcopy);
        assert!(!p.fail_if(|phase| phase < Phase::Postcopy, "abandoned"), "post-copy is not before the switchover");
        assert_eq!((p.get(), p.error()), (Phase::Postcopy, None));
        assert!(p.fail_if(|phase| phase < Phase::Complete, "the grace ran out"));
        assert_eq!((p.get(), p.error().as_deref()), (Phase::Failed, Some("the grace ran out")));
        assert!(!p.fail_if(|_| true, "again"), "failed is final");
        assert_eq!(p.error().as_deref(), Some("the grace ran out"));
    }

    #[test]
    fn subscribers_see_the_failure() {
        let p = PhaseTracker::default();
        let mut rx = p.subscribe();
        p.fail("boom");
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(*rx.borrow_and_update(), Phase::Failed);
    }
}
