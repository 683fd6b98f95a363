//! Demand fetches: the pages guest faults wait for, asked of the paused
//! source on the fault loop's own connection and installed as their replies
//! arrive.
//!
//! The fault loop hands over each [`Claim`] it wins; from then on the
//! fetcher owns it until the page is installed. It keeps every claim it owns
//! in `outstanding`, so:
//! - each request is sent once per stream: a claim is sent when it arrives,
//!   and after a reconnect every outstanding claim is sent once on the new
//!   stream (claims still queued in the channel are not outstanding yet, so
//!   they go out once, when they are received);
//! - a request the source refuses (or answers with anything but exactly the
//!   page asked for) is retried with [`REFUSAL_RETRY`]'s backoff, a bounded
//!   number of times; then the fetch fails, loudly: the migration fails and
//!   the faults on that page stay blocked (never a guess at its content);
//! - a broken stream is reopened with [`RECONNECT`]'s backoff until the
//!   source has been unreachable for the link's `unreachable_timeout`; the
//!   vCPUs waiting on pages wait meanwhile, and faults on fresh pages go on
//!   being served by the fault loop. A connection that reaches another
//!   source than this migration's ([`crate::fence`]) counts as unreachable;
//! - a source that says its VM is not paused is asked again every
//!   [`NOT_PAUSED_RETRY`] until the link's `pause_timeout`, then the
//!   migration fails (a switchover declared before the pause); a reply from
//!   another pause than the earlier ones fails it at once.
//!
//! Requests are one page each and carry the page's global number as their
//! id, so a reply names its claim directly.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use guest_memory::memfile::monotonic_ns;
use pageserver_backoff::{Backoff, BackoffPolicy};
use pageserver_proto::v1::{PagesReply, PagesRequest};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use crate::fence::Incarnation;
use crate::guest::{GuestMemory, InstallError};
use crate::page_state::Claim;
use crate::source::{SourceError, SourceLink, check_reply, rpc_error};

/// Reconnecting to the source: quickly at first (a vCPU is waiting), then
/// no more often than every second, for as long as the migration lasts.
pub const RECONNECT: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_secs(1), max_attempts: None, jitter: true };

/// Retrying a request the source refused: a handful of times over about
/// three seconds, then the migration fails. A refusal is an answer, not an
/// outage: the source does not have the page we need, and no amount of
/// waiting is likely to change that.
pub const REFUSAL_RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_secs(1),
    max_attempts: Some(5),
    jitter: false,
};

/// Asking again for a page the source would not give because its VM is not
/// paused (yet).
pub const NOT_PAUSED_RETRY: Duration = Duration::from_millis(50);

/// Claims the fetcher owns at once before its table grows (pages with a
/// fault waiting: at most a few per vCPU).
const OUTSTANDING_CAPACITY: usize = 1024;

/// Why demand fetching stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error("the source would not give page {page} after {attempts} attempts")]
    Refused {
        page: u64,
        attempts: u32,
        #[source]
        last: SourceError,
    },
    #[error("installing fetched page {page}")]
    Install {
        page: u64,
        #[source]
        source: InstallError,
    },
    #[error("the source has been unreachable for {waited:?} with {pages} pages waiting (first: {page})")]
    Unreachable {
        page: u64,
        pages: usize,
        waited: Duration,
        #[source]
        last: SourceError,
    },
    #[error(
        "switchover was declared, but the source VM has not been paused for {waited:?}: page {page} was not \
         installed"
    )]
    NotPaused {
        page: u64,
        waited: Duration,
        #[source]
        last: SourceError,
    },
    #[error("page {page}: the source cannot be trusted any more")]
    Fence {
        page: u64,
        #[source]
        source: SourceError,
    },
}

impl DemandError {
    /// The page whose faults this leaves blocked.
    pub fn page(&self) -> u64 {
        match self {
            DemandError::Refused { page, .. }
            | DemandError::Install { page, .. }
            | DemandError::Unreachable { page, .. }
            | DemandError::NotPaused { page, .. }
            | DemandError::Fence { page, .. } => *page,
        }
    }
}

/// One claim the fetcher owns.
#[derive(Debug)]
struct Outstanding {
    claim: Claim,
    /// When its request was last sent (monotonic ns), for the fetch latency.
    sent_ns: u64,
    /// Refusals of its request so far.
    refusals: Backoff,
    /// Set while waiting to retry a refused request.
    retry_at: Option<Instant>,
}

/// How one stream's life ended.
enum StreamEnd {
    /// The fault loop dropped its end of the claim channel.
    FaultLoopGone,
    /// The stream broke or could not be opened: reconnect.
    Broken(SourceError),
}

/// Fetches claimed pages on demand; see the module docs.
#[derive(Debug)]
pub struct DemandFetcher {
    guest: Arc<GuestMemory>,
    link: Arc<SourceLink>,
    outstanding: HashMap<u64, Outstanding>,
    /// Since when the source has said that its VM is not paused (cleared by
    /// any page it gives).
    not_paused_since: Option<Instant>,
    /// Streams opened so far (every one after the first is a reconnect).
    streams: u64,
}

impl DemandFetcher {
    pub fn new(guest: Arc<GuestMemory>, link: Arc<SourceLink>) -> Self {
        Self {
            guest,
            link,
            outstanding: HashMap::with_capacity(OUTSTANDING_CAPACITY),
            not_paused_since: None,
            streams: 0,
        }
    }

    /// Fetches every claim received on `claims` until the fault loop drops
    /// the channel (`Ok`), or a fetch fails for good.
    pub async fn run(mut self, mut claims: mpsc::UnboundedReceiver<Claim>) -> Result<(), DemandError> {
        let mut reconnect = RECONNECT.start();
        loop {
            let end = self.stream_life(&mut claims, &mut reconnect).await?;
            match end {
                StreamEnd::FaultLoopGone => return Ok(()),
                StreamEnd::Broken(error) => {
                    // Claims that came while no stream was open wait too.
                    while let Ok(claim) = claims.try_recv() {
                        self.own(claim);
                    }
                    let stats = &self.guest.stats;
                    stats.set_source_up(error.source_answered());
                    if let Some(waited) = stats.source_outage().filter(|w| *w > self.link.unreachable_timeout)
                        && let Some(&page) = self.outstanding.keys().next()
                    {
                        let pages = self.outstanding.len();
                        return Err(DemandError::Unreachable { page, pages, waited, last: error });
                    }
                    let delay = reconnect.next_delay().unwrap_or(RECONNECT.max);
                    tracing::warn!(
                        "demand stream to the source broke ({error}); {} pages wait; reconnecting in {delay:?}",
                        self.outstanding.len()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Takes ownership of a claim (not sent yet); returns its page.
    fn own(&mut self, claim: Claim) -> u64 {
        let page = claim.page();
        let refusals = REFUSAL_RETRY.start();
        self.outstanding.insert(page, Outstanding { claim, sent_ns: 0, refusals, retry_at: None });
        page
    }

    fn request(&self, page: u64) -> PagesRequest {
        let (region, index) = self.guest.layout.locate(page);
        PagesRequest { request_id: page, region, first_index: index, count: 1, require_paused: true }
    }

    /// Sends the request for the outstanding `page`.
    fn send(&mut self, requests: &mpsc::UnboundedSender<PagesRequest>, page: u64) -> Result<(), SourceError> {
        let request = self.request(page);
        if let Some(o) = self.outstanding.get_mut(&page) {
            o.sent_ns = monotonic_ns();
            o.retry_at = None;
        }
        requests.send(request).map_err(|_| SourceError::StreamEnded(self.outstanding.len()))
    }

    /// Opens one stream, sends every outstanding claim on it once, then
    /// serves claims and replies until it ends.
    async fn stream_life(
        &mut self,
        claims: &mut mpsc::UnboundedReceiver<Claim>,
        reconnect: &mut Backoff,
    ) -> Result<StreamEnd, DemandError> {
        if self.streams > 0 {
            self.guest.stats.source_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.streams += 1;
        let mut client = match self.link.connect(&self.guest.layout).await {
            Ok(client) => client,
            Err(error) => return Ok(StreamEnd::Broken(error)),
        };
        let (requests, request_stream) = mpsc::unbounded_channel::<PagesRequest>();
        let pages: Vec<u64> = self.outstanding.keys().copied().collect();
        for page in pages {
            // The receiver is alive: the stream is not opened yet.
            let _ = self.send(&requests, page);
        }
        let response = match client.get_pages(UnboundedReceiverStream::new(request_stream)).await {
            Ok(response) => response,
            Err(status) => return Ok(StreamEnd::Broken(rpc_error(Some(&self.link.fence), "GetPages", status))),
        };
        let incarnation = match self.link.fence.check_headers(response.metadata()) {
            Ok(incarnation) => incarnation,
            Err(error) => return Ok(StreamEnd::Broken(error)),
        };
        self.serve(claims, &requests, &mut response.into_inner(), &incarnation, reconnect).await
    }

    async fn serve(
        &mut self,
        claims: &mut mpsc::UnboundedReceiver<Claim>,
        requests: &mpsc::UnboundedSender<PagesRequest>,
        replies: &mut Streaming<PagesReply>,
        incarnation: &Incarnation,
        reconnect: &mut Backoff,
    ) -> Result<StreamEnd, DemandError> {
        loop {
            let next_retry = self.outstanding.values().filter_map(|o| o.retry_at).min();
            tokio::select! {
                claim = claims.recv() => {
                    let Some(claim) = claim else { return Ok(StreamEnd::FaultLoopGone) };
                    let page = self.own(claim);
                    if let Err(error) = self.send(requests, page) {
                        return Ok(StreamEnd::Broken(error));
                    }
                }
                reply = replies.message() => {
                    let reply = match reply {
                        Ok(Some(reply)) => reply,
                        Ok(None) => return Ok(StreamEnd::Broken(SourceError::StreamEnded(self.outstanding.len()))),
                        Err(status) => {
                            return Ok(StreamEnd::Broken(rpc_error(Some(&self.link.fence), "GetPages", status)));
                        }
                    };
                    self.guest.stats.set_source_up(true);
                    reconnect.reset();
                    self.on_reply(reply, incarnation)?;
                }
                () = sleep_until(next_retry), if next_retry.is_some() => {
                    let now = Instant::now();
                    let due: Vec<u64> =
                        self.outstanding.iter().filter(|(_, o)| o.retry_at.is_some_and(|at| at <= now)).map(|(&p, _)| p).collect();
                    for page in due {
                        if let Err(error) = self.send(requests, page) {
                            return Ok(StreamEnd::Broken(error));
                        }
                    }
                }
            }
        }
    }

    /// Installs the page a reply brings, or schedules the retry of a
    /// refused request.
    fn on_reply(&mut self, reply: PagesReply, incarnation: &Incarnation) -> Result<(), DemandError> {
        let page = reply.request_id;
        let Some(mut outstanding) = self.outstanding.remove(&page) else {
            // Nothing we own: never installed. Only a misbehaving source
            // answers a request twice or one it never got.
            tracing::warn!("the source answered demand request {page}, which is not outstanding; ignored");
            return Ok(());
        };
        let request = self.request(page);
        let fenced = match reply.error {
            // A refusal is the refusal (check_reply), whatever its epoch.
            Some(_) => Ok(()),
            None => self.link.fence.check_paused(incarnation, reply.pause_epoch, &format!("page {page}")),
        };
        match fenced.and_then(|()| check_reply(&request, reply, self.guest.page_size())) {
            Ok(pages) => {
                self.not_paused_since = None;
                self.guest.stats.fetch_latency.record(monotonic_ns().saturating_sub(outstanding.sent_ns));
                self.guest
                    .install_fetched(outstanding.claim, &pages[0])
                    .map_err(|source| DemandError::Install { page, source })
            }
            Err(error) if error.is_fatal() => Err(DemandError::Fence { page, source: error }),
            Err(error) if error.is_not_paused() => {
                if self.not_paused_since.is_none() {
                    tracing::warn!("page {page}: {error}; waiting up to {:?} for the pause", self.link.pause_timeout);
                }
                let waited = self.not_paused_since.get_or_insert_with(Instant::now).elapsed();
                if waited > self.link.pause_timeout {
                    return Err(DemandError::NotPaused { page, waited, last: error });
                }
                outstanding.retry_at = Some(Instant::now() + NOT_PAUSED_RETRY);
                self.outstanding.insert(page, outstanding);
                Ok(())
            }
            Err(error) => match outstanding.refusals.next_delay() {
                Ok(delay) => {
                    tracing::warn!(
                        "demand request for page {page} failed ({error}); retry {} in {delay:?}",
                        outstanding.refusals.failures()
                    );
                    outstanding.retry_at = Some(Instant::now() + delay);
                    self.outstanding.insert(page, outstanding);
                    Ok(())
                }
                Err(exhausted) => Err(DemandError::Refused { page, attempts: exhausted.failures, last: error }),
            },
        }
    }
}

/// Sleeps until `at` (never resolves for `None`; the select guards it).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
