//! Waiting for the children: an agent's "listening" line, a stand-in's
//! event, a phase of the target agent, always with a deadline and always
//! giving up as soon as the target agent reports a failed migration.

use std::future::Future;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use tonic::transport::Channel;

use super::{MigrationError, Progress};
use crate::process::{ChildProcess, ProcessError};
use crate::status_watch::{PollState, StatusWatch, phase};
use crate::vmm::protocol::StandinEvent;

pub(super) fn deadline(after: Duration) -> Instant {
    Instant::now() + after
}

/// Where an agent listens.
#[derive(Debug, Clone)]
pub(super) struct AgentAddrs {
    pub grpc: String,
    /// Prometheus metrics: `http://METRICS/metrics`.
    pub metrics: String,
}

/// Reads an agent's `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`
/// line; its later output is drained.
pub(super) async fn wait_listening(agent: &mut ChildProcess, deadline: Instant) -> Result<AgentAddrs, MigrationError> {
    loop {
        let line = agent.next_json("the \"listening\" line", deadline).await?;
        if line["event"] != "listening" {
            continue;
        }
        let addr = |key: &str| {
            line[key].as_str().map(str::to_owned).ok_or_else(|| ProcessError::Protocol {
                name: agent.name().to_owned(),
                line: line.to_string(),
                reason: format!("no \"{key}\" address"),
            })
        };
        let addrs = AgentAddrs { grpc: addr("grpc")?, metrics: addr("metrics")? };
        agent.drain_stdout();
        return Ok(addrs);
    }
}

pub(super) async fn connect(addr: &str) -> Result<MigrationTargetClient<Channel>, MigrationError> {
    MigrationTargetClient::connect(format!("http://{addr}"))
        .await
        .map_err(|source| MigrationError::Connect { addr: addr.to_owned(), source })
}

/// Waits for the stand-in event that `pick` accepts. An `error` event fails
/// the wait; other events are reported and skipped.
pub(super) async fn wait_for<T>(
    vm: &mut ChildProcess,
    what: &str,
    deadline: Instant,
    mut pick: impl FnMut(&StandinEvent) -> Option<T>,
) -> Result<T, MigrationError> {
    loop {
        let line = vm.next_json(&format!("the \"{what}\" event"), deadline).await?;
        let event: StandinEvent = serde_json::from_value(line.clone()).map_err(|e| ProcessError::Protocol {
            name: vm.name().to_owned(),
            line: line.to_string(),
            reason: e.to_string(),
        })?;
        if let StandinEvent::Error { message } = event {
            return Err(ProcessError::Reported { name: vm.name().to_owned(), message }.into());
        }
        match pick(&event) {
            Some(value) => return Ok(value),
            None => eprintln!("pageserver-demo: {} sent {line} while we waited for {what}", vm.name()),
        }
    }
}

/// Runs `step` unless the target agent's migration fails first.
pub(super) async fn unless_failed<T>(
    watch: &StatusWatch,
    step: impl Future<Output = Result<T, MigrationError>>,
) -> Result<T, MigrationError> {
    tokio::select! {
        result = step => result,
        failure = StatusWatch::failed(watch.subscribe()) => Err(MigrationError::AgentFailed(failure)),
    }
}

/// Waits until the poller's state satisfies `done`.
pub(super) async fn wait_for_state(
    watch: &StatusWatch,
    deadline: Instant,
    timeout: Duration,
    what: &str,
    done: impl Fn(&PollState) -> bool,
) -> Result<PollState, MigrationError> {
    let mut state = watch.subscribe();
    let wait = state.wait_for(|s| s.failure.is_some() || done(s));
    let state = match tokio::time::timeout_at(deadline.into(), wait).await {
        Ok(Ok(state)) => state.clone(),
        Ok(Err(_)) => return Err(MigrationError::AgentFailed("the status poller stopped".into())),
        Err(_) => {
            let last = watch.current();
            return Err(MigrationError::Timeout {
                what: format!("{what} (the target agent is in phase {:?})", last.phase()),
                after: timeout,
            });
        }
    };
    match &state.failure {
        Some(failure) => Err(MigrationError::AgentFailed(failure.clone())),
        None => Ok(state),
    }
}

/// Waits for "precopy-converged", printing each pre-copy round as it ends.
pub(super) async fn wait_for_precopy(
    watch: &StatusWatch,
    deadline: Instant,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let mut state = watch.subscribe();
    let mut rounds_shown = 0;
    loop {
        let current = state.borrow_and_update().clone();
        if let Some(status) = &current.latest {
            for (round, dirty) in status.dirty_pages_per_round.iter().enumerate().skip(rounds_shown) {
                progress.say(format!("pre-copy round {}: {dirty} dirty pages", round + 1));
            }
            rounds_shown = rounds_shown.max(status.dirty_pages_per_round.len());
            if status.phase == phase::PRECOPY_CONVERGED {
                return Ok(());
            }
        }
        if let Some(failure) = current.failure {
            return Err(MigrationError::AgentFailed(failure));
        }
        match tokio::time::timeout_at(deadline.into(), state.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(MigrationError::AgentFailed("the status poller stopped".into())),
            Err(_) => {
                return Err(MigrationError::Timeout {
                    what: format!("pre-copy to converge (the target agent is in phase {:?})", current.phase()),
                    after: timeout,
                });
            }
        }
    }
}
