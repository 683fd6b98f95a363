//! Free 2 MiB huge pages for a hugetlbfs test.

use std::sync::{Mutex, MutexGuard};

use guest_memory::hugepages::{self, HugePageReservation};

/// Free huge pages for one test at a time: tests of one binary run on
/// parallel threads and share the machine's pool, so a second hugetlbfs test
/// waits here until the first gives its pages back. The pool is grown as
/// root when too few are free, and shrunk again on drop
/// ([`guest_memory::hugepages`]).
#[derive(Debug)]
pub struct HugePages {
    _reservation: HugePageReservation,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl HugePages {
    /// Waits for the other hugetlbfs tests, then makes `need` huge pages
    /// free; fails the test if it cannot.
    pub fn reserve(need: u64) -> Self {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        // A test that panicked while holding the lock gave its pages back.
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let reservation = hugepages::reserve(need).unwrap_or_else(|e| panic!("huge pages: {e}"));
        Self { _reservation: reservation, _one_at_a_time: guard }
    }
}
