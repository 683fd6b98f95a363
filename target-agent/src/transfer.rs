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
//!
//! Both retry a broken stream, and a request the source refuses or botches,
//! under [`TRANSFER_RETRY`], resending what was not answered (the claims
//! travel with their requests); once that gives up, the migration fails.
//! A local failure (writing or mapping a page) fails it at once.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pageserver_backoff::BackoffPolicy;
use pageserver_proto::v1::{Page, PagesRequest};

use crate::fault_loop::FaultHint;
use crate::guest::{GuestMemory, InstallError};
use crate::page_state::{Claim, FetchOrigin, PageState};
use crate::source::{self, Client, SourceError, WindowError};

/// Requests in flight on the background connection during pre-copy.
const PRECOPY_WINDOW: usize = 16;
/// Bytes per background request after switchover, and bytes in flight: a
/// fault that joins a background fetch waits for at most about this much.
const PULL_REQUEST_BYTES: u64 = 64 << 10;
const PULL_WINDOW_BYTES: u64 = 512 << 10;

/// Retrying a bulk transfer after the stream broke or the source refused a
/// request: eight times over about ten seconds.
pub const TRANSFER_RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_secs(2),
    max_attempts: Some(8),
    jitter: true,
};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{what}: {attempts} attempts failed")]
    Source {
        what: &'static str,
        attempts: u32,
        #[source]
        last: SourceError,
    },
    #[error("{what}")]
    Install {
        what: &'static str,
        #[source]
        source: InstallError,
    },
    #[error("{what}")]
    Bitmap {
        what: &'static str,
        #[source]
        source: SourceError,
    },
}

/// Runs `next`'s requests to completion, reconnecting and re-asking for the
/// unanswered ones (with their tickets) when the stream breaks or the source
/// refuses one, until [`TRANSFER_RETRY`] gives up.
async fn run_with_retries<T>(
    guest: &GuestMemory,
    client: &mut Client,
    url: &str,
    window: usize,
    what: &'static str,
    mut next: impl FnMut() -> Option<(PagesRequest, T)>,
    mut on_reply: impl FnMut(PagesRequest, Vec<Page>, T) -> Result<(), InstallError>,
) -> Result<(), TransferError> {
    let stats = &guest.stats;
    let mut unanswered = VecDeque::new();
    let mut retry = TRANSFER_RETRY.start();
    loop {
        let result =
            source::run_window(client, window, guest.page_size(), &mut next, &mut on_reply, &mut unanswered).await;
        match result {
            Ok(()) => {
                stats.source_up.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Err(WindowError::Reply(source)) => return Err(TransferError::Install { what, source }),
            Err(WindowError::Source(error)) => {
                stats.source_up.store(error.source_answered(), Ordering::Relaxed);
                let Ok(delay) = retry.next_delay() else {
                    return Err(TransferError::Source { what, attempts: retry.failures(), last: error });
                };
                tracing::warn!(
                    "{what}: {error}; retry {} in {delay:?} with {} requests unanswered",
                    retry.failures(),
                    unanswered.len()
                );
                tokio::time::sleep(delay).await;
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
        let dirty = dirty.map_err(|source| TransferError::Bitmap { what: "a pre-copy dirty bitmap", source })?;
        let count = dirty.pages.len();
        tracing::info!("pre-copy round {round}: {count} dirty pages since epoch {since}");
        let mut requests = source::batch_requests(&guest.layout, &dirty.pages, 0).into_iter();
        run_with_retries(
            guest,
            client,
            url,
            PRECOPY_WINDOW,
            "pre-copy",
            || requests.next().map(|r| (r, ())),
            |request, pages, ()| {
                let first = guest.layout.global_page(request.region, request.first_index)?;
                for (page, content) in (first..).zip(&pages) {
                    guest.store_precopy(page, content);
                }
                Ok(())
            },
        )
        .await?;
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
/// claimed before they are asked for (the claims travel with the request).
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
    fn next(&mut self) -> Option<(PagesRequest, Vec<Claim>)> {
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
            let (region, index) = self.guest.layout.locate(first);
            let mut claims = vec![claim];
            while (claims.len() as u64) < self.batch
                && self.stale.get(self.cursor) == Some(&(first + claims.len() as u64))
                && self.guest.layout.locate(first + claims.len() as u64).0 == region
            {
                let Some(claim) = states.claim(first + claims.len() as u64, FetchOrigin::Background) else { break };
                claims.push(claim);
                self.cursor += 1;
            }
            self.next_id += 1;
            let request =
                PagesRequest { request_id: self.next_id, region, first_index: index, count: claims.len() as u32 };
            return Some((request, claims));
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
    let installer = guest.clone();
    run_with_retries(
        &guest,
        client,
        url,
        window,
        "the background pull",
        || picker.next(),
        |_request, pages, claims| {
            // check_reply sorted the pages to match the request: one claim each.
            for (claim, content) in claims.into_iter().zip(&pages) {
                installer.install_fetched(claim, content)?;
            }
            Ok(())
        },
    )
    .await
}
