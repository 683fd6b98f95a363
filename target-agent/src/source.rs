//! The target's side of the `pageserver.v1.PageServer` protocol: connecting
//! to the source agent, its layout, dirty bitmaps, and windowed page
//! streams.
//!
//! Demand fetches and background transfers use separate connections (see
//! [`connect`]), so a page a vCPU waits for never queues behind bulk data.
//!
//! Nothing the source sends is trusted further than [`check_reply`] allows:
//! a reply must answer exactly the pages its request asked for, each of the
//! page size or flagged zero, or it is [`SourceError::BadReply`] and nothing
//! of it is written anywhere. Every stream must also come from this
//! migration's source, and post-copy replies from it paused
//! ([`crate::fence`]).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use guest_memory::GuestLayout;
use pageserver_proto::bitmap::{BitmapDecoder, BitmapError};
use pageserver_proto::heat;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{DirtyBitmapRequest, GetLayoutRequest, Layout, Page, PagesReply, PagesRequest};
use pageserver_proto::{MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, MEMORY_ID_HEADER};
use pageserver_tls::ClientTls;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::fence::{Incarnation, SourceEpoch, SourceFence};
use crate::stats::TargetStats;

pub type Client = PageServerClient<Channel>;

/// Everything a connection to the source needs: where it is, who it must
/// be, and how long to wait for it.
#[derive(Debug)]
pub struct SourceLink {
    pub address: SourceAddress,
    pub fence: SourceFence,
    /// How long faults and transfers wait for an unreachable (or wrong)
    /// source before the migration fails.
    pub unreachable_timeout: Duration,
    /// How long post-copy waits for a source that says it is not paused.
    pub pause_timeout: Duration,
    pub stats: Arc<TargetStats>,
}

impl SourceLink {
    /// A new connection: checks with `GetLayout` that it reaches this
    /// migration's source, and that the layout still matches ours.
    pub async fn connect(&self, layout: &GuestLayout) -> Result<Client, SourceError> {
        let result = async {
            let mut client = connect(&self.address).await?;
            let (reply, incarnation) = get_layout(&mut client, Some(&self.fence)).await?;
            self.fence.check_layout(&reply)?;
            check_layout(&reply, layout)?;
            tracing::debug!(incarnation = %incarnation.0, "connected to the source");
            Ok(client)
        }
        .await;
        self.stats.note_source_call(&result);
        result
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad source address {url:?}: {source}")]
    Address {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("bad source address {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("connecting to the source at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{rpc} failed: {status}")]
    Rpc { rpc: &'static str, status: tonic::Status },
    #[error("source refused request {request_id}: code {code}: {message}")]
    Refused { request_id: u64, code: i32, message: String },
    #[error("the source's reply to request {request_id} does not answer it: {why}")]
    BadReply { request_id: u64, why: String },
    #[error("the source's layout does not match the target's: {0}")]
    LayoutMismatch(String),
    #[error("malformed bitmap from the source: {0}")]
    BadBitmap(String),
    #[error("the page stream ended with {0} requests unanswered")]
    StreamEnded(usize),
    #[error("not this migration's source: {0}")]
    WrongSource(String),
    #[error("{0} was read while the source VM was running (no pause epoch): not installed")]
    NotPaused(String),
    #[error(
        "the source VM ran again after the switchover: {what} comes from pause epoch {got}, earlier pages from \
         pause epoch {fenced}"
    )]
    PauseChanged { fenced: u64, got: u64, what: String },
}

impl SourceError {
    /// Whether the source answered: the call failed on its merits (a
    /// refusal, a precondition, a bad reply), not because the source could
    /// not be reached or the connection broke. A call the source refused as
    /// a whole with RESOURCE_EXHAUSTED (at its limit of RPCs, connections or
    /// pages in flight, busy with other clients) is not an answer either:
    /// it says nothing of the pages, so it is waited out like an outage
    /// (reconnect backoff, up to the unreachable timeout), never counted as
    /// a refusal that fails the migration after a few tries.
    pub fn source_answered(&self) -> bool {
        use tonic::Code;
        match self {
            SourceError::Address { .. }
            | SourceError::BadUrl { .. }
            | SourceError::Connect { .. }
            | SourceError::StreamEnded(_)
            | SourceError::WrongSource(_) => false,
            SourceError::Rpc { status, .. } => !matches!(
                status.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::ResourceExhausted
            ),
            SourceError::Refused { .. }
            | SourceError::BadReply { .. }
            | SourceError::LayoutMismatch(_)
            | SourceError::BadBitmap(_)
            | SourceError::NotPaused(_)
            | SourceError::PauseChanged { .. } => true,
        }
    }

    /// Whether the source says the VM is not paused: a refusal of a
    /// `require_paused` request, or a reply without a pause epoch. Worth
    /// waiting for (the VMM's pause may reach the source a moment after the
    /// orchestrator's switchover reached us), up to the pause timeout.
    pub fn is_not_paused(&self) -> bool {
        match self {
            SourceError::NotPaused(_) => true,
            SourceError::Refused { code, .. } => *code == tonic::Code::FailedPrecondition as i32,
            SourceError::Rpc { status, .. } => status.code() == tonic::Code::FailedPrecondition,
            _ => false,
        }
    }

    /// Whether retrying cannot help and the migration must fail at once.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::PauseChanged { .. } | SourceError::LayoutMismatch(_))
    }
}

/// Where the source agent is and how to reach it: `https://NAME:PORT`
/// over mutual TLS (the source's certificate must be valid for NAME), or
/// `http://HOST:PORT` in the clear.
#[derive(Debug, Clone)]
pub struct SourceAddress {
    pub url: String,
    /// This agent's client certificate and the CA the source's must chain
    /// to; `Some` exactly when the URL is https.
    pub tls: Option<ClientTls>,
}

impl SourceAddress {
    /// In the clear (an in-process test source on 127.0.0.1).
    pub fn plaintext(url: &str) -> Self {
        Self { url: url.to_owned(), tls: None }
    }
}

/// Checks that `url` is a source address this agent can use, with TLS
/// (`https://NAME:PORT`, when the agent has certificates) or without
/// (`http://HOST:PORT`), before anything else starts.
pub fn check_url(url: &str, tls: bool) -> Result<(), SourceError> {
    let bad = |why: &str| SourceError::BadUrl { url: url.to_owned(), why: why.to_owned() };
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match (uri.scheme_str(), tls) {
        (Some("https"), true) | (Some("http"), false) => {}
        (Some("http"), true) => {
            return Err(bad("this agent has TLS certificates: write https://NAME:PORT, NAME as in the source's \
                            certificate"));
        }
        (Some("https"), false) => {
            return Err(bad("https needs this agent's certificates: give --tls-cert, --tls-key and --tls-ca"));
        }
        (Some(other), _) => return Err(bad(&format!("scheme {other:?}: write https://NAME:PORT or http://HOST:PORT"))),
        (None, _) => return Err(bad("no scheme: write https://NAME:PORT (or http://HOST:PORT without TLS)")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if tls {
        pageserver_tls::client::server_name(&uri).map_err(|e| bad(&e.to_string()))?;
    }
    Endpoint::from_shared(url.to_owned()).map_err(|source| SourceError::Address { url: url.to_owned(), source })?;
    Ok(())
}

/// A connection that has heard nothing from the source for this long while
/// a call is open is pinged (HTTP/2 PING)...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);
/// ...and is dead if the ping is not answered within this: its streams
/// fail, and the caller reconnects (the source is then down, `source_up`
/// false, until a connection reaches it again). A dead link is noticed
/// within a second of silence, not when TCP gives up (minutes), so that
/// vCPUs waiting on a page are not left behind a connection that will
/// never answer, and the status says that the source is unreachable. A
/// connection that carries data is never pinged.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(750);

/// Opens a new HTTP/2 connection to the source (one per traffic class),
/// over TLS if the address says so (the certificates in use at that
/// moment: a rotation reaches the next connection).
pub async fn connect(address: &SourceAddress) -> Result<Client, SourceError> {
    let url = &address.url;
    let endpoint = pageserver_tls::endpoint(url)
        .map_err(|source| SourceError::Address { url: url.to_string(), source })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let connector = pageserver_tls::connector(address.tls.clone(), pageserver_tls::client::dial_tcp());
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| SourceError::Connect { url: url.to_string(), source })?;
    Ok(PageServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The error a failed call means: the source's own refusal (an `Rpc`
/// error), or, when its identity headers say so, another source than this
/// migration's. A refusal from a restarted source is noted as a restart (so
/// that the next call asks in the new incarnation's terms).
pub fn rpc_error(fence: Option<&SourceFence>, rpc: &'static str, status: tonic::Status) -> SourceError {
    if let Some(fence) = fence
        && status.metadata().contains_key(MEMORY_ID_HEADER)
        && let Err(wrong) = fence.check_headers(status.metadata())
    {
        return wrong;
    }
    SourceError::Rpc { rpc, status }
}

/// `GetLayout`; with a fence, its response headers are checked too.
pub async fn get_layout(
    client: &mut Client,
    fence: Option<&SourceFence>,
) -> Result<(Layout, Incarnation), SourceError> {
    let response =
        client.get_layout(GetLayoutRequest {}).await.map_err(|status| rpc_error(fence, "GetLayout", status))?;
    let incarnation = match fence {
        Some(fence) => fence.check_headers(response.metadata())?,
        None => Incarnation(response.get_ref().incarnation.clone()),
    };
    Ok((response.into_inner(), incarnation))
}

/// Checks that the source's memory and the target's have the same shape.
pub fn check_layout(source: &Layout, target: &GuestLayout) -> Result<(), SourceError> {
    let mismatch = |m: String| Err(SourceError::LayoutMismatch(m));
    if source.page_size != target.page_size() {
        return mismatch(format!("page size {} vs {}", source.page_size, target.page_size()));
    }
    if source.regions.len() != target.regions().len() {
        return mismatch(format!("{} regions vs {}", source.regions.len(), target.regions().len()));
    }
    for (i, (s, t)) in source.regions.iter().zip(target.regions()).enumerate() {
        if s.size_bytes != t.size {
            return mismatch(format!("region {i}: {} bytes vs {}", s.size_bytes, t.size));
        }
    }
    Ok(())
}

/// A dirty bitmap, decoded to global page numbers (ascending per region).
#[derive(Debug, Clone)]
pub struct DirtyPages {
    /// The epoch to ask from next time, in the incarnation that sent it.
    pub epoch: SourceEpoch,
    pub paused: bool,
    pub pause_epoch: u64,
    pub pages: Vec<u64>,
    /// The heat hint's pages, hottest first (empty if the source sent none,
    /// or one that was refused): an order for the pull, nothing more.
    pub hot: Vec<u64>,
}

/// GetDirtyBitmap since `since`, decoded and checked (a corrupt or
/// truncated stream is an error, never a smaller set of dirty pages). An
/// epoch of an earlier incarnation of the source means nothing to the one
/// that answers: every page is asked for then (since epoch 0).
pub async fn get_dirty_pages(
    client: &mut Client,
    fence: &SourceFence,
    layout: &GuestLayout,
    since: &SourceEpoch,
    final_: bool,
) -> Result<DirtyPages, SourceError> {
    let rpc = |status| rpc_error(Some(fence), "GetDirtyBitmap", status);
    let bad = |e: BitmapError| SourceError::BadBitmap(e.to_string());
    let current = fence.incarnation();
    let since_epoch = if current == since.incarnation { since.epoch } else { 0 };
    let response = client.get_dirty_bitmap(DirtyBitmapRequest { since_epoch, r#final: final_ }).await.map_err(rpc)?;
    let incarnation = fence.check_headers(response.metadata())?;
    if since_epoch != 0 && incarnation != since.incarnation {
        // Restarted between our look and the call: its epochs are not ours.
        return Box::pin(get_dirty_pages(client, fence, layout, &SourceEpoch { incarnation, epoch: 0 }, final_)).await;
    }
    let mut stream = response.into_inner();
    let mut decoder = BitmapDecoder::new();
    while let Some(chunk) = stream.message().await.map_err(rpc)? {
        if decoder.push(&chunk).map_err(bad)? {
            break;
        }
    }
    let bitmap = decoder.finish().map_err(bad)?;
    let hot = heat::decode(&bitmap.hot, layout).unwrap_or_else(|error| {
        // Only an order: the pull goes in its own order without it.
        tracing::warn!(%error, "the source's heat hint is refused");
        Vec::new()
    });
    Ok(DirtyPages {
        hot,
        epoch: SourceEpoch { incarnation, epoch: bitmap.epoch },
        paused: bitmap.paused,
        pause_epoch: bitmap.pause_epoch,
        pages: bitmap.global_pages(layout).map_err(bad)?,
    })
}

/// Splits ascending global pages into requests of consecutive pages, within
/// one region and at most MAX_REQUEST_BYTES each.
pub fn batch_requests(layout: &GuestLayout, pages: &[u64], first_id: u64, require_paused: bool) -> Vec<PagesRequest> {
    let max = (MAX_REQUEST_BYTES / layout.page_size()).max(1);
    let mut out: Vec<PagesRequest> = Vec::new();
    for &page in pages {
        let (region, index) = layout.locate(page);
        if let Some(last) = out.last_mut()
            && last.region == region
            && last.first_index + last.count as u64 == index
            && (last.count as u64) < max
        {
            last.count += 1;
            continue;
        }
        out.push(PagesRequest {
            request_id: first_id + out.len() as u64,
            region,
            first_index: index,
            count: 1,
            require_paused,
        });
    }
    out
}

/// Checks that `reply` answers `request` exactly: no error, `count` pages of
/// the request's region, each index of the request once, each page's data
/// exactly `page_size` bytes or flagged zero with no data. Returns the pages
/// sorted by index.
pub fn check_reply(request: &PagesRequest, reply: PagesReply, page_size: u64) -> Result<Vec<Page>, SourceError> {
    let request_id = reply.request_id;
    let bad = |why: String| Err(SourceError::BadReply { request_id, why });
    if let Some(error) = reply.error {
        return Err(SourceError::Refused { request_id, code: error.code, message: error.message });
    }
    if request_id != request.request_id {
        return bad(format!("it answers request {request_id} instead of {}", request.request_id));
    }
    let mut pages = reply.pages;
    if pages.len() != request.count as usize {
        return bad(format!("{} pages for a request of {}", pages.len(), request.count));
    }
    pages.sort_unstable_by_key(|p| p.index);
    for (expected, page) in (request.first_index..).zip(&pages) {
        if page.region != request.region || page.index != expected {
            return bad(format!(
                "page ({}, {}) where ({}, {expected}) was asked for",
                page.region, page.index, request.region
            ));
        }
        let len = page.data.len() as u64;
        if (page.zero && len != 0) || (!page.zero && len != page_size) {
            return bad(format!("page {}: {len} bytes (zero: {}), page size {page_size}", page.index, page.zero));
        }
    }
    Ok(pages)
}

/// How [`run_window`] runs a stream.
#[derive(Debug, Clone, Copy)]
pub struct WindowShape<'a> {
    /// The stream must come from this migration's source.
    pub fence: &'a SourceFence,
    /// Post-copy: every reply must come from the paused source (the
    /// requests must say `require_paused` too).
    pub require_paused: bool,
    /// Requests in flight at most.
    pub window: usize,
    pub page_size: u64,
}

/// Why a windowed page stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum WindowError<E> {
    /// The source: the stream broke, or it refused or botched a request.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The caller's handling of a reply failed (e.g. a local install).
    #[error(transparent)]
    Reply(E),
}

/// Runs requests over one GetPages stream with at most `window` in flight,
/// handing the pages of each reply ([`check_reply`]ed), with its request and
/// the caller's ticket for it, to `on_reply`. `next` is asked for another request whenever a slot frees, so
/// a caller can choose late (e.g. near recent faults). When the stream
/// stops for any reason, the requests not answered yet (with their tickets)
/// are in `unanswered`, for the caller to retry or give up on. The stream
/// must come from `fence`'s source; with `require_paused` (post-copy, the
/// requests say so too) every reply must come from the paused source.
pub async fn run_window<T, E>(
    client: &mut Client,
    shape: &WindowShape<'_>,
    mut next: impl FnMut() -> Option<(PagesRequest, T)>,
    mut on_reply: impl FnMut(PagesRequest, Vec<Page>, T) -> Result<(), E>,
    unanswered: &mut VecDeque<(PagesRequest, T)>,
) -> Result<(), WindowError<E>> {
    let WindowShape { fence, require_paused, window, page_size } = *shape;
    let (tx, rx) = mpsc::channel::<PagesRequest>(window.max(1));
    let rpc = |status| rpc_error(Some(fence), "GetPages", status);
    let mut in_flight: HashMap<u64, (PagesRequest, T)> = HashMap::new();
    let mut exhausted = false;
    // Fill the window before opening the stream so the first requests go
    // out with the headers.
    while in_flight.len() < window {
        match unanswered.pop_front().or_else(&mut next) {
            Some((request, ticket)) => {
                let _ = tx.try_send(request);
                in_flight.insert(request.request_id, (request, ticket));
            }
            None => {
                exhausted = true;
                break;
            }
        }
    }
    if in_flight.is_empty() {
        return Ok(());
    }
    let result: Result<(), WindowError<E>> = async {
        let response = client.get_pages(ReceiverStream::new(rx)).await.map_err(rpc)?;
        let incarnation = fence.check_headers(response.metadata())?;
        let mut replies = response.into_inner();
        while !in_flight.is_empty() {
            let Some(reply) = replies.message().await.map_err(rpc)? else {
                return Err(SourceError::StreamEnded(in_flight.len()).into());
            };
            let id = reply.request_id;
            let Some((request, ticket)) = in_flight.remove(&id) else {
                return Err(SourceError::BadReply { request_id: id, why: "no such request is in flight".into() }.into());
            };
            // A refusal is the refusal (check_reply), whatever its epoch.
            let fenced = match require_paused && reply.error.is_none() {
                true => fence.check_paused(&incarnation, reply.pause_epoch, &format!("the reply to request {id}")),
                false => Ok(()),
            };
            match fenced.and_then(|()| check_reply(&request, reply, page_size)) {
                Ok(pages) => on_reply(request, pages, ticket).map_err(WindowError::Reply)?,
                Err(refused_or_bad) => {
                    in_flight.insert(id, (request, ticket));
                    return Err(refused_or_bad.into());
                }
            }
            while !exhausted && in_flight.len() < window {
                match unanswered.pop_front().or_else(&mut next) {
                    Some((request, ticket)) => {
                        in_flight.insert(request.request_id, (request, ticket));
                        if tx.send(request).await.is_err() {
                            return Err(SourceError::StreamEnded(in_flight.len()).into());
                        }
                    }
                    None => exhausted = true,
                }
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        unanswered.extend(in_flight.into_values());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_at_its_limits_is_waited_out_like_an_outage() {
        let shed = SourceError::Rpc {
            rpc: "GetPages",
            status: tonic::Status::resource_exhausted("this agent has 64 RPCs under way"),
        };
        assert!(!shed.source_answered(), "RESOURCE_EXHAUSTED is retried until the unreachable timeout");
        assert!(!shed.is_fatal());
        assert!(!shed.is_not_paused());
        let refused = SourceError::Rpc { rpc: "GetPages", status: tonic::Status::out_of_range("past the region") };
        assert!(refused.source_answered(), "a refusal on its merits is still an answer");
    }
}
