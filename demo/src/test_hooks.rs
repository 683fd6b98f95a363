//! The target agent's test hooks, as the orchestrators pass them: flags that
//! exist only in a target agent built with its `test-hooks` cargo feature
//! (`scripts/test` builds it that way; see `target-agent/src/test_hooks.rs`).
//! A production agent refuses them as unknown flags, and the orchestrator's
//! error then shows its log.
#![forbid(unsafe_code)]

/// How the target agent's fault loop is made to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultLoopBreak {
    Error,
    Panic,
}

/// Misbehaviour on purpose, for tests that prove the checks around it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentTestHooks {
    /// Ask for the final bitmap only after this many faults (or after
    /// `hold_bitmap_ms`), so that faults hit pages of unknown state.
    pub hold_bitmap_until_faults: u64,
    pub hold_bitmap_ms: u64,
    /// Install this many stale pages as if fresh (verification must catch
    /// every one).
    pub withhold_stale_pages: u64,
    /// Stop the fault loop at this fault, with an error or a panic.
    pub break_fault_loop: Option<(u64, FaultLoopBreak)>,
}

impl AgentTestHooks {
    /// The target agent's flags for these hooks (none when none is set).
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.hold_bitmap_until_faults > 0 {
            args.push(format!("--test-hold-bitmap-until-faults={}", self.hold_bitmap_until_faults));
        }
        if self.hold_bitmap_ms > 0 {
            args.push(format!("--test-hold-bitmap-ms={}", self.hold_bitmap_ms));
        }
        if self.withhold_stale_pages > 0 {
            args.push(format!("--test-withhold-stale-pages={}", self.withhold_stale_pages));
        }
        if let Some((after, how)) = self.break_fault_loop {
            args.push(format!("--test-break-fault-loop-after={after}"));
            let how = match how {
                FaultLoopBreak::Error => "error",
                FaultLoopBreak::Panic => "panic",
            };
            args.push(format!("--test-break-fault-loop={how}"));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_hooks_no_flags() {
        assert!(AgentTestHooks::default().args().is_empty());
    }

    #[test]
    fn every_hook_becomes_its_flag() {
        let hooks = AgentTestHooks {
            hold_bitmap_until_faults: 3,
            hold_bitmap_ms: 1500,
            withhold_stale_pages: 2,
            break_fault_loop: Some((5, FaultLoopBreak::Panic)),
        };
        assert_eq!(
            hooks.args(),
            [
                "--test-hold-bitmap-until-faults=3",
                "--test-hold-bitmap-ms=1500",
                "--test-withhold-stale-pages=2",
                "--test-break-fault-loop-after=5",
                "--test-break-fault-loop=panic",
            ]
        );
    }
}
