//! Taking over a migration from a target agent that died.
//!
//! The VMM holds the guest's memory and its userfaultfd for its whole life;
//! an agent only borrows them. When the agent dies, the VMM sees its end of
//! the hand-off connection close and hands the same memory, uffd and pagemap
//! to the next agent on the socket, with `previous_handoffs > 0` and the
//! last [`Checkpoint`] the dead agent sent it. The new agent rebuilds the
//! page states from what the kernel and the source say, never from guesses:
//!
//! - *installed*: the pages the VMM's page tables map (PAGEMAP_SCAN,
//!   `PAGE_IS_PRESENT`, on the VMM's pagemap): only an install maps a page,
//!   and the guest may have written them since, so they are kept as they
//!   are;
//! - *stale*: what the source says changed since the epoch the checkpoint
//!   names (the final bitmap, asked again); from a restarted source, every
//!   page;
//! - *fresh*: every other page: its content in the file is the pre-copy
//!   content at that epoch, or content fetched from the paused source after
//!   it, both the source's content at pause; a hole there stays a hole (the
//!   bulk install skips it; a fault zero-fills it).
//!
//! Without a checkpoint the old agent died before pre-copy converged, when
//! nothing can be installed yet: the new agent checks that (a mapped page
//! without a checkpoint is refused) and starts over.
//!
//! Faults the dead agent had read but not resolved left vCPUs blocked in the
//! kernel with no message left to read: the new agent wakes every vCPU
//! waiting on the guest's memory (UFFDIO_WAKE over each region); those whose
//! page is still missing fault again, and the new agent reads those faults.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;

use guest_memory::page_tables::{ScanError, present_pages};
use guest_memory::{GuestLayout, UffdError};
use serde::{Deserialize, Serialize};

use crate::guest::GuestMemory;

/// What a target agent tells its VMM as the migration goes, so that an
/// agent taking over can go on (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The source's memory (`Layout.memory_id`): the new agent's source must
    /// serve the same.
    pub source_memory_id: String,
    /// The source incarnation and the epoch the target's file is current to:
    /// every pre-copy round up to it was written out.
    pub source_incarnation: String,
    pub precopy_epoch: u64,
    /// Switchover was declared: the source is paused and the guest runs on
    /// the target.
    pub switched_over: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("the VMM's checkpoint is not one this agent understands")]
    Checkpoint(#[source] serde_json::Error),
    #[error("the VMM handed over its memory again but no pagemap, which a takeover needs")]
    NoPagemap,
    #[error("reading which pages the VMM maps (region {region})")]
    Scan {
        region: usize,
        #[source]
        source: ScanError,
    },
    #[error(
        "{installed} pages are mapped into the guest, but the VMM has no checkpoint saying where the migration \
         was: refusing to guess"
    )]
    InstalledWithoutCheckpoint { installed: u64 },
    #[error("waking the vCPUs whose faults died with the old agent")]
    Wake(#[source] UffdError),
}

/// The checkpoint in a hand-off, parsed.
pub fn checkpoint_of(value: Option<&serde_json::Value>) -> Result<Option<Checkpoint>, TakeoverError> {
    value.map(|v| serde_json::from_value(v.clone()).map_err(TakeoverError::Checkpoint)).transpose()
}

/// The global page numbers the VMM's page tables map.
pub fn mapped_pages(pagemap: &impl AsFd, layout: &GuestLayout) -> Result<Vec<u64>, TakeoverError> {
    let mut pages = Vec::new();
    for (region, r) in layout.regions().iter().enumerate() {
        let first = layout.region_first_page(region as u32).unwrap_or(0);
        let present = present_pages(pagemap.as_fd(), r.base_host_virt_addr, r.size, r.page_size)
            .map_err(|source| TakeoverError::Scan { region, source })?;
        pages.extend(present.into_iter().map(|index| first + index));
    }
    Ok(pages)
}

/// Wakes every thread waiting on a fault in the guest's memory.
pub fn wake_all(guest: &GuestMemory) -> Result<(), TakeoverError> {
    for r in guest.layout.regions() {
        guest.uffd.wake(r.base_host_virt_addr, r.size).map_err(TakeoverError::Wake)?;
    }
    Ok(())
}
