//! Polls the target agent's `MigrationTarget/GetStatus` in the background,
//! and the waits built on it, shared by both orchestrators (stand-in and
//! QEMU): a phase (or any condition on the status), pre-copy convergence
//! round by round, and any other step unless the migration fails first. A
//! failed migration is noticed at once, whatever is being waited for.

use std::future::Future;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How often the status is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest wait for one status call (a stopped agent must not hold the
/// poller, and with it every wait, for ever).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// A migration without progress (or an agent without answers) this long is
/// reported on stderr, and again every `STALL_REPORT_EVERY` while it lasts.
const STALL_REPORT_AFTER: Duration = Duration::from_secs(2);
const STALL_REPORT_EVERY: Duration = Duration::from_secs(5);

/// How long calls may keep failing before the agent counts as unreachable
/// (long enough for a target agent killed by a chaos event to be replaced).
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);

/// The one place that reads and compares a status's phase.
pub mod phase {
    pub use pageserver_proto::v1::MigrationPhase;
    use pageserver_proto::v1::MigrationStatus;

    /// The phase `status` reports (UNSPECIFIED for a value this build does
    /// not know).
    pub fn of(status: &MigrationStatus) -> MigrationPhase {
        status.phase()
    }

    /// Whether `status` is in `phase`.
    pub fn is(status: &MigrationStatus, phase: MigrationPhase) -> bool {
        of(status) == phase
    }
}

/// Why the target agent's migration cannot go on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("the target agent's migration failed: {error}")]
    MigrationFailed { error: String },
    #[error("the target agent is unreachable: GetStatus failed {calls} times in a row, last with {code:?}: {message}")]
    Unreachable { calls: u32, code: tonic::Code, message: String },
}

/// Why a wait on the target agent's status ended without what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Failed(#[from] Failure),
    #[error("the target agent's status poller stopped")]
    PollerStopped,
    #[error("timed out after {after:.1?} waiting for {what} (the target agent is in phase {phase:?})")]
    Timeout { what: String, after: Duration, phase: String },
}

/// What the poller knows so far.
#[derive(Debug, Clone, Default)]
pub struct PollState {
    pub latest: Option<MigrationStatus>,
    /// When the poller first saw phase "complete".
    pub complete_at: Option<Instant>,
    /// Why the migration cannot go on: phase "failed" or the agent
    /// unreachable.
    pub failure: Option<Failure>,
}

impl PollState {
    /// The latest phase, for messages.
    pub fn phase(&self) -> &'static str {
        self.latest.as_ref().map_or("unknown", |status| phase::of(status).label())
    }
}

/// A running poller; stops when dropped.
#[derive(Debug)]
pub struct StatusWatch {
    state: watch::Receiver<PollState>,
    task: JoinHandle<()>,
}

impl StatusWatch {
    pub fn start(client: MigrationTargetClient<Channel>) -> Self {
        let (tx, state) = watch::channel(PollState::default());
        let task = tokio::spawn(poll(client, tx));
        Self { state, task }
    }

    pub fn current(&self) -> PollState {
        self.state.borrow().clone()
    }

    /// Waits until the state satisfies `done`; fails as soon as the
    /// migration does, or after `timeout` (`what` names what was awaited).
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&PollState) -> bool,
    ) -> Result<PollState, StatusError> {
        let mut state = self.state.clone();
        let wait = state.wait_for(|s| s.failure.is_some() || done(s));
        let state = match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => return Err(StatusError::PollerStopped),
            Err(_) => return Err(self.timeout(what, timeout)),
        };
        match state.failure {
            Some(failure) => Err(failure.into()),
            None => Ok(state),
        }
    }

    /// Waits for phase "precopy-converged", calling `round_done(round,
    /// dirty_pages)` once for each pre-copy round as it ends (rounds from 1).
    pub async fn wait_precopy_converged(
        &self,
        timeout: Duration,
        mut round_done: impl FnMut(usize, u64),
    ) -> Result<(), StatusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut state = self.state.clone();
        let mut rounds_shown = 0;
        loop {
            let current = state.borrow_and_update().clone();
            if let Some(status) = &current.latest {
                for (round, &dirty) in status.dirty_pages_per_round.iter().enumerate().skip(rounds_shown) {
                    round_done(round + 1, dirty);
                }
                rounds_shown = rounds_shown.max(status.dirty_pages_per_round.len());
                if phase::is(status, phase::MigrationPhase::PrecopyConverged) {
                    return Ok(());
                }
            }
            if let Some(failure) = current.failure {
                return Err(failure.into());
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StatusError::PollerStopped),
                Err(_) => return Err(self.timeout("pre-copy to converge", timeout)),
            }
        }
    }

    /// Calls `each` with every status polled during the next `duration`,
    /// and returns when it has passed (whatever the polls found).
    pub async fn each_status_for(&self, duration: Duration, mut each: impl FnMut(&MigrationStatus)) {
        let deadline = tokio::time::Instant::now() + duration;
        let mut state = self.state.clone();
        state.mark_unchanged();
        while let Ok(Ok(())) = tokio::time::timeout_at(deadline, state.changed()).await {
            if let Some(status) = &state.borrow_and_update().latest {
                each(status);
            }
        }
        // The poller stopped early: the time still passes.
        tokio::time::sleep_until(deadline).await;
    }

    /// Runs `step` unless the target agent's migration fails first.
    pub async fn unless_failed<T, E: From<StatusError>>(
        &self,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        tokio::select! {
            result = step => result,
            failure = self.failure() => Err(E::from(StatusError::Failed(failure))),
        }
    }

    /// Resolves with the failure once the migration failed; never otherwise.
    async fn failure(&self) -> Failure {
        let mut state = self.state.clone();
        let failure = match state.wait_for(|s| s.failure.is_some()).await {
            Ok(state) => state.failure.clone(),
            Err(_) => None,
        };
        match failure {
            Some(failure) => failure,
            // The poller stopped: nothing fails any more.
            None => std::future::pending().await,
        }
    }

    fn timeout(&self, what: &str, after: Duration) -> StatusError {
        StatusError::Timeout { what: what.to_owned(), after, phase: self.current().phase().to_owned() }
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(mut client: MigrationTargetClient<Channel>, tx: watch::Sender<PollState>) {
    let mut errors = 0u32;
    let mut failing_since: Option<Instant> = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stall = StallReport::default();
    loop {
        interval.tick().await;
        let call = tokio::time::timeout(CALL_TIMEOUT, client.get_status(GetStatusRequest {})).await;
        let reply = call.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer to GetStatus")));
        match reply {
            Ok(response) => {
                errors = 0;
                failing_since = None;
                let status = response.into_inner();
                stall.progress(&status);
                tx.send_modify(|state| {
                    if phase::is(&status, phase::MigrationPhase::Complete) && state.complete_at.is_none() {
                        state.complete_at = Some(Instant::now());
                    }
                    if phase::is(&status, phase::MigrationPhase::Failed) && state.failure.is_none() {
                        state.failure = Some(Failure::MigrationFailed { error: status.error.clone() });
                    }
                    state.latest = Some(status);
                });
            }
            Err(status) => {
                errors += 1;
                stall.silent(failing_since.get_or_insert_with(Instant::now).elapsed(), &status);
                if failing_since.get_or_insert_with(Instant::now).elapsed() >= UNREACHABLE_AFTER {
                    tx.send_modify(|state| {
                        state.failure.get_or_insert_with(|| Failure::Unreachable {
                            calls: errors,
                            code: status.code(),
                            message: status.message().to_owned(),
                        });
                    });
                }
            }
        }
    }
}

/// Reports a migration that stopped moving, or an agent that stopped
/// answering, on stderr within seconds (once, then every few seconds while
/// it lasts, and when it moves again).
#[derive(Debug, Default)]
struct StallReport {
    /// When the current stall was last reported.
    reported_at: Option<Instant>,
}

impl StallReport {
    fn due(&mut self, stalled: Duration) -> bool {
        let due = stalled >= STALL_REPORT_AFTER && self.reported_at.is_none_or(|at| at.elapsed() >= STALL_REPORT_EVERY);
        if due {
            self.reported_at = Some(Instant::now());
        }
        due
    }

    fn progress(&mut self, status: &MigrationStatus) {
        let stalled = Duration::from_secs_f64(status.seconds_since_progress.max(0.0));
        if self.due(stalled) {
            eprintln!(
                "the target agent has made no progress for {:.1} s (phase {}, source {}, {} \
                 reconnects)",
                stalled.as_secs_f64(),
                phase::of(status).label(),
                if status.source_up { "up" } else { "DOWN" },
                status.source_reconnects
            );
        } else if stalled < STALL_REPORT_AFTER && self.reported_at.take().is_some() {
            eprintln!("the target agent makes progress again");
        }
    }

    fn silent(&mut self, for_: Duration, status: &tonic::Status) {
        if self.due(for_) {
            eprintln!("the target agent has not answered for {:.1} s ({})", for_.as_secs_f64(), status.message());
        }
    }
}
