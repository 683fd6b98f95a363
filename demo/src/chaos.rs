//! Faults injected into a real migration (`pageserver-demo --chaos`), so
//! that an operator can rehearse them and the tests can prove what the
//! agents do about them.
//!
//! An event is `KIND@PHASE`; several are separated by commas. PHASE is when
//! it fires: `precopy` (as pre-copy starts), `switchover` (right after the
//! `Switchover` call: the guest runs, the final bitmap may not be in), or
//! `postcopy` (the target guest has resumed).
//!
//! | KIND | what happens | expected |
//! |---|---|---|
//! | `kill-source-agent` | SIGKILL the source agent; start a new one on the same address and socket; the source VMM hands its memory over again | completes, 0 mismatched |
//! | `stop-source-agent:MS` | SIGSTOP the source agent for MS ms, then SIGCONT | completes, 0 mismatched |
//! | `impostor-source-agent` | SIGKILL the source agent; start one serving *another* VM's memory (same name, same layout) on its address | the target refuses it, and fails after its `--source-unreachable-timeout`; nothing wrong installed |
//! | `kill-target-agent` | SIGKILL the target agent; start a new one on the same addresses and socket; the target VMM hands its memory, uffd and pagemap over again, with the old agent's checkpoint | the new agent rebuilds the page states (installed: the VMM's page tables; stale: the bitmap asked again), wakes the vCPUs whose faults died with the old one, completes; 0 mismatched |
//! | `kill-source-vmm` | (`switchover`, `postcopy`) SIGKILL the source VMM (it was paused) | the source agent still holds the VM's memory, which can no longer change, and serves it: completes, 0 mismatched |
//! | `kill-source-side` | (`switchover`, `postcopy`) SIGKILL the source VMM and the source agent: the only copy of the stale pages is gone | the target fails after its `--source-unreachable-timeout`, the guest frozen, having seen no wrong page; the demo exits non-zero |
//! | `switchover-before-pause` | (`switchover` only) `Switchover` is called before the source VM is paused | the target installs nothing read from the running VM, and fails after its `--pause-timeout` |
//! | `rotate-certificates` | (mutual TLS, the default) both agents' certificates and keys are replaced by new ones from the same CA, then both get SIGHUP | the agents reload them for new connections; the connections under way go on; completes, 0 mismatched |
//! | `link-down:MS` | (`--two-hosts`) the link goes down (`ip link set … down` on the target's end) for MS ms, then up | streams break, the target reconnects with backoff, vCPUs wait; completes, 0 mismatched; the target reports `source_up` false during the outage (recorded) |
//! | `link-loss:PCT:MS` | (`--two-hosts`) PCT% of the TCP packets crossing the link are dropped, each way, for MS ms (nftables) | completes, 0 mismatched |
//! | `link-reset` | (`--two-hosts`) every established connection to the source agent's port is reset (nftables `reject with tcp reset`) until the target has reconnected, or for at most 3 s | the target reconnects; completes, 0 mismatched |
//!
//! The `link-*` kinds act on the link between the two hosts of
//! `--two-hosts` ([`crate::netns`]) and need it.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When an event fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChaosPhase {
    Precopy,
    Switchover,
    Postcopy,
}

impl ChaosPhase {
    pub fn name(self) -> &'static str {
        match self {
            ChaosPhase::Precopy => "precopy",
            ChaosPhase::Switchover => "switchover",
            ChaosPhase::Postcopy => "postcopy",
        }
    }
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChaosKind {
    KillSourceAgent,
    StopSourceAgent { stopped: Duration },
    ImpostorSourceAgent,
    KillTargetAgent,
    KillSourceVmm,
    KillSourceSide,
    SwitchoverBeforePause,
    LinkDown { down: Duration },
    LinkLoss { percent: u8, lasting: Duration },
    LinkReset,
    RotateCertificates,
}

impl ChaosKind {
    /// Whether the migration is expected to complete despite the event.
    pub fn survivable(self) -> bool {
        !matches!(self, ChaosKind::ImpostorSourceAgent | ChaosKind::SwitchoverBeforePause | ChaosKind::KillSourceSide)
    }

    /// Whether it acts on the link between two hosts (`--two-hosts`).
    pub fn needs_two_hosts(self) -> bool {
        matches!(self, ChaosKind::LinkDown { .. } | ChaosKind::LinkLoss { .. } | ChaosKind::LinkReset)
    }
}

/// One `KIND@PHASE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosEvent {
    pub kind: ChaosKind,
    pub phase: ChaosPhase,
}

impl fmt::Display for ChaosEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ChaosKind::KillSourceAgent => write!(f, "kill-source-agent")?,
            ChaosKind::StopSourceAgent { stopped } => write!(f, "stop-source-agent:{}", stopped.as_millis())?,
            ChaosKind::ImpostorSourceAgent => write!(f, "impostor-source-agent")?,
            ChaosKind::KillTargetAgent => write!(f, "kill-target-agent")?,
            ChaosKind::KillSourceVmm => write!(f, "kill-source-vmm")?,
            ChaosKind::KillSourceSide => write!(f, "kill-source-side")?,
            ChaosKind::SwitchoverBeforePause => write!(f, "switchover-before-pause")?,
            ChaosKind::LinkDown { down } => write!(f, "link-down:{}", down.as_millis())?,
            ChaosKind::LinkLoss { percent, lasting } => write!(f, "link-loss:{percent}:{}", lasting.as_millis())?,
            ChaosKind::LinkReset => write!(f, "link-reset")?,
            ChaosKind::RotateCertificates => write!(f, "rotate-certificates")?,
        }
        write!(f, "@{}", self.phase.name())
    }
}

impl FromStr for ChaosEvent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, phase) = text.split_once('@').ok_or_else(|| format!("{text:?}: expected KIND@PHASE"))?;
        let phase = match phase {
            "precopy" => ChaosPhase::Precopy,
            "switchover" => ChaosPhase::Switchover,
            "postcopy" => ChaosPhase::Postcopy,
            other => return Err(format!("{text:?}: unknown phase {other:?} (precopy, switchover, postcopy)")),
        };
        let (name, argument) = match kind.split_once(':') {
            Some((name, argument)) => (name, Some(argument)),
            None => (kind, None),
        };
        let millis = |argument: Option<&str>| -> Result<Duration, String> {
            let ms = argument.ok_or_else(|| format!("{text:?}: {name} needs :MS"))?;
            ms.parse::<u64>().map(Duration::from_millis).map_err(|_| format!("{text:?}: {ms:?} is not milliseconds"))
        };
        let percent_and_millis = |argument: Option<&str>| -> Result<(u8, Duration), String> {
            let (percent, ms) =
                argument.and_then(|a| a.split_once(':')).ok_or_else(|| format!("{text:?}: {name} needs :PCT:MS"))?;
            match percent.parse::<u8>() {
                Ok(percent @ 1..=100) => Ok((percent, millis(Some(ms))?)),
                _ => Err(format!("{text:?}: {percent:?} is not a percentage from 1 to 100")),
            }
        };
        let no_argument = |kind: ChaosKind| match argument {
            None => Ok(kind),
            Some(_) => Err(format!("{text:?}: {name} takes no argument")),
        };
        let kind = match name {
            "kill-source-agent" => no_argument(ChaosKind::KillSourceAgent)?,
            "stop-source-agent" => ChaosKind::StopSourceAgent { stopped: millis(argument)? },
            "impostor-source-agent" => no_argument(ChaosKind::ImpostorSourceAgent)?,
            "kill-target-agent" => no_argument(ChaosKind::KillTargetAgent)?,
            "rotate-certificates" => no_argument(ChaosKind::RotateCertificates)?,
            "kill-source-vmm" | "kill-source-side" if phase == ChaosPhase::Precopy => {
                return Err(format!("{text:?}: the source VM must be paused first (@switchover or @postcopy)"));
            }
            "kill-source-vmm" => no_argument(ChaosKind::KillSourceVmm)?,
            "kill-source-side" => no_argument(ChaosKind::KillSourceSide)?,
            "switchover-before-pause" if phase == ChaosPhase::Switchover => {
                no_argument(ChaosKind::SwitchoverBeforePause)?
            }
            "switchover-before-pause" => return Err(format!("{text:?}: only @switchover makes sense")),
            "link-down" => ChaosKind::LinkDown { down: millis(argument)? },
            "link-loss" => {
                let (percent, lasting) = percent_and_millis(argument)?;
                ChaosKind::LinkLoss { percent, lasting }
            }
            "link-reset" => no_argument(ChaosKind::LinkReset)?,
            other => {
                return Err(format!(
                    "{text:?}: unknown kind {other:?} (kill-source-agent, stop-source-agent:MS, \
                     impostor-source-agent, kill-target-agent, kill-source-vmm, kill-source-side, \
                     switchover-before-pause, rotate-certificates, link-down:MS, link-loss:PCT:MS, link-reset)"
                ));
            }
        };
        Ok(ChaosEvent { kind, phase })
    }
}

/// What one event did, for the report (defined with the report, which
/// `pageserver-migrate` writes too).
pub use pageserver_migrate::report::ChaosRecord;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_print_back() {
        for text in [
            "kill-source-agent@postcopy",
            "stop-source-agent:500@precopy",
            "switchover-before-pause@switchover",
            "link-down:1500@postcopy",
            "link-loss:30:2000@precopy",
            "link-loss:100:1@switchover",
            "link-reset@postcopy",
        ] {
            let event: ChaosEvent = text.parse().expect(text);
            assert_eq!(event.to_string(), text);
            assert_eq!(event.kind.needs_two_hosts(), text.starts_with("link-"), "{text}");
        }
        for bad in [
            "kill-source-agent",
            "kill-source-agent@later",
            "stop-source-agent@postcopy",
            "stop-source-agent:soon@postcopy",
            "kill-source-agent:5@postcopy",
            "switchover-before-pause@postcopy",
            "kill-source-side@precopy",
            "unplug@postcopy",
            "link-down@postcopy",
            "link-loss:30@postcopy",
            "link-loss:0:100@postcopy",
            "link-loss:101:100@postcopy",
            "link-loss:30:soon@postcopy",
            "link-reset:5@postcopy",
        ] {
            assert!(bad.parse::<ChaosEvent>().is_err(), "{bad} must be refused");
        }
    }
}
