//! After a failed step: the VM put in the safest state there is, and that
//! state named ([`VmState`]).
//!
//! The line is the device state. Until `migrate-continue` the target QEMU
//! has not received it and cannot run the guest, so the source's memory,
//! frozen or not, is still the VM's: the migration is cancelled (the
//! target QEMU's incoming migration then fails and it exits), the source
//! agent is told the VM runs again, and the source VM resumes if it was
//! running. From `migrate-continue` on, the target may be running the
//! guest at any moment: the source is never resumed (two copies of one VM
//! would each write their own memory); if the target does not run either,
//! the VM stays paused on both sides, the source's memory intact, and the
//! message says how to resume on the source once the target is stopped.
#![forbid(unsafe_code)]

use std::time::Duration;

use pageserver_proto::v1::SetPausedRequest;
use serde_json::json;

use crate::error::VmState;
use crate::plan::Step;
use crate::progress::Progress;
use crate::qmp::Qmp;
use crate::sequence::Done;

/// Puts the VM in the safest state after `failed`; returns it.
pub(crate) async fn settle(failed: Step, done: &mut Done, timeout: Duration, progress: &Progress) -> VmState {
    let state = if !done.migrate_sent {
        VmState::RunningOnSourceUntouched
    } else if failed.before_device_state() {
        cancel(done, timeout, progress).await
    } else {
        hold_source(done).await
    };
    progress.say(format!("VM: {state}"));
    state
}

/// Before the device state moved: back to the source.
async fn cancel(done: &mut Done, timeout: Duration, progress: &Progress) -> VmState {
    // The agent first: its dirty tracking must run again before the VM
    // writes. If it cannot be told, the VM still resumes (it owns its
    // memory); only a later migration from this agent would be wrong, so
    // the message says to restart it.
    let mut warning = None;
    if done.source_agent_paused
        && let Some(source) = done.source.as_mut()
        && let Err(status) = source.set_paused(SetPausedRequest { paused: false }).await
    {
        warning = Some(format!(
            "the source agent could not be told the VM runs again ({}): restart it before migrating this VM again",
            status.message()
        ));
    }
    let agent_note = warning.as_ref().map(|warning| format!("; {warning}")).unwrap_or_default();
    let Some(qmp) = done.source_qmp.as_mut() else {
        return VmState::Unknown { detail: "the source QEMU's QMP was never connected".to_owned() };
    };
    match cancel_on_source(qmp, done.source_run_state_before.as_deref(), timeout).await {
        Ok(state) if state == "running" || Some(state.as_str()) == done.source_run_state_before.as_deref() => {
            progress.say(format!("migration cancelled; the source QEMU is {state}{agent_note}"));
            VmState::ResumedOnSource { warning }
        }
        Ok(state) => VmState::Unknown {
            detail: format!("the migration was cancelled but the source QEMU is {state}{agent_note}"),
        },
        Err(error) => VmState::Unknown {
            detail: format!(
                "cancelling the migration on the source QEMU failed ({error}); it may be paused at \
                 pre-switchover: run migrate_cancel and cont on its QMP once the target QEMU is stopped{agent_note}"
            ),
        },
    }
}

/// `migrate_cancel`, its end awaited, and `cont` if the VM was running
/// before and QEMU did not resume it; the source's run state after.
async fn cancel_on_source(
    qmp: &mut Qmp,
    before: Option<&str>,
    timeout: Duration,
) -> Result<String, crate::qmp::QmpError> {
    qmp.execute("migrate_cancel", json!({})).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = qmp.migration_status().await?;
        if !matches!(status.as_str(), "cancelling" | "active" | "pre-switchover" | "device" | "setup") {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(crate::qmp::QmpError::Timeout(format!("the cancellation (migration status {status})")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = qmp.run_state().await?;
    if state != "running" && before == Some("running") {
        qmp.execute("cont", json!({})).await?;
        return qmp.run_state().await;
    }
    Ok(state)
}

/// After the device state moved (or may have): the source stays paused;
/// where the VM runs is the target QEMU's run state.
async fn hold_source(done: &mut Done) -> VmState {
    let target = match done.target_qmp.as_mut() {
        Some(qmp) => qmp.run_state().await.map_err(|error| error.to_string()),
        None => Err("its QMP was never connected".to_owned()),
    };
    match target {
        Ok(state) if state == "running" => VmState::RunningOnTarget,
        Ok(state) => VmState::PausedOnBoth {
            detail: format!(
                "the target QEMU is {state} and the source QEMU stays paused, its memory frozen and intact; resume \
                 the target (cont on its QMP) if its migration completed, or, once the target QEMU is stopped, the \
                 source (cont on its QMP)"
            ),
        },
        Err(error) => VmState::PausedOnBoth {
            detail: format!(
                "the target QEMU's state is not known ({error}) and the source QEMU stays paused, its memory frozen \
                 and intact; once the target QEMU is stopped, resume the source (cont on its QMP)"
            ),
        },
    }
}
