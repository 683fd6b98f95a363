//! A whole post-copy migration on one machine, with VMM stand-ins
//! (`vmm-standin`) or unmodified QEMUs, and what it measured.
//!
//! # Layout
//!
//! - `main.rs`: the `pageserver-demo` binary;
//! - [`migration`]: the orchestration with stand-ins: both agents and both
//!   stand-ins as separate processes, pre-copy, pause, switchover,
//!   post-copy, and a byte-for-byte verification of the target's memory
//!   ([`run_migration`]);
//! - [`chaos`]: faults injected into a migration (`--chaos KIND@PHASE`);
//! - [`flood`]: hostile clients of a source agent (the limits' tests and
//!   `pageserver-flood`);
//! - [`netns`]: two hosts on one machine (`--two-hosts`): network
//!   namespaces, the veth link, its rate limit and its faults;
//! - [`qemu`]: the same with an unmodified QEMU and the VMM shim;
//! - [`status_watch`]: the target agent's status, polled in the background,
//!   and the waits both orchestrations build on it;
//! - [`process`]: finding and supervising the child processes (which die
//!   with the demo, even one killed with SIGKILL);
//! - [`leftovers`]: what a demo killed with SIGKILL leaves behind, cleaned
//!   up by the next run;
//! - [`stop_signal`]: SIGINT and SIGTERM end a run the same clean way;
//! - [`progress`]: the progress lines both orchestrations print;
//! - [`report`]: what a migration measured; [`resources`]: a process's
//!   descriptors, threads and memory, from /proc;
//! - [`hugepages`]: reserving huge pages for hugetlbfs guests.
#![forbid(unsafe_code)]

pub use guest_memory::hugepages;
// What the demo shares with `pageserver-migrate`, which drives its QEMU
// migrations: the status waits, the report, progress lines and the signals.
pub use pageserver_migrate::{progress, report, resources, status_watch, stop_signal};
pub mod chaos;
pub mod flood;
pub mod leftovers;
pub mod migration;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod test_hooks;
pub mod tls;

pub use migration::{
    MigrationError, MigrationObserver, MigrationOptions, PullOrder, StartedAgent, run_migration, run_migration_until,
};
pub use report::Report;
