//! The guest faults waiting for a page's fetch: when the oldest one on each
//! page was read, for its latency once the page is installed.
//!
//! Few pages have a fault waiting at any moment (the vCPUs, each blocked on
//! one page, and the faults the pull joins), so a map under a lock is
//! enough; a per-page array of timestamps would cost 8 bytes per page, 2 GiB
//! for a 1 TiB guest.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Per page with a fault waiting on its fetch: when the oldest such fault
/// was read (monotonic ns).
#[derive(Debug, Default)]
pub struct FaultWaits {
    started_ns: Mutex<HashMap<u64, u64>>,
}

impl FaultWaits {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        // Entries are independent: what a panicking holder left is usable.
        self.started_ns.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes a fault on `page` read at `started_ns`, unless an older one
    /// is noted already.
    pub fn note(&self, page: u64, started_ns: u64) {
        self.lock().entry(page).or_insert(started_ns);
    }

    /// Takes the note of `page`, if any: exactly one caller gets it.
    pub fn take(&self, page: u64) -> Option<u64> {
        self.lock().remove(&page)
    }

    /// How many pages have a fault waiting.
    pub fn count(&self) -> u64 {
        self.lock().len() as u64
    }

    /// The lowest `limit` pages with a fault waiting, ascending.
    pub fn pages(&self, limit: usize) -> Vec<u64> {
        let mut pages: Vec<u64> = self.lock().keys().copied().collect();
        pages.sort_unstable();
        pages.truncate(limit);
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_note_is_taken_once() {
        let waits = FaultWaits::default();
        waits.note(7, 100);
        waits.note(7, 200);
        waits.note(3, 50);
        assert_eq!(waits.count(), 2);
        assert_eq!(waits.pages(1), [3]);
        assert_eq!(waits.take(7), Some(100));
        assert_eq!(waits.take(7), None);
    }
}
