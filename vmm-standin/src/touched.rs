//! The pages a target guest run accessed at least once: what a MISSING-mode
//! post-copy target (CRIU lazy pages, or any target that holds none of the
//! guest's memory at resume) would have fetched over the network for the
//! same run, one fetch per first touch. The bench compares it with the
//! pages our agents fetch (only the stale ones).
//!
//! One bit per page, set with a relaxed `fetch_or` only when it is still
//! clear, so the vCPUs' hot loop pays one load for a page seen before.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap of the pages accessed at least once.
#[derive(Debug, Default)]
pub struct TouchedPages {
    total_pages: u64,
    words: Vec<AtomicU64>,
}

impl TouchedPages {
    /// An empty set over `total_pages` (8 KiB per GiB of 4 KiB pages; the
    /// zeroed allocation costs nothing until a word is set).
    pub fn new(total_pages: u64) -> Self {
        let words = total_pages.div_ceil(64) as usize;
        Self { total_pages, words: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Records an access to `page` (a page beyond the set is ignored).
    pub fn touch(&self, page: u64) {
        if page >= self.total_pages {
            return;
        }
        let Some(word) = self.words.get((page / 64) as usize) else { return };
        let bit = 1u64 << (page % 64);
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// How many distinct pages were touched.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|word| u64::from(word.load(Ordering::Relaxed).count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::TouchedPages;

    #[test]
    fn counts_each_page_once_and_ignores_pages_beyond_the_guest() {
        let touched = TouchedPages::new(130);
        for page in [0, 0, 63, 64, 64, 129, 130, 1 << 40] {
            touched.touch(page);
        }
        assert_eq!(touched.count(), 4);
    }
}
