//! The two ends of a stop in post-copy: naming the pages the guest still
//! needs from the source (when the grace ran out), and handing the guest's
//! memory back to the kernel (when the migration is complete).
#![forbid(unsafe_code)]

use std::fmt;

use guest_memory::UffdError;

use crate::guest::GuestMemory;
use crate::page_state::PageState;

/// Pages named in a failure's reason (the counts are exact).
const PAGES_NAMED: usize = 16;

/// The pages that still need the source, by state, and the first of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPages {
    /// (state, pages in it), for the states that need the source.
    pub by_state: Vec<(PageState, u64)>,
    /// The first [`PAGES_NAMED`] of those pages.
    pub first: Vec<u64>,
    pub total: u64,
}

/// The states whose pages the guest cannot be given without the source.
const NEED_THE_SOURCE: [PageState; 4] =
    [PageState::Unknown, PageState::Stale, PageState::FetchingUnknown, PageState::FetchingStale];

impl PendingPages {
    /// Looks at every page's state now (O(pages)).
    pub fn of(guest: &GuestMemory) -> Self {
        let counts = guest.states.counts();
        let by_state: Vec<_> = NEED_THE_SOURCE.iter().map(|&state| (state, counts[state as usize])).collect();
        let first = (0..guest.states.len())
            .filter(|&page| NEED_THE_SOURCE.contains(&guest.states.state(page)))
            .take(PAGES_NAMED)
            .collect();
        Self { total: by_state.iter().map(|(_, n)| n).sum(), by_state, first }
    }
}

impl fmt::Display for PendingPages {
    /// "3 pages still need the source (unknown 1, stale 2, …): pages 7, 9, 12".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return write!(f, "no page needs the source any more");
        }
        let states: Vec<String> = self
            .by_state
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(state, count)| format!("{} {count}", state.name()))
            .collect();
        let pages: Vec<String> = self.first.iter().map(u64::to_string).collect();
        let more = if self.total > self.first.len() as u64 { ", …" } else { "" };
        write!(
            f,
            "{} pages still need the source ({}): pages {}{more}",
            self.total,
            states.join(", "),
            pages.join(", ")
        )
    }
}

/// Unregisters every region of the guest from the userfaultfd: from then on
/// the kernel serves the guest's faults itself (a hole is zero-filled, a
/// page the VMM dropped comes back from the page cache), as the agent would
/// once the migration is complete. A VMM that has exited (or unmapped its
/// guest memory) has nothing to give back: the kernel says ENOMEM (no such
/// address space, or no mapping in the range).
pub fn release_guest(guest: &GuestMemory) -> Result<(), UffdError> {
    let gone = rustix::io::Errno::NOMEM.raw_os_error();
    for region in guest.layout.regions() {
        match guest.uffd.unregister(region.base_host_virt_addr, region.size) {
            Ok(()) => {}
            Err(UffdError::Os { source, .. }) if source.raw_os_error() == Some(gone) => {
                tracing::info!("the target VMM has exited or unmapped its memory: no guest memory to hand back");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_counts_by_state_and_names_the_first_pages() {
        let pending = PendingPages {
            by_state: vec![
                (PageState::Unknown, 0),
                (PageState::Stale, 20),
                (PageState::FetchingUnknown, 0),
                (PageState::FetchingStale, 1),
            ],
            first: (100..116).collect(),
            total: 21,
        };
        assert_eq!(
            pending.to_string(),
            "21 pages still need the source (stale 20, fetching_stale 1): pages 100, 101, 102, 103, 104, 105, 106, \
             107, 108, 109, 110, 111, 112, 113, 114, 115, …"
        );
        let few = PendingPages { by_state: vec![(PageState::Unknown, 2)], first: vec![3, 9], total: 2 };
        assert_eq!(few.to_string(), "2 pages still need the source (unknown 2): pages 3, 9");
        let none = PendingPages { by_state: vec![], first: vec![], total: 0 };
        assert_eq!(none.to_string(), "no page needs the source any more");
    }
}
