//! The VMM stand-in: the reference VMM side of the hand-off. A process that
//! owns "guest memory" as a VMM does, writes to it like a guest, pauses on
//! request, and hands its memory to a page-server agent over the agent's
//! hand-off socket (`guest_memory::handoff`). The demo runs one per side of
//! a migration; the VMM shim (`vmm-shim`) does the same from inside QEMU.
//!
//! Commands come on stdin, JSON events go to stdout, logs to stderr
//! ([`protocol`]). The content of guest memory is derived from a seed
//! ([`pattern`]), so every party (the other stand-in, the demo, the tests)
//! knows what each page should hold.
//!
//! # Layout
//!
//! - `main.rs`: the `vmm-standin` binary: its command line, [`run`];
//! - [`config`]: the role and everything else the command line says;
//! - [`error`]: why the stand-in could not run;
//! - [`protocol`]: the stdin commands, the stdout events, the command loop;
//! - [`ram`]: guest memory (a memfd mapped as a VMM maps it), and its
//!   hand-off (`guest_memory::handoff_link`: given again to a new agent
//!   when the one holding it goes away);
//! - [`source`]: the source role: memory filled from the seed, dirty
//!   tracking registered, vCPU threads dirtying it until `pause`, a snapshot
//!   of the paused memory;
//! - [`target`]: the target role: empty memory registered for MINOR and
//!   MISSING faults, the commands a resumed guest takes;
//! - [`guest`]: the guest running on the target: vCPU threads whose first
//!   access to each page faults through the agent;
//! - [`touched`]: the pages a target guest run accessed (what a MISSING-mode
//!   target would have fetched);
//! - [`undo_log`]: what the target guest wrote, and the content from before;
//! - [`verify`]: the target's memory compared with the source's snapshot,
//!   every page or only the pages already mapped;
//! - [`pattern`]: the content every party derives from the seed;
//! - [`written`]: which pages were ever written (all, or a sparse guest's
//!   clusters);
//! - [`size`]: memory sizes as users type them (also the demo's `--memory`).
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod guest;
pub mod hot_sweep;
pub mod pattern;
pub mod protocol;
pub mod ram;
pub mod size;
pub mod source;
pub mod target;
pub mod touched;
pub mod undo_log;
pub mod verify;
pub mod written;

use std::io::BufRead;
use std::sync::Arc;

pub use config::{StandinConfig, StandinRole};
pub use error::VmmError;
pub use protocol::{EventSink, StandinEvent, TrackingSetup};

/// Runs the stand-in until `quit` or the end of `commands`. On the target,
/// vCPU threads may still run then (or be blocked for ever in a fault that
/// nobody resolves): they are not waited for, the process's exit ends them.
pub fn run(config: &StandinConfig, commands: impl BufRead, events: &Arc<EventSink>) -> Result<(), VmmError> {
    config.validate()?;
    match config.role {
        StandinRole::Source => source::run(config, commands, events),
        StandinRole::Target => target::run(config, commands, events),
    }
}
