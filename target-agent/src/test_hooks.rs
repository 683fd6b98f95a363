//! Test hooks: ways to make the target agent misbehave on purpose, so that
//! tests can prove the checks around it work (a stale page installed is
//! caught, a dead fault loop fails the migration), and to hold the final
//! bitmap back so that faults hit pages of unknown state.
//!
//! They exist only in a build with the cargo feature `test-hooks`
//! (`scripts/test` builds the agent that way); the production contract has
//! none of them: without the feature [`TestHooks`] is empty, its methods
//! answer "no", and the agent has no flags to set them.
#![forbid(unsafe_code)]

use std::time::Duration;

/// How the fault loop is made to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "test-hooks", derive(clap::ValueEnum))]
pub enum FaultLoopBreak {
    /// It returns an error.
    Error,
    /// It panics.
    Panic,
}

/// The hooks the agent was started with.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TestHooks {
    /// TEST HOOK: ask for the final bitmap only after this many faults...
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-hold-bitmap-until-faults", default_value_t = 0)]
    pub hold_bitmap_until_faults: u64,
    /// TEST HOOK: ...or after this many milliseconds, whichever comes first.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-hold-bitmap-ms", default_value_t = 0)]
    pub hold_bitmap_ms: u64,
    /// TEST HOOK: install this many stale pages of the final bitmap as if
    /// they were fresh. Breaks the product's guarantee on purpose, to prove
    /// that verification catches it.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-withhold-stale-pages", default_value_t = 0)]
    pub withhold_stale_pages: u64,
    /// TEST HOOK: stop the fault loop (error or panic) at this fault.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-break-fault-loop-after", requires = "break_fault_loop")]
    pub break_fault_loop_after: Option<u64>,
    /// TEST HOOK: how the fault loop stops.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-break-fault-loop", value_enum)]
    pub break_fault_loop: Option<FaultLoopBreak>,
}

impl TestHooks {
    /// Whether any hook is set (the agent says so loudly at start).
    pub fn any(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        {
            self.hold_bitmap_until_faults > 0
                || self.hold_bitmap_ms > 0
                || self.withhold_stale_pages > 0
                || self.break_fault_loop_after.is_some()
        }
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// How long to hold the final bitmap back, and after how many faults to
    /// stop holding it (`None`: ask at once).
    pub fn bitmap_hold(&self) -> Option<(Duration, u64)> {
        #[cfg(feature = "test-hooks")]
        if self.hold_bitmap_until_faults > 0 || self.hold_bitmap_ms > 0 {
            let wait = if self.hold_bitmap_ms == 0 { 10_000 } else { self.hold_bitmap_ms };
            let faults = if self.hold_bitmap_until_faults == 0 { u64::MAX } else { self.hold_bitmap_until_faults };
            return Some((Duration::from_millis(wait), faults));
        }
        None
    }

    /// How many stale pages to install as fresh (0 outside fault injection).
    pub fn withheld_stale_pages(&self) -> u64 {
        #[cfg(feature = "test-hooks")]
        return self.withhold_stale_pages;
        #[cfg(not(feature = "test-hooks"))]
        0
    }

    /// Called by the fault loop with the number of faults it has handled:
    /// `Some(n)` means stop now with an error; a panic hook panics here.
    pub fn break_fault_loop_after(&self, handled: u64) -> Option<u64> {
        #[cfg(feature = "test-hooks")]
        if let (Some(after), Some(how)) = (self.break_fault_loop_after, self.break_fault_loop)
            && handled >= after
        {
            match how {
                FaultLoopBreak::Error => return Some(after),
                FaultLoopBreak::Panic => panic!("test hook: the fault loop panics at fault {handled}"),
            }
        }
        let _ = handled;
        None
    }
}
