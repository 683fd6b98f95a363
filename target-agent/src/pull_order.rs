//! The order of the background pull of stale pages after the switchover.
//!
//! - [`PullOrder::Nearest`]: stale pages in address order from the guest's
//!   latest fault on (the neighbours of what it touches now).
//! - [`PullOrder::Hot`]: first the pages of the source's heat hint (those
//!   the guest dirtied in the most pre-copy rounds, hottest first:
//!   [`pageserver_proto::heat`]), then the rest nearest-first. A guest that
//!   rewrites a working set over and over reads it again soon after it
//!   resumes; its cold pages (written once) can wait.
//!
//! The hint only orders: [`HotFirst`] keeps only hinted pages that the final
//! bitmap made stale, and the pull still claims each page (a page that is
//! not stale cannot be claimed), so a wrong hint costs time, never a page.
#![forbid(unsafe_code)]

/// Which stale pages the background pull asks for first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PullOrder {
    /// Nearest to the guest's latest fault first.
    Nearest,
    /// The source's hottest pages first, then nearest to the latest fault:
    /// the default, as it made fewer than half the guest's waits for pages
    /// of nearest-first on the benchmark's hot/cold workload (1 911 against
    /// 4 043).
    #[default]
    Hot,
}

impl PullOrder {
    pub fn name(self) -> &'static str {
        match self {
            PullOrder::Nearest => "nearest",
            PullOrder::Hot => "hot",
        }
    }
}

/// The hinted stale pages, in the order the pull takes them, and how many
/// pages the pull fetched from its start before its first unhinted one
/// (its *hot lead*: every hinted page when the hot pages go first).
#[derive(Debug)]
pub struct HotFirst {
    /// Hinted stale pages, hottest first; empty in nearest order.
    queue: Vec<u64>,
    next: usize,
    /// Every hinted stale page, sorted (for the lead, in either order).
    hinted: Vec<u64>,
    /// Every page pulled so far was hinted.
    leading: bool,
}

impl HotFirst {
    /// `hint`: the source's hot pages, hottest first; `stale`: the pages to
    /// pull, ascending. Hinted pages that are not stale are dropped.
    pub fn new(order: PullOrder, hint: &[u64], stale: &[u64]) -> Self {
        let named: Vec<u64> = hint.iter().copied().filter(|page| stale.binary_search(page).is_ok()).collect();
        let mut hinted = named.clone();
        hinted.sort_unstable();
        let queue = match order {
            PullOrder::Hot => named,
            PullOrder::Nearest => Vec::new(),
        };
        Self { queue, next: 0, hinted, leading: true }
    }

    /// Stale pages the hint named.
    pub fn hinted(&self) -> u64 {
        self.hinted.len() as u64
    }

    /// The next hinted page to try, if any is left.
    pub fn peek(&self) -> Option<u64> {
        self.queue.get(self.next).copied()
    }

    /// The page [`HotFirst::peek`] gave is taken (or was not claimable).
    pub fn advance(&mut self) {
        self.next += 1;
    }

    /// The pull asks for `page`; returns whether it extends the hot lead.
    pub fn pulled(&mut self, page: u64) -> bool {
        self.leading &= self.hinted.binary_search(&page).is_ok();
        self.leading
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stale_hinted_pages_are_queued_hottest_first() {
        let stale = [2, 3, 5, 8, 9];
        let mut hot = HotFirst::new(PullOrder::Hot, &[9, 4, 2, 3], &stale);
        assert_eq!(hot.hinted(), 3, "page 4 is not stale: it cannot be pulled");
        let mut order = Vec::new();
        while let Some(page) = hot.peek() {
            order.push(page);
            hot.advance();
        }
        assert_eq!(order, vec![9, 2, 3]);
    }

    #[test]
    fn the_lead_ends_at_the_first_unhinted_page() {
        let mut hot = HotFirst::new(PullOrder::Nearest, &[9, 3], &[2, 3, 9]);
        assert_eq!(hot.peek(), None, "nearest order queues nothing");
        assert!(hot.pulled(3));
        assert!(hot.pulled(9));
        assert!(!hot.pulled(2));
        assert!(!hot.pulled(3), "a lead once broken stays broken");
    }
}
