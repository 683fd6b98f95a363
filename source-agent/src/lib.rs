//! The source agent of a post-copy migration: it serves one VM's memory
//! (pages and dirty bitmaps) over gRPC (`pageserver.v1.PageServer`).
//!
//! - [`memory`]: the guest memory, read with `pread` from a read-only
//!   descriptor, from a VMM's hand-off or a plain memory file;
//! - [`dirty`]: dirty tracking with epochs (userfaultfd WP-async +
//!   PAGEMAP_SCAN), and the rules that make bitmaps safe to retry (their
//!   wire encoding is `pageserver_proto::bitmap`);
//! - [`service`] and [`server`]: the gRPC service and server (with the
//!   agent shell's health and reflection);
//! - [`removed`]: pages removed from a VMM's memory file (holes punched),
//!   which write-protection does not report, found at every scan (as
//!   [`page_runs`], sets of pages kept as runs);
//! - [`drain`]: stopping within a bounded grace while targets hold
//!   streams open;
//! - [`handoff`]: the Unix socket on which the VMM hands its memory over;
//! - [`control`]: `pageserver.v1.MigrationSource`, for an orchestrator to
//!   report the VM paused (QEMU cannot say so over the hand-off);
//! - [`agent`]: the agent's state and counters;
//! - [`metrics`]: its Prometheus metrics; [`rpc_metrics`]: the tower layer
//!   that times and counts every RPC;
//! - [`wire`]: conversions to `pageserver.v1` messages and codes.
#![forbid(unsafe_code)]

pub mod agent;
pub mod control;
pub mod dirty;
pub mod drain;
pub mod handoff;
pub mod heat;
pub mod memory;
pub mod metrics;
pub mod page_runs;
pub mod pages_in_flight;
pub mod removed;
pub mod rpc_metrics;
pub mod server;
pub mod service;
pub mod wire;

pub use agent::SourceAgent;
pub use handoff::{HandoffListener, listen_for_handoff};
pub use memory::SourceMemory;
pub use pageserver_agent_shell::ServeError;
pub use server::{SourceLimits, serve, serve_secured, serve_with_grace};
