//! The state of every guest page on the target, shared by the fault loop, the
//! bulk installer and the background puller.
//!
//! One byte per page, updated only with atomic compare-and-swap:
//!
//! ```text
//!            final bitmap: clean            bulk install / fault (CONTINUE)
//!   Unknown ───────────────────────▶ Fresh ─────────────────────────────▶ Installed
//!      │  ╲  final bitmap: dirty                                            ▲
//!      │   ╲────────────────────▶ Stale ──claim──▶ FetchingStale ──────────┤
//!      │                                                  (content from the │
//!      └──────claim (fault before the bitmap)──▶ FetchingUnknown ───────────┘
//!                                                         paused source)
//! ```
//!
//! Rules (DESIGN.md, "Page states on the target"):
//! 1. A page is installed (UFFDIO_CONTINUE) only from `Fresh`, or from a
//!    `Fetching*` state by whoever claimed it, after writing the content just
//!    fetched from the *paused* source.
//! 2. `Unknown` pages are never continued: a fault on one claims it and
//!    fetches it (the source is always right).
//! 3. Applying the final bitmap marks every dirty page `Stale` *before* any
//!    clean page becomes `Fresh`; only `Unknown` pages change, so pages
//!    claimed or installed before the bitmap arrived keep their state.
//! 4. A claim (`Unknown`/`Stale` → `Fetching*`) succeeds for exactly one
//!    party, so concurrent faults and the background fetch a page once.
//!
//! Three flag bits ride along: `PRESENT` (the target's file holds a page for
//! it, so CONTINUE can map it; otherwise it is a hole and faults as MISSING),
//! `FETCHED` (fetched after switchover, to catch double fetches) and `DEMAND`
//! (claimed by the fault loop, so its requests can be re-sent after a broken
//! connection without keeping a set of them on the fault path).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum PageState {
    Unknown = 0,
    Fresh = 1,
    Stale = 2,
    FetchingUnknown = 3,
    FetchingStale = 4,
    Installed = 5,
}

impl PageState {
    pub const ALL: [PageState; 6] = [
        PageState::Unknown,
        PageState::Fresh,
        PageState::Stale,
        PageState::FetchingUnknown,
        PageState::FetchingStale,
        PageState::Installed,
    ];

    fn from_bits(b: u8) -> Self {
        match b & STATE_MASK {
            0 => PageState::Unknown,
            1 => PageState::Fresh,
            2 => PageState::Stale,
            3 => PageState::FetchingUnknown,
            4 => PageState::FetchingStale,
            _ => PageState::Installed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PageState::Unknown => "unknown",
            PageState::Fresh => "fresh",
            PageState::Stale => "stale",
            PageState::FetchingUnknown => "fetching_unknown",
            PageState::FetchingStale => "fetching_stale",
            PageState::Installed => "installed",
        }
    }
}

const STATE_MASK: u8 = 0b0000_0111;
const DEMAND: u8 = 0b0010_0000;
const FETCHED: u8 = 0b0100_0000;
const PRESENT: u8 = 0b1000_0000;

/// A snapshot of one page's byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    pub state: PageState,
    pub present: bool,
}

/// Per-page states of the whole guest (global page numbers).
#[derive(Debug)]
pub struct PageStates {
    bytes: Vec<AtomicU8>,
}

impl PageStates {
    /// Every page `Unknown` and absent.
    pub fn new(pages: u64) -> Self {
        Self { bytes: (0..pages).map(|_| AtomicU8::new(0)).collect() }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn get(&self, page: u64) -> PageEntry {
        let b = self.bytes[page as usize].load(Ordering::Acquire);
        PageEntry { state: PageState::from_bits(b), present: b & PRESENT != 0 }
    }

    pub fn state(&self, page: u64) -> PageState {
        self.get(page).state
    }

    /// Moves `page` from `from` to `to`, keeping its flags. True if it was in
    /// `from` (and now is in `to`).
    /// A transition out of a claim also drops the `DEMAND` mark.
    pub fn transition(&self, page: u64, from: PageState, to: PageState) -> bool {
        self.bytes[page as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (PageState::from_bits(b) == from).then_some((b & !STATE_MASK & !DEMAND) | to as u8)
            })
            .is_ok()
    }

    /// Claims `page` for fetching if it is `Unknown` or `Stale`. Returns the
    /// state it was claimed from, or `None` if someone else owns it or it
    /// needs no fetch.
    pub fn claim(&self, page: u64) -> Option<PageState> {
        self.claim_marked(page, 0)
    }

    /// [`PageStates::claim`] for the fault loop: the claim is marked as a
    /// demand fetch (see [`PageStates::demand_claims`]).
    pub fn claim_for_demand(&self, page: u64) -> Option<PageState> {
        self.claim_marked(page, DEMAND)
    }

    fn claim_marked(&self, page: u64, mark: u8) -> Option<PageState> {
        let mut claimed = None;
        let _ = self.bytes[page as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let to = match PageState::from_bits(b) {
                PageState::Unknown => PageState::FetchingUnknown,
                PageState::Stale => PageState::FetchingStale,
                _ => return None,
            };
            claimed = Some(PageState::from_bits(b));
            Some((b & !STATE_MASK) | mark | to as u8)
        });
        claimed
    }

    /// Pages claimed by demand fetches and not installed yet (O(pages): for
    /// re-sending after a broken connection, not for the fault path).
    pub fn demand_claims(&self) -> Vec<u64> {
        (0..self.len())
            .filter(|&p| {
                let b = self.bytes[p as usize].load(Ordering::Acquire);
                b & DEMAND != 0
                    && matches!(PageState::from_bits(b), PageState::FetchingUnknown | PageState::FetchingStale)
            })
            .collect()
    }

    /// Marks the page's content as written to the target's file.
    pub fn set_present(&self, page: u64) {
        self.bytes[page as usize].fetch_or(PRESENT, Ordering::AcqRel);
    }

    /// Records a post-switchover fetch; true if the page had been fetched
    /// already (which must never happen).
    pub fn mark_fetched(&self, page: u64) -> bool {
        self.bytes[page as usize].fetch_or(FETCHED, Ordering::AcqRel) & FETCHED != 0
    }

    /// Pages per state, in [`PageState::ALL`] order.
    pub fn counts(&self) -> [u64; 6] {
        let mut counts = [0u64; 6];
        for b in &self.bytes {
            counts[PageState::from_bits(b.load(Ordering::Relaxed)) as usize] += 1;
        }
        counts
    }

    /// Applies the final bitmap (rule 3): `dirty` pages that are still
    /// `Unknown` become `Stale`, then every other `Unknown` page becomes
    /// `Fresh`. Returns the pages made stale.
    pub fn apply_final_bitmap(&self, dirty: &[u64]) -> Vec<u64> {
        let mut stale = Vec::with_capacity(dirty.len());
        for &page in dirty {
            if self.transition(page, PageState::Unknown, PageState::Stale) {
                stale.push(page);
            }
        }
        for page in 0..self.len() {
            self.transition(page, PageState::Unknown, PageState::Fresh);
        }
        stale
    }

    /// Runs [first, end) of pages that are `Fresh` and present: what a bulk
    /// UFFDIO_CONTINUE can map.
    pub fn fresh_present_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start = None;
        for page in 0..self.len() {
            let e = self.get(page);
            let ok = e.state == PageState::Fresh && e.present;
            match (ok, start) {
                (true, None) => start = Some(page),
                (false, Some(s)) => {
                    runs.push((s, page));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, self.len()));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_is_exclusive_and_keeps_flags() {
        let s = PageStates::new(4);
        s.set_present(1);
        assert_eq!(s.claim(1), Some(PageState::Unknown));
        assert_eq!(s.claim(1), None);
        assert_eq!(s.get(1), PageEntry { state: PageState::FetchingUnknown, present: true });
        assert!(s.transition(1, PageState::FetchingUnknown, PageState::Installed));
        assert!(s.get(1).present);
        assert!(!s.mark_fetched(1));
        assert!(s.mark_fetched(1));
    }

    #[test]
    fn demand_claims_are_listed_until_installed() {
        let s = PageStates::new(4);
        s.apply_final_bitmap(&[1, 2, 3]);
        assert_eq!(s.claim_for_demand(1), Some(PageState::Stale));
        assert_eq!(s.claim(2), Some(PageState::Stale)); // the background's
        assert_eq!(s.demand_claims(), vec![1]);
        assert!(s.transition(1, PageState::FetchingStale, PageState::Installed));
        assert!(s.demand_claims().is_empty());
        assert_eq!(s.claim_for_demand(1), None);
    }

    #[test]
    fn final_bitmap_marks_stale_first_and_spares_claimed_pages() {
        let s = PageStates::new(6);
        assert_eq!(s.claim(2), Some(PageState::Unknown)); // a fault before the bitmap
        let stale = s.apply_final_bitmap(&[1, 2, 4]);
        assert_eq!(stale, vec![1, 4]);
        assert_eq!(s.state(0), PageState::Fresh);
        assert_eq!(s.state(1), PageState::Stale);
        assert_eq!(s.state(2), PageState::FetchingUnknown);
        assert_eq!(s.state(3), PageState::Fresh);
        assert_eq!(s.claim(4), Some(PageState::Stale));
        assert_eq!(s.claim(0), None, "fresh pages are never fetched");
    }

    #[test]
    fn fresh_runs_skip_holes_and_other_states() {
        let s = PageStates::new(8);
        for p in [0, 1, 2, 4, 5, 7] {
            s.set_present(p);
        }
        s.apply_final_bitmap(&[5]);
        assert_eq!(s.fresh_present_runs(), vec![(0, 3), (4, 5), (7, 8)]);
    }
}
