//! The target agent of a post-copy migration: pulls pre-copy rounds from the
//! source agent, then serves the guest's userfaultfd minor (and missing)
//! faults after switchover, installs fresh pages in bulk and pulls stale ones
//! in the background.
//!
//! - [`page_state`]: the per-page state machine and its rules;
//! - [`fault_loop`]: fault handling and demand fetches;
//! - [`transfer`]: pre-copy rounds and the background pull;
//! - [`guest`]: writing pages and mapping them into the VMM;
//! - [`source`]: the client side of the protocol;
//! - [`agent`]: the migration's phases; [`service`]: the gRPC server;
//! - [`stats`]: what the agent counts; [`metrics`]: its Prometheus metrics.

pub mod agent;
pub mod fault_loop;
pub mod guest;
pub mod metrics;
pub mod page_state;
pub mod service;
pub mod source;
pub mod stats;
mod sys;
pub mod transfer;
