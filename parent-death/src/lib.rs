//! Dying with the parent: a process that an orchestrator starts for its own
//! purposes (the demo's agents and VMM stand-ins) must not outlive it, even
//! when the orchestrator is killed with SIGKILL and can clean nothing up.
//!
//! The orchestrator sets [`ENV`] (`PAGESERVER_DIE_WITH_PARENT`) to its own
//! pid in the child's environment; the child calls [`die_with_parent`]
//! first thing in `main`. That asks the kernel for SIGKILL when the parent
//! dies (`PR_SET_PDEATHSIG`), then checks that the parent is still the one
//! named: a parent that died between the fork and the `prctl` (the race of
//! `PR_SET_PDEATHSIG`) sends no signal, and the child has been reparented
//! already, so it stops at once, with an error.
//!
//! The kernel sends the signal when the *thread* that started the child
//! ends, not only the process: the orchestrator must start its children
//! from a thread that lives as long as they should (the demo starts them
//! from the thread that runs the migration). Without [`ENV`] nothing
//! changes: an agent run by a supervisor (systemd, Kubernetes) lives its
//! own life.
#![forbid(unsafe_code)]

use rustix::process::{Pid, Signal, getppid, set_parent_process_death_signal};

/// The environment variable: the parent's pid.
pub const ENV: &str = "PAGESERVER_DIE_WITH_PARENT";

/// Why the process cannot promise to die with its parent.
#[derive(Debug, thiserror::Error)]
pub enum ParentDeathError {
    #[error("{ENV}={value:?} is not a process id (the parent's pid is expected)")]
    BadValue { value: String },
    #[error("asking for SIGKILL when the parent dies (PR_SET_PDEATHSIG)")]
    Prctl(#[source] std::io::Error),
    #[error("the parent (pid {expected}) is already gone (the parent is now {now}): stopping with it")]
    ParentGone { expected: i32, now: String },
}

/// The parent's pid that [`ENV`]'s `value` names, if it is set.
fn parse_parent(value: Option<&std::ffi::OsStr>) -> Result<Option<i32>, ParentDeathError> {
    let Some(value) = value else { return Ok(None) };
    let value = value.to_string_lossy().into_owned();
    match value.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(Some(pid)),
        _ => Err(ParentDeathError::BadValue { value }),
    }
}

/// If [`ENV`] names the parent: SIGKILL when it dies, and an error if it
/// has died already. Returns whether it was asked for.
pub fn die_with_parent() -> Result<bool, ParentDeathError> {
    let Some(expected) = parse_parent(std::env::var_os(ENV).as_deref())? else { return Ok(false) };
    set_parent_process_death_signal(Some(Signal::KILL)).map_err(|e| ParentDeathError::Prctl(e.into()))?;
    let now = getppid().map(Pid::as_raw_nonzero).map(|pid| pid.get());
    if now != Some(expected) {
        let now = now.map_or_else(|| "none".to_owned(), |pid| format!("pid {pid}"));
        return Err(ParentDeathError::ParentGone { expected, now });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_the_parents_pid() {
        let parse = |value: &str| parse_parent(Some(std::ffi::OsStr::new(value)));
        assert_eq!(parse_parent(None).ok(), Some(None));
        assert_eq!(parse("4242").ok(), Some(Some(4242)));
        for bad in ["", "yes", "0", "-3", "1.5"] {
            assert!(matches!(parse(bad), Err(ParentDeathError::BadValue { .. })), "{bad:?}");
        }
    }
}
