//! What the target guest wrote: for every page a vCPU wrote, its content
//! from before the first write, so that the memory the agent installed can
//! still be compared with the source's snapshot after the guest changed it.
//!
//! Each vCPU writes only its own pages (`page % vcpus == vcpu`) and keeps
//! their log, so a vCPU never waits for another. The lock of a log is held
//! only to look a page up or to insert one, never across a guest access: a
//! vCPU blocked in a fault (for ever, if the agent died) holds no lock, and
//! a verification can always take it. A page's old content is inserted
//! before the page is written, so whoever holds the lock sees, for each of
//! the owner's pages, either its pre-write copy or a page its owner has not
//! written and cannot write until the lock is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The undo log never holds more than this many bytes (2 MiB pages add up).
pub const UNDO_LOG_MAX_BYTES: u64 = 256 << 20;

/// One vCPU's written pages and their content before the first write.
pub type PagesBefore = HashMap<u64, Vec<u8>>;

/// The undo logs of all vCPUs, and the budget of pages they may write.
#[derive(Debug)]
pub struct UndoLogs {
    logs: Vec<Mutex<PagesBefore>>,
    pages_written: AtomicU64,
    max_written_pages: u64,
}

impl UndoLogs {
    /// Logs for `vcpus` vCPUs, at most `max_written_pages` pages (and
    /// [`UNDO_LOG_MAX_BYTES`]) of `page_size` bytes in all.
    pub fn new(vcpus: usize, page_size: u64, max_written_pages: u64) -> Self {
        Self {
            logs: (0..vcpus).map(|_| Mutex::new(PagesBefore::new())).collect(),
            pages_written: AtomicU64::new(0),
            max_written_pages: max_written_pages.min(UNDO_LOG_MAX_BYTES / page_size),
        }
    }

    /// The vCPU that owns (alone writes) `page`.
    pub fn owner(&self, page: u64) -> usize {
        (page % self.logs.len() as u64) as usize
    }

    /// Pages written so far, by all vCPUs.
    pub fn pages_written(&self) -> u64 {
        self.pages_written.load(Ordering::Relaxed)
    }

    /// Whether `page`'s owner has logged it (that is, may have written it).
    pub fn contains(&self, page: u64) -> bool {
        self.lock_owner_of(page).contains_key(&page)
    }

    /// Takes one page of the budget; false once it is spent (the guest then
    /// writes no new page).
    pub fn reserve_page(&self) -> bool {
        self.pages_written
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_written_pages).then_some(n + 1))
            .is_ok()
    }

    /// Records `page`'s content before its first write; called by its owner,
    /// after reading the content (with no lock held) and before writing.
    pub fn insert(&self, page: u64, before: Vec<u8>) {
        self.lock_owner_of(page).insert(page, before);
    }

    /// The log of `page`'s owner, locked: while it is held, the owner cannot
    /// log (and so cannot write) a page it has not logged yet.
    pub fn lock_owner_of(&self, page: u64) -> MutexGuard<'_, PagesBefore> {
        // A vCPU that panicked leaves its log usable.
        self.logs[self.owner(page)].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_belong_to_one_vcpu_each() {
        let logs = UndoLogs::new(3, 4096, 10);
        assert_eq!((logs.owner(0), logs.owner(4), logs.owner(8)), (0, 1, 2));
        logs.insert(4, vec![1]);
        assert!(logs.contains(4));
        assert!(!logs.contains(1), "same owner, another page");
        assert_eq!(logs.lock_owner_of(7).get(&4), Some(&vec![1]), "7 and 4 share vCPU 1's log");
    }

    #[test]
    fn the_budget_bounds_pages_and_bytes() {
        let logs = UndoLogs::new(1, 4096, 2);
        assert!(logs.reserve_page() && logs.reserve_page());
        assert!(!logs.reserve_page());
        assert_eq!(logs.pages_written(), 2);
        let huge = UndoLogs::new(1, 2 << 20, u64::MAX);
        assert_eq!(huge.max_written_pages, UNDO_LOG_MAX_BYTES / (2 << 20));
    }
}
