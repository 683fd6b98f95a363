//! Why a migration stopped ([`MigrateError`]): the step that failed, its
//! cause, and where the VM was left ([`VmState`]).
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::plan::Step;
use crate::qmp::QmpError;
use crate::status_watch::StatusError;

/// Where a failed migration left the VM: what the operator reads first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// The source VM was not touched: nothing had been asked of it yet.
    RunningOnSourceUntouched,
    /// The migration was cancelled and the VM runs on the source again;
    /// the target QEMU never got the device state and can be discarded.
    /// `warning`: what still needs doing (the source agent could not be
    /// told the VM runs again).
    ResumedOnSource { warning: Option<String> },
    /// The VM runs on the target; the source must stay paused for good.
    RunningOnTarget,
    /// Paused on both sides, the source's memory frozen and intact: the
    /// safest state when it is not certain which side may run.
    /// `detail` says what is known and what to do.
    PausedOnBoth { detail: String },
    /// The state could not be established (a QMP did not answer); `detail`
    /// says what was seen.
    Unknown { detail: String },
}

/// How [`VmState::ResumedOnSource`] reads (and begins).
pub const RESUMED_ON_SOURCE: &str =
    "the migration was cancelled and the VM runs on the source again; the target QEMU can be discarded";

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::RunningOnSourceUntouched => f.write_str("the VM runs on the source, untouched"),
            VmState::ResumedOnSource { warning } => {
                f.write_str(RESUMED_ON_SOURCE)?;
                match warning {
                    Some(warning) => write!(f, "; {warning}"),
                    None => Ok(()),
                }
            }
            VmState::RunningOnTarget => {
                f.write_str("the VM runs on the target; the source QEMU is paused and must NOT be resumed")
            }
            VmState::PausedOnBoth { detail } => write!(f, "the VM is paused on both sides: {detail}"),
            VmState::Unknown { detail } => write!(f, "the VM's state is not known: {detail}"),
        }
    }
}

/// What went wrong in a step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("the {vmm} QEMU's QMP")]
    Qmp {
        vmm: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("connecting to the {agent} agent at {url}")]
    Connect {
        agent: &'static str,
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} on the {agent} agent failed: {status}")]
    Rpc { agent: &'static str, call: &'static str, status: Box<tonic::Status> },
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("the {vmm} QEMU is {state}, not {wanted}")]
    VmmState { vmm: &'static str, state: String, wanted: &'static str },
    #[error("the target agent is in phase {phase}: {wanted}")]
    AgentPhase { phase: String, wanted: &'static str },
    #[error("the target agent did not report the switchover within {after:?} of Switchover calls")]
    SwitchoverUnseen { after: Duration },
    #[error("{step} took longer than {after:?}")]
    Timeout { step: Step, after: Duration },
    #[error("the hook after {step}: {message}")]
    Hook { step: Step, message: String },
    #[error("interrupted by {0}")]
    Interrupted(String),
}

/// A migration that did not complete: its message names the step and
/// chains the cause; [`MigrateError::vm`] is where the VM was left, which
/// the binary prints on a line of its own and writes to the report.
#[derive(Debug, thiserror::Error)]
#[error("step {step} failed")]
pub struct MigrateError {
    pub step: Step,
    #[source]
    pub cause: StepError,
    pub vm: VmState,
}

/// Maps a QMP error of the `vmm` ("source" or "target") QEMU.
pub(crate) fn qmp(vmm: &'static str) -> impl FnOnce(QmpError) -> StepError {
    move |source| StepError::Qmp { vmm, source }
}

/// Maps a failed `call` to the `agent` ("source" or "target").
pub(crate) fn rpc(agent: &'static str, call: &'static str) -> impl FnOnce(tonic::Status) -> StepError {
    move |status| StepError::Rpc { agent, call, status: Box::new(status) }
}
