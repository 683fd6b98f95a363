//! Guest memory as the agents, the VMM stand-in and the VMM shim see it.
//!
//! # Layout
//!
//! - [`uffd`]: the userfaultfd (the `userfaultfd` crate, plus the feature
//!   bits it lacks, `u64` addresses in the VMM's address space, and the one
//!   place that decides what each side registers);
//! - [`handoff`]: how a VMM passes its guest memory to an agent (a JSON
//!   layout plus file descriptors over a Unix socket, Firecracker-style);
//!   [`handoff_link`]: the VMM's side of it kept alive, handing the memory
//!   again to a new agent when the one holding it goes away;
//! - [`layout`]: regions and the global page numbering shared by both agents;
//! - [`memfile`]: memfd, sizing, holes, the monotonic clock;
//! - [`fd_passing`]: descriptors over a Unix socket (SCM_RIGHTS);
//! - [`page_tables`]: which pages of a VMM's mapping were written since the
//!   last look, or are present (PAGEMAP_SCAN, without touching them);
//! - [`hugepages`]: reserving 2 MiB huge pages for hugetlbfs guests;
//! - [`sys`]: every `unsafe` line of the crate (mappings, the userfaultfd
//!   calls the crate marks unsafe, PAGEMAP_SCAN).

pub mod fd_passing;
pub mod handoff;
pub mod handoff_link;
pub mod hugepages;
pub mod layout;
pub mod memfile;
pub mod page_tables;
pub mod sys;
pub mod uffd;

pub use layout::{GuestLayout, RegionLayout};
pub use sys::MemoryMap;
pub use uffd::{PageFault, UffdError, UffdEvent, Userfaultfd};
