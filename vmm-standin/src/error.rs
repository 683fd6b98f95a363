//! Why the stand-in could not run (a failed command is answered with an
//! `error` event instead, see [`crate::protocol`]).

use guest_memory::UffdError;
use guest_memory::handoff::HandoffError;
use guest_memory::page_tables::ScanError;

/// Why the stand-in could not run, or a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("hand-off: {0}")]
    Handoff(#[from] HandoffError),
    #[error("hand-off")]
    Link(#[from] guest_memory::handoff_link::LinkError),
    #[error("the guest is already running")]
    AlreadyRunning,
    #[error("snapshot {path} has {have} bytes, the guest has {need}")]
    SnapshotSize { path: String, have: u64, need: u64 },
    #[error("reading which guest pages are mapped: {0}")]
    Mapped(#[from] ScanError),
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io_context(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let context = context.into();
    move |source| VmmError::Io { context, source }
}
