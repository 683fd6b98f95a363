//! Drives a post-copy migration of a running QEMU VM through both agents:
//! QEMU's own migration moves the device state only (`x-ignore-shared`,
//! the guest's RAM being a shared file the VMM shim handed to the agents),
//! the target agent pre-copies and then post-copies the memory, and the
//! source QEMU waits at `pre-switchover` while the agents switch over.
//! `pageserver-migrate` is this crate's binary; the demo's QEMU mode runs
//! the binary, or (for its chaos events) the same [`migrate`] with hooks.
//!
//! # Layout
//!
//! - `main.rs`: the `pageserver-migrate` binary (flags, `--dry-run`, the
//!   report, the exit status);
//! - [`plan`]: what a migration is given and its [`Step`]s, in order;
//! - [`sequence`]: the steps run, each bounded ([`migrate`]);
//! - [`settle`]: after a failure, the VM put in the safest state, named
//!   by [`VmState`];
//! - [`error`]: why a migration stopped ([`MigrateError`]);
//! - [`qmp`]: a minimal QMP client;
//! - [`status_watch`]: the target agent's status, polled in the
//!   background, and the waits built on it;
//! - [`report`]: what a migration measured (the `--report-json` file, the
//!   same the demo writes); [`resources`]: a process's descriptors,
//!   threads and memory, from /proc (the demo's part of the report);
//! - [`progress`]: progress lines, stamped with the time since the start;
//! - [`stop_signal`]: SIGINT and SIGTERM, which stop a run the same way.
#![forbid(unsafe_code)]

pub mod error;
pub mod plan;
pub mod progress;
pub mod qmp;
pub mod report;
pub mod resources;
pub mod sequence;
mod settle;
pub mod status_watch;
pub mod stop_signal;

pub use error::{MigrateError, StepError, VmState};
pub use plan::{MigrationPlan, Step};
pub use report::Report;
pub use sequence::{Hooks, Migrated, NoHooks, Stop, agent_channel, migrate};
