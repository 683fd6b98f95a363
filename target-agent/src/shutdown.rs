//! What stopping the target agent (SIGTERM or SIGINT) means, phase by
//! phase. The gRPC server and `/metrics` keep serving until the stop is
//! decided, so that an operator sees what happens; then the agent shuts
//! down as usual and exits with the outcome.
//!
//! | phase at the stop | what the agent does | exit |
//! |---|---|---|
//! | `waiting-for-handoff`, no VMM has handed its memory over | nothing to do: the agent never got work | 0 |
//! | `waiting-for-handoff` with a hand-off in, `precopy`, `precopy-converged` | the source VM still runs and nothing was installed into the target guest, which has not run: the migration is abandoned at once (phase `failed`: "migration abandoned in phase X: the source VM still runs; nothing was installed") | 1 |
//! | `postcopy` (or `Switchover` called, post-copy not yet begun) | the guest runs here and needs the source's pages: the agent keeps serving faults and pulling pages for up to `--shutdown-grace`, and logs that it is finishing. Complete within the grace: as `complete` below. Not complete: the migration fails, the reason naming the pages that still need the source, on which the guest will freeze | 0 / 1 |
//! | `complete` | the guest's memory is handed back to the kernel (the range is unregistered from the userfaultfd), so that a later fault (a hole touched for the first time, a page the VMM dropped) is served by the kernel, not left waiting for an agent that is gone | 0 |
//! | `failed` | nothing more: the guest stays frozen on what it cannot have | 1 |
//!
//! A second SIGTERM or SIGINT during the grace ends it at once (the
//! migration then fails as when the grace runs out). gRPC health follows
//! the phase: SERVING while the agent serves the guest, NOT_SERVING once the
//! migration failed (abandoned included).
//!
//! The stop and `Switchover` cannot cross: abandoning decides under the
//! phase's lock that no `Switchover` has been seen, and a `Switchover` that
//! comes later finds the migration failed and is refused
//! ([`TargetAgent::request_switchover`]), so an orchestrator never resumes a
//! target guest that this agent has abandoned.
#![forbid(unsafe_code)]

mod pending;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::TargetAgent;
use crate::phase::Phase;

pub use pending::{PendingPages, release_guest};

/// `--shutdown-grace`'s default: how long a stop in post-copy waits for the
/// migration to complete.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// No VMM ever handed its memory over.
    Idle,
    /// The migration was complete; the guest's memory is the kernel's again.
    Complete,
    /// The migration failed, before the stop or because of it.
    Failed { reason: String },
    /// The migration was complete, but its memory could not be handed back
    /// to the kernel: the guest waits for ever on a later fault.
    NotReleased { error: String },
}

/// Why the agent exits non-zero after a stop.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("the migration failed: {reason}")]
    Failed { reason: String },
    #[error(
        "the migration completed, but handing the guest's memory back to the kernel failed ({error}): a later fault \
         on a page not yet mapped will wait for ever"
    )]
    NotReleased { error: String },
}

impl Stopped {
    /// The outcome as the process's result.
    pub fn into_result(self) -> Result<(), StopError> {
        match self {
            Stopped::Idle | Stopped::Complete => Ok(()),
            Stopped::Failed { reason } => Err(StopError::Failed { reason }),
            Stopped::NotReleased { error } => Err(StopError::NotReleased { error }),
        }
    }

    /// The outcome as the phase says it now, without acting (for an agent
    /// whose server stopped without a signal).
    pub fn as_it_is(agent: &TargetAgent) -> Self {
        match agent.phase.get() {
            Phase::Failed => Stopped::Failed { reason: agent.phase.error().unwrap_or_default() },
            Phase::Complete => Stopped::Complete,
            _ => Stopped::Idle,
        }
    }
}

/// Carries out a stop requested just now, as the module docs say; returns
/// once the agent may stop serving. `another_signal` completes at the next
/// SIGTERM or SIGINT, which cuts a grace short.
pub async fn stop(agent: &Arc<TargetAgent>, grace: Duration, another_signal: impl Future<Output = ()>) -> Stopped {
    let mut another_signal = std::pin::pin!(another_signal);
    loop {
        let phase = agent.phase.get();
        match phase {
            Phase::WaitingForHandoff if agent.handoff.handed_over().is_none() => {
                tracing::info!("stopped before any VMM handed its memory over: nothing to do");
                return Stopped::Idle;
            }
            Phase::Failed => return Stopped::as_it_is(agent),
            Phase::Complete => return release(agent),
            _ if phase < Phase::Postcopy && !agent.switchover_requested() => {
                if let Some(stopped) = abandon(agent, phase) {
                    return stopped;
                }
                // Switchover (or the migration's end) came first: look again.
            }
            _ => return finish_postcopy(agent, grace, another_signal.as_mut()).await,
        }
    }
}

/// Fails a migration that has not switched over; `None` if it switched over
/// (or ended) meanwhile.
fn abandon(agent: &TargetAgent, phase: Phase) -> Option<Stopped> {
    let reason =
        format!("migration abandoned in phase {}: the source VM still runs; nothing was installed", phase.name());
    let before_switchover = |now: Phase| now < Phase::Postcopy && !agent.switchover_requested();
    if !agent.phase.fail_if(before_switchover, &reason) {
        return None;
    }
    close_gate(agent);
    Some(Stopped::Failed { reason })
}

/// Serves the guest for up to `grace` while post-copy finishes.
async fn finish_postcopy(
    agent: &Arc<TargetAgent>,
    grace: Duration,
    another_signal: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Stopped {
    tracing::warn!(
        "stopping during post-copy: the guest runs here and needs the source's pages; finishing the migration \
         for up to {grace:?} (--shutdown-grace) before giving up"
    );
    let mut phase = agent.phase.subscribe();
    let over = phase.wait_for(|phase| *phase >= Phase::Complete);
    let cut_short = tokio::select! {
        _ = tokio::time::timeout(grace, over) => false,
        () = another_signal => true,
    };
    if let Some(stopped) = ended(agent) {
        return stopped;
    }
    let pending = agent.guest.get().map(|guest| PendingPages::of(guest));
    let pages = pending.map_or_else(|| "no guest memory".to_owned(), |pending| pending.to_string());
    let why = if cut_short {
        "a second stop signal ended the shutdown grace".to_owned()
    } else {
        format!("post-copy did not complete within the {grace:?} shutdown grace")
    };
    let reason = format!(
        "stopped during post-copy: {why}; {pages}: the guest will freeze on them (and, once this agent has \
         exited, on every page not yet mapped)"
    );
    if agent.phase.fail_if(|now| now < Phase::Complete, &reason) {
        close_gate(agent);
        return Stopped::Failed { reason };
    }
    // It completed (or failed) at the last moment.
    ended(agent).unwrap_or(Stopped::Failed { reason })
}

/// The outcome if the migration is over.
fn ended(agent: &TargetAgent) -> Option<Stopped> {
    match agent.phase.get() {
        Phase::Complete => Some(release(agent)),
        Phase::Failed => Some(Stopped::as_it_is(agent)),
        _ => None,
    }
}

/// After `complete`: the guest's memory back to the kernel.
fn release(agent: &TargetAgent) -> Stopped {
    let Some(guest) = agent.guest.get() else { return Stopped::Complete };
    match release_guest(guest) {
        Ok(()) => {
            tracing::info!("the migration is complete; the guest's memory is the kernel's again: stopping");
            Stopped::Complete
        }
        Err(error) => {
            let stopped = Stopped::NotReleased { error: pageserver_agent_shell::exit::describe(&error) };
            if let Err(error) = stopped.clone().into_result() {
                tracing::error!("{error}");
            }
            stopped
        }
    }
}

/// Nothing more is installed (after a failure decided here).
fn close_gate(agent: &TargetAgent) {
    if let Some(guest) = agent.guest.get() {
        guest.gate.close();
    }
}
