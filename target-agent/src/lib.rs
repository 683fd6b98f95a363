//! The target agent of a post-copy migration: pulls pre-copy rounds from the
//! source agent, then serves the guest's userfaultfd minor (and missing)
//! faults after switchover, installs fresh pages in bulk and pulls stale ones
//! in the background. It never maps a page into the guest unless it is known
//! fresh or was just fetched from the paused source.
//!
//! # Layout
//!
//! - [`page_state`]: the per-page state machine, its rules and invariants;
//!   the one place that decides every transition, and the tokens ([`Claim`](page_state::Claim)
//!   and friends) without which nothing can be installed;
//! - [`fault_waits`]: when each fault waiting on a fetch was read;
//! - [`fault_loop`]: reads the guest's faults and carries out what the page
//!   state decides; its failure policy (freeze, report, never guess);
//! - [`demand`]: fetches the pages faults wait for, with reconnects and
//!   bounded retries of refused requests;
//! - [`transfer`]: pre-copy rounds and the background pull; [`retry`]: when
//!   a call to the source is tried again and when the migration gives up;
//! - [`guest`]: writing pages and mapping them into the VMM;
//!   [`install_gate`]: nothing is installed once the migration failed;
//! - [`source`]: the client side of the protocol, and what a reply must be;
//!   [`fence`]: only this migration's source, only while it is paused;
//! - [`agent`]: the migration's phases, supervising the fault loop;
//!   [`takeover`]: going on with a migration whose agent died;
//!   [`phase`]: the phase and the failure;
//! - [`handoff`]: the hand-off socket, bound at start and kept for the
//!   agent's life;
//! - [`shutdown`]: what a stop (SIGTERM) means in each phase;
//! - [`service`]: the gRPC server (status, switchover, health, reflection);
//! - [`stats`]: what the agent counts; [`metrics`]: its Prometheus metrics;
//! - [`test_hooks`]: misbehaviour on purpose, only with the `test-hooks`
//!   cargo feature;
//! - `sys`: the one `unsafe` call (the uffd's reactor registration).

pub mod agent;
pub mod demand;
pub mod fault_loop;
pub mod fault_waits;
pub mod fence;
pub mod guest;
pub mod handoff;
pub mod install_gate;
pub mod metrics;
pub mod page_state;
pub mod phase;
pub mod pull_order;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod stats;
mod sys;
pub mod takeover;
pub mod test_hooks;
pub mod transfer;
