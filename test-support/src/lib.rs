//! What the integration tests share. Those of the VMM side (`vmm-standin`
//! and `vmm-shim`) play the agent against a real VMM process, so they need
//! the agent's end of the hand-off, a fault handler for the target's
//! userfaultfd, and the VMM as a child process whose stderr they can show;
//! the agents' start-up tests need an agent run to its refusal.
//! Used only as a dev-dependency; every helper panics with a message on
//! failure, as test code should.
//!
//! # Layout
//!
//! - [`handoff_listener`]: [`HandoffListener`], the agent's end of a hand-off
//!   socket: bind a path, accept with a deadline, fail fast with the VMM's
//!   stderr if it exits first;
//! - [`fault_server`]: [`FaultServer`], a thread that resolves the faults of
//!   a handed-off target userfaultfd (MINOR → `UFFDIO_CONTINUE`, MISSING →
//!   `UFFDIO_COPY` of test content) and counts them;
//! - [`foreign_peer`]: a hand-off attempt by another user (the test binary
//!   run again as `nobody`), for the agents' peer-credential check;
//! - [`grpcurl`]: the real grpcurl, found;
//! - [`manifests`]: the Kubernetes manifests rendered by `kubectl kustomize`,
//!   as JSON, and their containers with the securityContext of each;
//! - [`child`]: [`TestChild`], a process with piped stdin, stdout lines on a
//!   channel and stderr in a log file, killed when dropped;
//! - [`temp_dir`]: [`TempDir`], a scratch directory under /dev/shm;
//! - [`huge_pages`]: [`HugePages`], free 2 MiB pages for one test at a time;
//! - [`refusal`]: an agent binary run until it refuses to start, and the
//!   check that it refused as it should;
//! - [`socket_access`]: the mode and group of a real agent's hand-off
//!   socket (`--handoff-group`);
//! - [`written_pages`]: the pages a VMM wrote since the last look.
#![forbid(unsafe_code)]

pub mod child;
pub mod fault_server;
pub mod foreign_peer;
pub mod grpcurl;
pub mod handoff_listener;
pub mod huge_pages;
pub mod manifests;
pub mod refusal;
pub mod socket_access;
pub mod temp_dir;

use std::os::fd::BorrowedFd;
use std::time::Duration;

pub use child::TestChild;
pub use fault_server::FaultServer;
pub use handoff_listener::HandoffListener;
pub use huge_pages::HugePages;
pub use temp_dir::TempDir;

/// Longest wait for anything a VMM process should do: generous, because
/// the tests share two cores with everything else the suite runs.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Pages written in [`base`, `base + size`) since the last call, through the
/// VMM's handed-over pagemap (PAGEMAP_SCAN; they are write-protected again).
pub fn written_pages(pagemap: BorrowedFd<'_>, base: u64, size: u64, page_size: u64) -> Vec<u64> {
    guest_memory::page_tables::written_pages(pagemap, base, size, page_size).expect("PAGEMAP_SCAN")
}
