//! A whole post-copy migration on one machine, and the VMM stand-in it needs.
//!
//! - [`vmm`]: the VMM stand-in (binary `vmm-standin`), a process that owns
//!   guest memory as a VMM does and hands it to an agent.
//! - [`migration`]: the orchestration: both agents and both stand-ins as
//!   separate processes, pre-copy, pause, switchover, post-copy, and a
//!   byte-for-byte verification of the target's memory ([`run_migration`]).
//! - [`qemu`]: the same with an unmodified QEMU and the VMM shim.
//! - [`report`]: what a migration measured.
//! - [`process`]: finding, building and supervising the child processes.
//! - [`status_watch`]: the target agent's status, polled in the background.
//! - [`size`]: memory sizes as users type them.
//! - [`hugepages`]: reserving huge pages for hugetlbfs guests.
#![forbid(unsafe_code)]

pub use guest_memory::hugepages;
pub mod migration;
pub mod process;
pub mod qemu;
pub mod report;
pub mod size;
pub mod status_watch;
pub mod vmm;

pub use migration::{MigrationError, MigrationOptions, run_migration};
pub use report::Report;
