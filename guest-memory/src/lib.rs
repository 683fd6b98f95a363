//! Guest memory as the agents and the VMM stand-in see it.
//!
//! - [`sys`]: every `unsafe` line of the crate: mmap, memfd, fallocate, the
//!   userfaultfd ioctls, PAGEMAP_SCAN and SCM_RIGHTS.
//! - [`handoff`]: how a VMM passes its guest memory to an agent (a JSON layout
//!   plus file descriptors over a Unix socket, Firecracker-style).
//! - [`layout`]: regions and the global page numbering shared by both agents.
//! - [`hugepages`]: reserving 2 MiB huge pages for hugetlbfs guests.
//! - [`written`]: which pages a VMM wrote since the last look (PAGEMAP_SCAN
//!   over its write-protected mapping).

pub mod handoff;
pub mod hugepages;
pub mod layout;
pub mod sys;
pub mod written;

pub use layout::{GuestLayout, RegionLayout};
pub use sys::{MemoryMap, PageFault, UffdError, UffdEvent, Userfaultfd};
