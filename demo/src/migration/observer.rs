//! A test's view into a running migration: which source agent serves it,
//! and a gate that holds the migration (its source agent alive) until the
//! test has done what it came to do.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};

/// A source agent that listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedAgent {
    pub pid: u32,
    /// Its gRPC address, `HOST:PORT`.
    pub grpc: String,
    /// Its `/metrics` address, `HOST:PORT`.
    pub metrics: String,
}

/// What [`crate::MigrationOptions::observer`] gives a test.
#[derive(Debug, Clone)]
pub struct MigrationObserver {
    /// Told once the (first) source agent listens.
    pub source_agent: mpsc::UnboundedSender<StartedAgent>,
    /// Waited for after the target guest's run, before its memory is
    /// verified: the source agent is still up (`notify_one` releases it,
    /// before or after the migration gets there).
    pub before_verify: Arc<Notify>,
}
