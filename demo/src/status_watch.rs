//! Polls the target agent's `MigrationTarget/GetStatus` in the background,
//! so that the orchestrator can wait for a phase while it talks to the
//! stand-ins, and notices a failed migration at once.

use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How often the status is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Consecutive failed calls after which the agent counts as unreachable.
const MAX_CONSECUTIVE_ERRORS: u32 = 5;

/// The phase names of `MigrationStatus.phase`.
pub mod phase {
    pub const PRECOPY_CONVERGED: &str = "precopy-converged";
    pub const COMPLETE: &str = "complete";
    pub const FAILED: &str = "failed";
}

/// What the poller knows so far.
#[derive(Debug, Clone, Default)]
pub struct PollState {
    pub latest: Option<MigrationStatus>,
    /// When the poller first saw phase "complete".
    pub complete_at: Option<Instant>,
    /// Why the migration cannot go on: phase "failed" or the agent
    /// unreachable.
    pub failure: Option<String>,
}

impl PollState {
    pub fn phase(&self) -> &str {
        self.latest.as_ref().map_or("unknown", |s| s.phase.as_str())
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

    /// A receiver of the poller's state, for `changed()`/`wait_for()`.
    pub fn subscribe(&self) -> watch::Receiver<PollState> {
        self.state.clone()
    }

    pub fn current(&self) -> PollState {
        self.state.borrow().clone()
    }

    /// Resolves with the failure once the migration failed; never resolves
    /// otherwise.
    pub async fn failed(mut state: watch::Receiver<PollState>) -> String {
        match state.wait_for(|s| s.failure.is_some()).await {
            Ok(s) => s.failure.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(mut client: MigrationTargetClient<Channel>, tx: watch::Sender<PollState>) {
    let mut errors = 0u32;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match client.get_status(GetStatusRequest {}).await {
            Ok(response) => {
                errors = 0;
                let status = response.into_inner();
                tx.send_modify(|state| {
                    if status.phase == phase::COMPLETE && state.complete_at.is_none() {
                        state.complete_at = Some(Instant::now());
                    }
                    if status.phase == phase::FAILED && state.failure.is_none() {
                        state.failure = Some(format!("the target agent's migration failed: {}", status.error));
                    }
                    state.latest = Some(status);
                });
            }
            Err(status) => {
                errors += 1;
                if errors >= MAX_CONSECUTIVE_ERRORS {
                    tx.send_modify(|state| {
                        state.failure.get_or_insert_with(|| {
                            format!(
                                "GetStatus failed {errors} times in a row: {} ({:?})",
                                status.message(),
                                status.code()
                            )
                        });
                    });
                }
            }
        }
    }
}
