//! Bulk transfers on the background connection: pre-copy rounds before
//! switchover, and the pull of stale pages after it.
//!
//! Pre-copy round 0 asks for every page ("dirty since epoch 0"), each later
//! round for the pages written since the previous round's epoch, until the
//! dirty set stops shrinking, reaches zero, or the round limit. Pages are
//! only stored in the target's file: nothing is mapped into the guest before
//! switchover.
//!
//! The stale pull claims pages (so a fault on one waits for it rather than
//! fetching it twice) in small batches, with a small window, so a fault that
//! joins a background fetch waits little: the source's hottest pages first
//! if so configured, then near the guest's latest fault
//! ([`crate::pull_order`]).
//!
//! Both retry what fails by the rules of [`crate::retry`], resending what
//! was not answered (the claims travel with their requests); once those give
//! up, the migration fails. A local failure (writing or mapping a page)
//! fails it at once. Pre-copy reads a running VM; the pull asks for pages
//! read while it is paused ([`crate::fence`]).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use pageserver_proto::v1::{Page, PagesRequest};

use crate::fault_loop::FaultHint;
use crate::fence::SourceEpoch;
use crate::guest::{GuestMemory, InstallError};
use crate::page_state::{Claim, FetchOrigin, PageState};
use crate::pull_order::{HotFirst, PullOrder};
use crate::retry::{GiveUp, Retrier};
use crate::source::{self, Client, DirtyPages, SourceError, SourceLink, WindowError, WindowShape};

/// Requests in flight on the background connection during pre-copy.
const PRECOPY_WINDOW: usize = 16;
/// Bytes per background request after switchover, and bytes in flight: a
/// fault that joins a background fetch waits for at most about this much.
const PULL_REQUEST_BYTES: u64 = 64 << 10;
const PULL_WINDOW_BYTES: u64 = 512 << 10;
/// Bytes per request of the hot phase: hot pages are scattered, so its
/// requests are small, and more of them fly at once in the same
/// [`PULL_WINDOW_BYTES`].
const HOT_REQUEST_BYTES: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Source(#[from] GiveUp),
    #[error("{what}")]
    Install {
        what: &'static str,
        #[source]
        source: InstallError,
    },
}

/// Runs `next`'s requests to completion, reconnecting and re-asking for the
/// unanswered ones (with their tickets) when the stream breaks or the source
/// refuses one, until the [`Retrier`] gives up. `require_paused`: post-copy.
#[allow(clippy::too_many_arguments)]
async fn run_with_retries<T>(
    guest: &GuestMemory,
    client: &mut Client,
    link: &SourceLink,
    require_paused: bool,
    window: usize,
    what: &'static str,
    mut next: impl FnMut() -> Option<(PagesRequest, T)>,
    mut on_reply: impl FnMut(PagesRequest, Vec<Page>, T) -> Result<(), InstallError>,
) -> Result<(), TransferError> {
    let mut unanswered = VecDeque::new();
    let mut retry = Retrier::new(what);
    loop {
        let shape = WindowShape { fence: &link.fence, require_paused, window, page_size: guest.page_size() };
        let result = source::run_window(client, &shape, &mut next, &mut on_reply, &mut unanswered).await;
        match result {
            Ok(()) => {
                retry.succeeded(link);
                return Ok(());
            }
            Err(WindowError::Reply(source)) => return Err(TransferError::Install { what, source }),
            Err(WindowError::Source(error)) => retry.after(link, &guest.layout, client, error).await?,
        }
    }
}

/// GetDirtyBitmap since `since`, retried by the [`Retrier`]'s rules.
pub async fn dirty_pages(
    guest: &GuestMemory,
    client: &mut Client,
    link: &SourceLink,
    since: &SourceEpoch,
    final_: bool,
    what: &'static str,
) -> Result<DirtyPages, TransferError> {
    let mut retry = Retrier::new(what);
    loop {
        let result = source::get_dirty_pages(client, &link.fence, &guest.layout, since, final_).await;
        // A final bitmap must come from the paused source, at the pause of
        // the pages fetched before it.
        let checked = result.and_then(|dirty| match final_ {
            false => Ok(dirty),
            true if !dirty.paused => Err(SourceError::NotPaused("the final bitmap".into())),
            true => {
                link.fence.check_paused(&dirty.epoch.incarnation, dirty.pause_epoch, "the final bitmap").map(|()| dirty)
            }
        });
        match checked {
            Ok(dirty) => {
                retry.succeeded(link);
                guest.stats.note_progress();
                return Ok(dirty);
            }
            Err(error) => retry.after(link, &guest.layout, client, error).await?,
        }
    }
}

/// Pre-copy rounds; returns the epoch the target's copy is current to.
///
/// A source agent restarted meanwhile (a new incarnation) cannot say what
/// changed since an epoch of its predecessor: the next round then asks for
/// every page again, and the rounds go on from there.
pub async fn precopy(
    guest: &GuestMemory,
    client: &mut Client,
    link: &SourceLink,
    max_rounds: u32,
) -> Result<SourceEpoch, TransferError> {
    let stats = &guest.stats;
    let mut since = SourceEpoch { incarnation: link.fence.incarnation(), epoch: 0 };
    let mut previous: Option<usize> = None;
    for round in 0..max_rounds.max(1) {
        let started = std::time::Instant::now();
        let dirty = dirty_pages(guest, client, link, &since, false, "a pre-copy dirty bitmap").await?;
        let count = dirty.pages.len();
        let restarted = dirty.epoch.incarnation != since.incarnation;
        if restarted {
            tracing::warn!("pre-copy round {round}: a new source agent: every page is copied again");
            previous = None;
        }
        if restarted || since.epoch == 0 {
            // "Since epoch 0" lists only the pages that may hold data: the
            // others are zeros on the source now, whatever we copied before.
            let zero = Page { zero: true, ..Page::default() };
            for page in guest.states.present_pages_not_in(&dirty.pages) {
                guest.store_precopy(page, &zero);
            }
        }
        tracing::info!("pre-copy round {round}: {count} dirty pages since epoch {}", since.epoch);
        let mut requests = source::batch_requests(&guest.layout, &dirty.pages, 0, false).into_iter();
        run_with_retries(
            guest,
            client,
            link,
            false,
            PRECOPY_WINDOW,
            "pre-copy",
            || requests.next().map(|r| (r, ())),
            |request, pages, ()| {
                let first = guest.layout.global_page(request.region, request.first_index)?;
                guest.store_precopy_pages(first, &pages)
            },
        )
        .await?;
        if let Ok(mut v) = stats.dirty_pages_per_round.lock() {
            v.push(count as u64);
        }
        if let Ok(mut v) = stats.precopy_round_seconds.lock() {
            v.push(started.elapsed().as_secs_f64());
        }
        stats.precopy_rounds.fetch_add(1, Ordering::Relaxed);
        stats.pages_sent_precopy.fetch_add(count as u64, Ordering::Relaxed);
        since = dirty.epoch;
        let stopped_shrinking = previous.is_some_and(|p| count >= p);
        if dirty.paused || count == 0 || stopped_shrinking {
            break;
        }
        previous = Some(count);
    }
    Ok(since)
}

/// Chooses the next background request: hinted hot pages first (if any are
/// queued), then stale pages near the latest fault; claimed before they are
/// asked for (the claims travel with the request).
struct StalePicker<'a> {
    guest: &'a GuestMemory,
    stale: Vec<u64>,
    cursor: usize,
    last_hint: u64,
    hint: &'a FaultHint,
    hot: HotFirst,
    batch: u64,
    hot_batch: u64,
    next_id: u64,
}

impl StalePicker<'_> {
    fn next(&mut self) -> Option<(PagesRequest, Vec<Claim>)> {
        self.next_hot().or_else(|| self.next_nearest())
    }

    /// The next claimable hinted page, with the hinted pages right after it.
    fn next_hot(&mut self) -> Option<(PagesRequest, Vec<Claim>)> {
        let states = &self.guest.states;
        while let Some(first) = self.hot.peek() {
            self.hot.advance();
            let Some(claim) = states.claim(first, FetchOrigin::Background) else { continue };
            let region = self.guest.layout.locate(first).0;
            let mut claims = vec![claim];
            while (claims.len() as u64) < self.hot_batch
                && let Some(page) = self.hot.peek()
                && page == first + claims.len() as u64
                && self.guest.layout.locate(page).0 == region
                && let Some(claim) = states.claim(page, FetchOrigin::Background)
            {
                claims.push(claim);
                self.hot.advance();
            }
            return Some(self.request(claims));
        }
        None
    }

    fn next_nearest(&mut self) -> Option<(PagesRequest, Vec<Claim>)> {
        let states = &self.guest.states;
        let hint = self.hint.last_fault_page.load(Ordering::Relaxed);
        if hint != self.last_hint {
            self.last_hint = hint;
            let pos = self.stale.partition_point(|&p| p < hint);
            if self.stale.get(pos).is_some_and(|&p| states.state(p) == PageState::Stale) {
                self.cursor = pos;
            }
        }
        for _ in 0..self.stale.len() {
            if self.cursor >= self.stale.len() {
                self.cursor = 0;
            }
            let first = self.stale[self.cursor];
            self.cursor += 1;
            let Some(claim) = states.claim(first, FetchOrigin::Background) else { continue };
            let region = self.guest.layout.locate(first).0;
            let mut claims = vec![claim];
            while (claims.len() as u64) < self.batch
                && self.stale.get(self.cursor) == Some(&(first + claims.len() as u64))
                && self.guest.layout.locate(first + claims.len() as u64).0 == region
            {
                let Some(claim) = states.claim(first + claims.len() as u64, FetchOrigin::Background) else { break };
                claims.push(claim);
                self.cursor += 1;
            }
            return Some(self.request(claims));
        }
        None
    }

    /// The request for consecutive claimed pages of one region.
    fn request(&mut self, claims: Vec<Claim>) -> (PagesRequest, Vec<Claim>) {
        let first = claims.first().map_or(0, Claim::page);
        let lead = claims.iter().take_while(|claim| self.hot.pulled(claim.page())).count();
        self.guest.stats.hot_pages_pulled_first.fetch_add(lead as u64, Ordering::Relaxed);
        let (region, first_index) = self.guest.layout.locate(first);
        self.next_id += 1;
        tracing::trace!(region, first_index, count = claims.len(), "background request");
        let request = PagesRequest {
            request_id: self.next_id,
            region,
            first_index,
            count: claims.len() as u32,
            require_paused: true,
        };
        (request, claims)
    }
}

/// Pulls every stale page not yet fetched by a fault, in `order` (`hot`:
/// the source's heat hint, hottest first).
pub async fn pull_stale(
    guest: Arc<GuestMemory>,
    client: &mut Client,
    link: &SourceLink,
    stale: Vec<u64>,
    order: PullOrder,
    hot: &[u64],
    hint: Arc<FaultHint>,
) -> Result<(), TransferError> {
    let page_size = guest.page_size();
    let batch = (PULL_REQUEST_BYTES / page_size).max(1);
    let window = (PULL_WINDOW_BYTES / (batch * page_size)).max(1) as usize;
    let hot_batch = (HOT_REQUEST_BYTES / page_size).max(1);
    let hot_window = (PULL_WINDOW_BYTES / (hot_batch * page_size)).max(1) as usize;
    let hot = HotFirst::new(order, hot, &stale);
    guest.stats.hot_pages_hinted.store(hot.hinted(), Ordering::Relaxed);
    tracing::info!(order = order.name(), hinted = hot.hinted(), stale = stale.len(), "background pull");
    let mut picker = StalePicker {
        guest: &guest,
        stale,
        cursor: 0,
        last_hint: u64::MAX,
        hint: &hint,
        hot,
        batch,
        hot_batch,
        next_id: 0,
    };
    let installer = guest.clone();
    let install = |_request, pages: Vec<Page>, claims: Vec<Claim>| {
        // check_reply sorted the pages to match the request: one claim each.
        for (claim, content) in claims.into_iter().zip(&pages) {
            installer.install_fetched(claim, content)?;
        }
        Ok(())
    };
    // The hot phase (nothing to do in nearest order), then the rest.
    let what = "the background pull";
    run_with_retries(&guest, client, link, true, hot_window, what, || picker.next_hot(), install).await?;
    run_with_retries(&guest, client, link, true, window, what, || picker.next(), install).await
}
