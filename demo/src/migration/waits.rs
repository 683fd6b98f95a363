//! Waiting for a stand-in's event, always with a deadline. (An agent's
//! `listening` line is `ChildProcess::wait_listening`; the target agent's
//! phases are `StatusWatch`'s.)

use std::time::{Duration, Instant};

use vmm_standin::StandinEvent;

use super::MigrationError;
use crate::process::{ChildProcess, ProcessError};

pub(super) fn deadline(after: Duration) -> Instant {
    Instant::now() + after
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
