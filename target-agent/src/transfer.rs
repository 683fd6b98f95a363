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
//! fetching it twice) in small batches near the guest's latest fault, with a
//! small window, so a fault that joins a background fetch waits little.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pageserver_proto::v1::{PagesReply, PagesRequest};

use crate::fault_loop::FaultHint;
use crate::guest::{FetchOrigin, GuestMemory, InstallError};
use crate::page_state::PageState;
use crate::source::{self, Client, SourceError};
use crate::stats::TargetStats;

/// Requests in flight on the background connection during pre-copy.
const PRECOPY_WINDOW: usize = 16;
/// Bytes per background request after switchover, and bytes in flight: a
/// fault that joins a background fetch waits for at most about this much.
const PULL_REQUEST_BYTES: u64 = 64 << 10;
const PULL_WINDOW_BYTES: u64 = 512 << 10;
const RETRIES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Install(#[from] InstallError),
}

fn store_reply(guest: &GuestMemory, reply: PagesReply, origin: Option<FetchOrigin>) -> Result<(), SourceError> {
    for p in reply.pages {
        let page = guest.layout.global_page(p.region, p.index).map_err(|e| SourceError::BadBitmap(e.to_string()))?;
        let r = match origin {
            None => guest.store_precopy(page, p.zero, &p.data),
            Some(origin) => guest.install_fetched(page, p.zero, &p.data, origin),
        };
        r.map_err(|e| SourceError::Refused { request_id: reply.request_id, code: 13, message: e.to_string() })?;
    }
    Ok(())
}

/// Runs `next`'s requests to completion, reconnecting and re-asking for the
/// unanswered ones when the stream breaks.
async fn run_with_retries(
    stats: &TargetStats,
    client: &mut Client,
    url: &str,
    window: usize,
    mut next: impl FnMut() -> Option<PagesRequest>,
    mut on_reply: impl FnMut(PagesReply) -> Result<(), SourceError>,
) -> Result<(), SourceError> {
    let mut unanswered = VecDeque::new();
    let mut attempt = 0;
    loop {
        let result = source::run_window(client, window, &mut next, &mut on_reply, &mut unanswered).await;
        stats.note_source_call(&result);
        match result {
            Ok(()) => return Ok(()),
            Err(e @ (SourceError::Refused { .. } | SourceError::BadBitmap(_))) => return Err(e),
            Err(e) if attempt >= RETRIES => return Err(e),
            Err(e) => {
                attempt += 1;
                tracing::warn!(
                    "page stream broke ({e}); retry {attempt} with {} requests outstanding",
                    unanswered.len()
                );
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
                let connected = source::connect(url).await;
                stats.note_source_call(&connected);
                if let Ok(c) = connected {
                    *client = c;
                }
            }
        }
    }
}

/// Pre-copy rounds; returns the epoch the target's copy is current to.
pub async fn precopy(
    guest: &GuestMemory,
    client: &mut Client,
    url: &str,
    max_rounds: u32,
) -> Result<u64, TransferError> {
    let stats = &guest.stats;
    let mut since = 0;
    let mut previous: Option<usize> = None;
    for round in 0..max_rounds.max(1) {
        let dirty = source::get_dirty_pages(client, &guest.layout, since, false).await;
        stats.note_source_call(&dirty);
        let dirty = dirty?;
        let count = dirty.pages.len();
        tracing::info!("pre-copy round {round}: {count} dirty pages since epoch {since}");
        let requests = source::batch_requests(&guest.layout, &dirty.pages, 0);
        let mut it = requests.into_iter();
        run_with_retries(stats, client, url, PRECOPY_WINDOW, || it.next(), |r| store_reply(guest, r, None)).await?;
        if let Ok(mut v) = stats.dirty_pages_per_round.lock() {
            v.push(count as u64);
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

/// Chooses the next background request: stale pages near the latest fault,
/// claimed before they are asked for.
struct StalePicker<'a> {
    guest: &'a GuestMemory,
    stale: Vec<u64>,
    cursor: usize,
    last_hint: u64,
    hint: &'a FaultHint,
    batch: u64,
    next_id: u64,
}

impl StalePicker<'_> {
    fn next(&mut self) -> Option<PagesRequest> {
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
            if states.claim(first) != Some(PageState::Stale) {
                continue;
            }
            let (region, index) = self.guest.layout.locate(first);
            let mut count = 1u64;
            while count < self.batch
                && self.stale.get(self.cursor) == Some(&(first + count))
                && self.guest.layout.locate(first + count).0 == region
                && states.claim(first + count) == Some(PageState::Stale)
            {
                count += 1;
                self.cursor += 1;
            }
            self.next_id += 1;
            return Some(PagesRequest { request_id: self.next_id, region, first_index: index, count: count as u32 });
        }
        None
    }
}

/// Pulls every stale page not yet fetched by a fault.
pub async fn pull_stale(
    guest: Arc<GuestMemory>,
    client: &mut Client,
    url: &str,
    stale: Vec<u64>,
    hint: Arc<FaultHint>,
) -> Result<(), TransferError> {
    let batch = (PULL_REQUEST_BYTES / guest.page_size()).max(1);
    let window = (PULL_WINDOW_BYTES / (batch * guest.page_size())).max(1) as usize;
    let mut picker =
        StalePicker { guest: &guest, stale, cursor: 0, last_hint: u64::MAX, hint: &hint, batch, next_id: 0 };
    let g = guest.clone();
    let stats = guest.stats.clone();
    run_with_retries(
        &stats,
        client,
        url,
        window,
        || picker.next(),
        |r| store_reply(&g, r, Some(FetchOrigin::Background)),
    )
    .await?;
    Ok(())
}
