//! The state of every guest page on the target, and the one place that
//! decides how it changes. The fault loop, the demand fetcher, the bulk
//! installer and the background pull all ask this module; none of them
//! changes a page's state by itself.
//!
//! One byte per page, updated only with atomic compare-and-swap:
//!
//! ```text
//!            final bitmap: clean              fault / bulk install (CONTINUE)
//!   Unknown ───────────────────────▶ Fresh ──────────────────────────────▶ Installed
//!      │  ╲  final bitmap: dirty                                             ▲
//!      │   ╲────────────────────▶ Stale ──claim──▶ FetchingStale ───────────┤
//!      │                                                   (content just     │
//!      └──────claim (fault before the bitmap)──▶ FetchingUnknown ────────────┘
//!                                                  fetched from the paused source)
//! ```
//!
//! # Rules
//!
//! 1. A page is installed (mapped into the VMM) only from `Fresh`, or from a
//!    `Fetching*` state by whoever holds its [`Claim`], after writing the
//!    content just fetched from the *paused* source. The claim is a value:
//!    [`PageStates::claim`] and [`PageStates::on_fault`] create it, and
//!    [`PageStates::finish_fetch`] consumes it, so installing a fetched page
//!    without owning its fetch does not compile, and a claim cannot be used
//!    twice.
//! 2. `Unknown` pages are never mapped as they are: a fault on one claims it
//!    and fetches it (the paused source is always right).
//! 3. Applying the final bitmap marks every dirty page `Stale` *before* any
//!    clean page becomes `Fresh`; only `Unknown` pages change, so pages
//!    claimed or installed before the bitmap arrived keep their state.
//! 4. A claim (`Unknown`/`Stale` → `Fetching*`) succeeds for exactly one
//!    party, so concurrent faults and the background pull fetch a page once;
//!    the others [`FaultAction::Wait`] for the holder's install, which wakes
//!    them.
//! 5. `Installed` is final: nothing leaves it, so nothing is fetched twice.
//! 6. An agent taking over a migration ([`crate::takeover`]) starts from the
//!    kernel's view: the pages the VMM maps are `Installed`, every other
//!    page `Unknown` until the final bitmap (asked again) says which are
//!    stale.
//! 7. A page the VMM discards (`UFFD_EVENT_REMOVE` for MADV_DONTNEED /
//!    MADV_REMOVE, `UFFD_EVENT_UNMAP`) is marked `REMOVED` and never filled
//!    from the source unasked: the background pull and the bulk install
//!    leave it alone. If the VMM punched it out, its content is zeros by the
//!    VMM's own doing: a MISSING fault on it makes an `Unknown` or `Stale`
//!    page `Fresh` and zero-fills it. If the VMM only unmapped it (the page
//!    cache still holds our copy, which may be stale), a MINOR fault fetches
//!    it like any stale page.
//!
//! # Invariants (checked by the unit tests in `page_state/tests.rs`)
//!
//! - every page is in exactly one state; counts always sum to the guest's
//!   pages;
//! - a page's `PRESENT` flag (the target's file holds content for it) is
//!   only ever set, and only by whoever writes the page (pre-copy, an
//!   install, a zero fill);
//! - a [`Claim`] exists for a page if and only if the page is `Fetching*`.
//!
//! # What the kernel says wins
//!
//! A fault is MINOR when the page cache holds the page and MISSING when the
//! file has a hole there. [`PageStates::on_fault`] decides a fresh or
//! installed page's resolution from that, not from `PRESENT`: if the VMM
//! punched a page out after it was installed (`MADV_REMOVE`), its content is
//! zeros by the VMM's own doing, and a zero fill is what it expects.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum PageState {
    /// Pre-copied (or a hole), and the final bitmap has not said yet whether
    /// the source changed it since.
    Unknown = 0,
    /// The target's copy is the source's content at pause.
    Fresh = 1,
    /// The source changed it after its last copy: it must be fetched.
    Stale = 2,
    /// Claimed for fetching before the final bitmap said anything.
    FetchingUnknown = 3,
    /// Claimed for fetching after the final bitmap marked it stale.
    FetchingStale = 4,
    /// Mapped into the VMM with the source's content at pause. Final.
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

    /// The name metrics and the status use.
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
/// The target's file holds content for the page (it is not a hole).
const PRESENT: u8 = 0b1000_0000;
/// The VMM discarded the page (rule 7).
const REMOVED: u8 = 0b0100_0000;

/// Who fetches a claimed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOrigin {
    /// A guest fault is waiting for it.
    Demand,
    /// The background pull of stale pages.
    Background,
}

/// The exclusive right to fetch one page and install it.
///
/// Only this module creates one (a successful claim) and only
/// [`PageStates::finish_fetch`] consumes it. It is neither `Clone` nor
/// `Copy`. Dropping one without finishing leaves the page `Fetching*`
/// forever: nobody else may install it, and a fault on it waits. That is
/// the safe outcome of a failure (the guest freezes rather than see a wrong
/// page), and the failure is reported where it happened.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a claim left unfinished freezes every fault on its page"]
pub struct Claim {
    page: u64,
    /// The state it was claimed from: `Unknown` or `Stale`.
    from: PageState,
    origin: FetchOrigin,
}

impl Claim {
    pub fn page(&self) -> u64 {
        self.page
    }

    /// The final bitmap had marked the page stale (not unknown) when claimed.
    pub fn was_known(&self) -> bool {
        self.from == PageState::Stale
    }

    pub fn origin(&self) -> FetchOrigin {
        self.origin
    }

    fn fetching_state(&self) -> PageState {
        if self.was_known() { PageState::FetchingStale } else { PageState::FetchingUnknown }
    }
}

/// How a fault on a page that needs no fetch is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFill {
    /// The page cache holds it (a MINOR fault): map it (UFFDIO_CONTINUE).
    Continue,
    /// A hole (a MISSING fault) whose content is zeros: fill it with zeros.
    ZeroFill,
}

/// A fault on a `Fresh` or `Installed` page, to be resolved without the
/// network. Consumed by [`PageStates::finish_local`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a fault resolved without finishing leaves its page fresh"]
pub struct LocalResolution {
    page: u64,
    fill: LocalFill,
    /// Already installed (mapped before, e.g. by another fault or the bulk
    /// install, or zapped by the VMM since).
    installed: bool,
}

impl LocalResolution {
    pub fn page(&self) -> u64 {
        self.page
    }

    pub fn fill(&self) -> LocalFill {
        self.fill
    }
}

/// What to do about one guest fault: the single entry point of the fault
/// loop ([`PageStates::on_fault`]).
#[derive(Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Fresh or already installed: resolve it now, no network.
    Local(LocalResolution),
    /// Needs the paused source, and this fault now owns the fetch.
    Fetch(Claim),
    /// Someone else owns the page's fetch; its install wakes this fault.
    /// `known`: the page was stale (not unknown) when claimed.
    Wait { known: bool },
}

/// A run [first, end) of fresh pages the target's file holds: what one
/// bulk UFFDIO_CONTINUE may map. Consumed by [`PageStates::finish_fresh_run`].
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct FreshRun {
    first: u64,
    end: u64,
}

impl FreshRun {
    /// The first page of the run.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The page after the run's last.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// Why a claim could not be finished: its page is not in the state the
/// claim says. Only a bug in this module can cause it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("page {page} is {actual:?}, but a claim from {from:?} was being finished")]
pub struct ClaimMismatch {
    pub page: u64,
    pub from: PageState,
    pub actual: PageState,
}

/// Per-page states of the whole guest (global page numbers).
#[derive(Debug)]
pub struct PageStates {
    bytes: Vec<AtomicU8>,
    /// Pages per state, in [`PageState::ALL`] order, kept by every
    /// transition, so that status and metrics (polled every few
    /// milliseconds) cost nothing per page: counting a 1 GiB guest's bytes
    /// took ~0.3 ms per poll, a 1 TiB guest's would take a second. Each
    /// transition moves one count after its page's byte, so a reader may see
    /// a page in flight counted in neither state or, briefly, the sum off
    /// by the transitions under way.
    counts: [AtomicU64; 6],
}

impl PageStates {
    /// Every page `Unknown` and absent (a hole).
    pub fn new(pages: u64) -> Self {
        let counts = [pages, 0, 0, 0, 0, 0].map(AtomicU64::new);
        Self { bytes: (0..pages).map(|_| AtomicU8::new(0)).collect(), counts }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn load(&self, page: u64) -> u8 {
        self.bytes[page as usize].load(Ordering::Acquire)
    }

    pub fn state(&self, page: u64) -> PageState {
        PageState::from_bits(self.load(page))
    }

    /// Whether the target's file holds content for `page`.
    pub fn is_present(&self, page: u64) -> bool {
        self.load(page) & PRESENT != 0
    }

    /// Records that the target's file now holds content for `page`.
    pub fn set_present(&self, page: u64) {
        self.bytes[page as usize].fetch_or(PRESENT, Ordering::AcqRel);
    }

    /// Rule 7: the VMM discarded `page`.
    pub fn mark_removed(&self, page: u64) {
        self.bytes[page as usize].fetch_or(REMOVED, Ordering::AcqRel);
    }

    /// Whether the VMM discarded `page` (rule 7).
    pub fn is_removed(&self, page: u64) -> bool {
        self.load(page) & REMOVED != 0
    }

    /// Moves `page` from `from` to `to`, keeping its flags; true if it was
    /// in `from`. Private: every transition is one of this module's rules.
    fn transition(&self, page: u64, from: PageState, to: PageState) -> bool {
        let moved = self.transition_uncounted(page, from, to);
        if moved {
            self.count_moved(from, to, 1);
        }
        moved
    }

    /// [`transition`](Self::transition) for loops over many pages, which
    /// count what they moved once, with [`count_moved`](Self::count_moved).
    fn transition_uncounted(&self, page: u64, from: PageState, to: PageState) -> bool {
        self.bytes[page as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (PageState::from_bits(b) == from).then_some((b & !STATE_MASK) | to as u8)
            })
            .is_ok()
    }

    /// `pages` pages went from `from` to `to`.
    fn count_moved(&self, from: PageState, to: PageState, pages: u64) {
        if pages > 0 {
            self.counts[from as usize].fetch_sub(pages, Ordering::Relaxed);
            self.counts[to as usize].fetch_add(pages, Ordering::Relaxed);
        }
    }

    /// Claims `page` for `origin` if it is `Unknown` or `Stale` (rule 4),
    /// and, for the background pull, not removed by the VMM (rule 7).
    pub fn claim(&self, page: u64, origin: FetchOrigin) -> Option<Claim> {
        let fetching = |state| match state {
            PageState::Unknown => Some(PageState::FetchingUnknown),
            PageState::Stale => Some(PageState::FetchingStale),
            _ => None,
        };
        // What the successful exchange replaced decides (the closure may
        // have run before on a value that changed meanwhile).
        let before = self.bytes[page as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                if origin == FetchOrigin::Background && b & REMOVED != 0 {
                    return None;
                }
                fetching(PageState::from_bits(b)).map(|to| (b & !STATE_MASK) | to as u8)
            })
            .ok()?;
        let from = PageState::from_bits(before);
        self.count_moved(from, fetching(from)?, 1);
        Some(Claim { page, from, origin })
    }

    /// Decides what a guest fault on `page` needs. `minor`: the kernel
    /// raised it as a MINOR fault (the page cache holds the page).
    pub fn on_fault(&self, page: u64, minor: bool) -> FaultAction {
        loop {
            let state = self.state(page);
            match state {
                PageState::Fresh | PageState::Installed => {
                    let fill = if minor { LocalFill::Continue } else { LocalFill::ZeroFill };
                    return FaultAction::Local(LocalResolution {
                        page,
                        fill,
                        installed: state == PageState::Installed,
                    });
                }
                PageState::Unknown | PageState::Stale => {
                    if !minor && self.is_removed(page) {
                        // Rule 7: punched out by the VMM: zeros. Fresh, then
                        // resolved as a fresh hole (look again).
                        self.transition(page, state, PageState::Fresh);
                        continue;
                    }
                    if let Some(claim) = self.claim(page, FetchOrigin::Demand) {
                        return FaultAction::Fetch(claim);
                    }
                    // Claimed (or made fresh by the bitmap) meanwhile: look again.
                }
                PageState::FetchingUnknown => return FaultAction::Wait { known: false },
                PageState::FetchingStale => return FaultAction::Wait { known: true },
            }
        }
    }

    /// The fault's page has been mapped (or zero-filled and mapped): a fresh
    /// page becomes `Installed`. Returns whether this call installed it (it
    /// may have been installed already, by another fault or the bulk
    /// install).
    pub fn finish_local(&self, resolution: LocalResolution) -> bool {
        if resolution.fill == LocalFill::ZeroFill {
            self.set_present(resolution.page);
        }
        !resolution.installed && self.transition(resolution.page, PageState::Fresh, PageState::Installed)
    }

    /// The claimed page's fetched content has been written to the target's
    /// file and mapped: it becomes `Installed` (rule 1). Consumes the claim.
    pub fn finish_fetch(&self, claim: Claim) -> Result<(), ClaimMismatch> {
        self.set_present(claim.page);
        let from = claim.fetching_state();
        if self.transition(claim.page, from, PageState::Installed) {
            Ok(())
        } else {
            Err(ClaimMismatch { page: claim.page, from, actual: self.state(claim.page) })
        }
    }

    /// Applies the final bitmap (rule 3): `dirty` pages that are still
    /// `Unknown` become `Stale`, then every other `Unknown` page becomes
    /// `Fresh`. Returns the pages made stale, ascending if `dirty` is.
    pub fn apply_final_bitmap(&self, dirty: &[u64]) -> Vec<u64> {
        let mut stale = Vec::with_capacity(dirty.len());
        for &page in dirty {
            if self.transition(page, PageState::Unknown, PageState::Stale) {
                stale.push(page);
            }
        }
        let fresh = (0..self.len())
            .filter(|&page| self.transition_uncounted(page, PageState::Unknown, PageState::Fresh))
            .count();
        self.count_moved(PageState::Unknown, PageState::Fresh, fresh as u64);
        stale
    }

    /// The present pages (the target's file holds content for them) that
    /// are not in `listed` (ascending), ascending. A dirty bitmap "since
    /// epoch 0" leaves out the pages that are zeros on the source: the
    /// target must not keep content of its own there. O(pages).
    pub fn present_pages_not_in(&self, listed: &[u64]) -> Vec<u64> {
        let mut listed = listed.iter().peekable();
        let mut pages = Vec::new();
        for page in 0..self.len() {
            if self.load(page) & PRESENT == 0 {
                continue;
            }
            while listed.next_if(|&&l| l < page).is_some() {}
            if listed.peek() != Some(&&page) {
                pages.push(page);
            }
        }
        pages
    }

    /// Runs of pages that are `Fresh`, present and not removed: what a bulk
    /// UFFDIO_CONTINUE can map (rules 1 and 7). Fresh holes are left out:
    /// they stay holes (zero-filled if the guest touches them), so the target
    /// stays as sparse as the source.
    pub fn fresh_present_runs(&self) -> Vec<FreshRun> {
        let mut runs = Vec::new();
        let mut start = None;
        for page in 0..self.len() {
            let b = self.load(page);
            let ok = PageState::from_bits(b) == PageState::Fresh && b & PRESENT != 0 && b & REMOVED == 0;
            match (ok, start) {
                (true, None) => start = Some(page),
                (false, Some(first)) => {
                    runs.push(FreshRun { first, end: page });
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(first) = start {
            runs.push(FreshRun { first, end: self.len() });
        }
        runs
    }

    /// The run has been mapped: its pages that are still `Fresh` become
    /// `Installed`. Returns how many this call installed.
    pub fn finish_fresh_run(&self, run: FreshRun) -> u64 {
        let installed = (run.first..run.end)
            .filter(|&p| self.transition_uncounted(p, PageState::Fresh, PageState::Installed))
            .count() as u64;
        self.count_moved(PageState::Fresh, PageState::Installed, installed);
        installed
    }

    /// Rule 6, on states just created (every page `Unknown`): `mapped` pages
    /// become `Installed`, and every page counts as present in the file (a
    /// hole among the fresh ones is skipped by the bulk install, whose
    /// UFFDIO_CONTINUE finds nothing to map, and zero-filled by a fault).
    pub fn take_over(&self, mapped: &[u64]) {
        for b in &self.bytes {
            b.fetch_or(PRESENT, Ordering::AcqRel);
        }
        for &page in mapped {
            self.transition(page, PageState::Unknown, PageState::Installed);
        }
    }

    /// Pages per state, in [`PageState::ALL`] order (see `counts` on the
    /// struct for how exact a reading is while pages move).
    pub fn counts(&self) -> [u64; 6] {
        self.counts.each_ref().map(|count| count.load(Ordering::Relaxed))
    }

    /// Pages claimed and not installed yet.
    pub fn fetching(&self) -> u64 {
        let counts = self.counts();
        counts[PageState::FetchingUnknown as usize] + counts[PageState::FetchingStale as usize]
    }
}

#[cfg(test)]
mod tests;
