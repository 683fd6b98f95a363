//! The `pageserver.v1.PageServer` service.
//!
//! - Before memory is attached (the VMM has not handed it off yet) every RPC
//!   fails with UNAVAILABLE, naming the socket the agent waits on.
//! - `GetPage` / `GetPages` address pages by (region, index). An unknown
//!   region is NOT_FOUND, an index (or a range's end) past the region is
//!   OUT_OF_RANGE, and a `GetPages` batch of 0 pages or of more than
//!   `MAX_REQUEST_BYTES` is INVALID_ARGUMENT; messages name the region, index
//!   and limit. In the `GetPages` stream a bad request is answered by a
//!   `PagesReply` carrying only its `request_id` and the error, and the stream
//!   goes on. A good request is answered by exactly one reply holding all its
//!   pages. Zero pages are sent as `zero = true` without data. Every check
//!   is overflow-safe: `u64::MAX` indexes, `u32::MAX` counts and regions, and
//!   `first_index + count` past `u64::MAX` are refused with the codes above.
//! - Pages the layout has but the memory file no longer holds (it was
//!   truncated while served) are DATA_LOSS, for the requests that ask for
//!   them only; the message names the memory, region, pages, file offset and
//!   how many bytes of how many could be read. Pages before the new end are
//!   still served. (The agent reads with `pread`, see [`crate::memory`]: a
//!   shrunk file is an error, never a SIGBUS.)
//! - A message larger than `MAX_MESSAGE_BYTES` is refused by tonic before it
//!   is decoded, with OUT_OF_RANGE ("decoded message length too large"): a
//!   unary call fails with it; inside a `GetPages` stream it ends the stream
//!   with that status (the requests after it are not read), logged at warn
//!   and counted as a rejected `GetPages` request.
//! - `GetDirtyBitmap` follows the epoch rules of [`crate::dirty`]: a
//!   `since_epoch` newer than the newest epoch is INVALID_ARGUMENT; a final
//!   bitmap while the VM runs is FAILED_PRECONDITION; `paused` is read before
//!   the scan and reported in every chunk (see `pageserver_proto::bitmap` for the
//!   encoding). A final bitmap's last chunk also carries the heat hint, the
//!   hottest of its pages ([`crate::heat`]).
//!
//! - Every response carries the agent's incarnation and the memory's identity
//!   as headers ([`INCARNATION_HEADER`], [`MEMORY_ID_HEADER`]), so that a
//!   target checks on every stream, not only at its first `GetLayout`, that
//!   it still talks to the source of its migration.
//! - The pause fence: a `GetPages` reply carries the pause epoch
//!   ([`DirtyTracker::pause_epoch`](crate::dirty::DirtyTracker::pause_epoch))
//!   read before and after its pages were read; if the two differ (the VM
//!   paused or resumed meanwhile) the request is answered ABORTED instead.
//!   A request with `require_paused` is refused with FAILED_PRECONDITION,
//!   nothing read, while the VM runs.
//!
//! - A stopping agent cuts the `GetPages` streams still open at the end of
//!   its shutdown grace: each ends with UNAVAILABLE saying so
//!   ([`crate::drain`]).
//!
//! Unary calls are timed, and counted as rejected when they fail, by the
//! server's [`RpcMetricsLayer`](crate::rpc_metrics::RpcMetricsLayer); the
//! requests inside a `GetPages` stream are timed and counted here, one by
//! one ([`crate::metrics`]).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use guest_memory::memfile::is_zero;
use pageserver_agent_shell::ConnectionHandle;
use pageserver_proto::bitmap::encode_chunks;
use pageserver_proto::heat;
use pageserver_proto::v1 as pb;
use pageserver_proto::v1::page_server_server::PageServer;
use pageserver_proto::{INCARNATION_HEADER, MAX_REQUEST_BYTES, MEMORY_ID_HEADER};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::SourceAgent;
use crate::dirty::DirtyError;
use crate::memory::{PageRangeError, ReadError, SourceMemory};
use crate::metrics::Rpc;
use crate::pages_in_flight::{PagesInFlight, Reservation, Stalled, StreamBudget};
use crate::wire::{page_range_code, read_error_code, regions_to_proto};

/// The PageServer implementation over one agent.
#[derive(Debug, Clone)]
pub struct PageService {
    agent: Arc<SourceAgent>,
    pages_in_flight: PagesInFlight,
}

impl PageService {
    pub fn new(agent: Arc<SourceAgent>, pages_in_flight: PagesInFlight) -> Self {
        Self { agent, pages_in_flight }
    }

    fn memory(&self) -> Result<Arc<SourceMemory>, Status> {
        self.agent.memory_or_reason().cloned().map_err(Status::unavailable)
    }

    /// A response with the identity headers (see the module docs).
    fn stamped<T>(&self, memory: &SourceMemory, message: T) -> Response<T> {
        let mut response = Response::new(message);
        self.identify(memory, response.metadata_mut());
        response
    }

    /// An error with the identity headers too, once there is memory: a
    /// target tells a refusal of its own source from another's by them.
    fn stamped_status(&self, mut status: Status) -> Status {
        if let Some(memory) = self.agent.memory() {
            self.identify(memory, status.metadata_mut());
        }
        status
    }

    fn identify(&self, memory: &SourceMemory, headers: &mut tonic::metadata::MetadataMap) {
        for (name, value) in [(INCARNATION_HEADER, self.agent.incarnation()), (MEMORY_ID_HEADER, memory.id())] {
            match value.parse() {
                Ok(value) => {
                    headers.insert(name, value);
                }
                // Both are ASCII by construction; a target refuses a
                // response without them.
                Err(error) => tracing::error!(name, value, %error, "identity header not sent"),
            }
        }
    }
}

fn range_status(error: &PageRangeError) -> Status {
    Status::new(page_range_code(error), error.to_string())
}

fn read_status(error: &ReadError) -> Status {
    let code = read_error_code(error);
    if code == tonic::Code::DataLoss {
        tracing::warn!(%error, "pages the layout has cannot be read");
    }
    Status::new(code, error.to_string())
}

/// Why a GetPages request is refused before any page is read.
fn check_batch(memory: &SourceMemory, request: &pb::PagesRequest) -> Result<(), Status> {
    let page_size = memory.page_size();
    let count = u64::from(request.count);
    if count == 0 {
        return Err(Status::invalid_argument(format!(
            "empty batch: request {} asks for 0 pages of region {}",
            request.request_id, request.region
        )));
    }
    let bytes = count * page_size;
    if bytes > MAX_REQUEST_BYTES {
        return Err(Status::invalid_argument(format!(
            "oversized batch: request {} asks for {count} pages of {page_size} bytes ({bytes} bytes), more than \
             the {MAX_REQUEST_BYTES} bytes ({} pages) one request may ask for",
            request.request_id,
            MAX_REQUEST_BYTES / page_size
        )));
    }
    memory.check_pages(request.region, request.first_index, count).map_err(|e| range_status(&e))
}

/// Reads `count` pages into `Page` messages (one buffer for all of them).
fn read_pages(
    memory: &SourceMemory,
    agent: &SourceAgent,
    region: u32,
    first: u64,
    count: u64,
) -> Result<Vec<pb::Page>, ReadError> {
    let page_size = memory.page_size() as usize;
    let buffer = Bytes::from(memory.read_pages(region, first, count)?);
    let mut zero_pages = 0u64;
    let pages: Vec<pb::Page> = (0..count as usize)
        .map(|i| {
            let data = buffer.slice(i * page_size..(i + 1) * page_size);
            let zero = is_zero(&data);
            zero_pages += u64::from(zero);
            pb::Page { region, index: first + i as u64, zero, data: if zero { Bytes::new() } else { data } }
        })
        .collect();
    let counters = &agent.counters;
    counters.pages_served.fetch_add(count, Ordering::Relaxed);
    counters.zero_pages_served.fetch_add(zero_pages, Ordering::Relaxed);
    counters.bytes_served.fetch_add((count - zero_pages) * page_size as u64, Ordering::Relaxed);
    Ok(pages)
}

/// The one reply to a GetPages request, timed as one request of the
/// stream.
fn answer_pages_request(memory: &SourceMemory, agent: &SourceAgent, request: &pb::PagesRequest) -> pb::PagesReply {
    let started = Instant::now();
    let reply = pages_reply(memory, agent, request);
    agent.rpcs.observe(Rpc::GetPages, started.elapsed());
    reply
}

fn pages_reply(memory: &SourceMemory, agent: &SourceAgent, request: &pb::PagesRequest) -> pb::PagesReply {
    let pause_epoch = memory.dirty().pause_epoch();
    let result = check_batch(memory, request)
        .and_then(|()| {
            if request.require_paused && pause_epoch == 0 {
                return Err(Status::failed_precondition(format!(
                    "request {} needs the VM paused (post-copy), and it is running: nothing was read",
                    request.request_id
                )));
            }
            read_pages(memory, agent, request.region, request.first_index, u64::from(request.count))
                .map_err(|e| read_status(&e))
        })
        .and_then(|pages| match memory.dirty().pause_epoch() {
            after if after == pause_epoch => Ok(pages),
            after => Err(Status::aborted(format!(
                "the VM paused or resumed while request {} was read (pause epoch {pause_epoch}, then {after}): \
                 ask again",
                request.request_id
            ))),
        });
    match result {
        Ok(pages) => pb::PagesReply { request_id: request.request_id, pages, error: None, pause_epoch },
        Err(status) => {
            agent.rpcs.reject(Rpc::GetPages);
            tracing::debug!(request_id = request.request_id, error = %status.message(), "GetPages request refused");
            pb::PagesReply {
                request_id: request.request_id,
                pages: Vec::new(),
                error: Some(pb::RequestError { code: status.code() as i32, message: status.message().to_owned() }),
                pause_epoch,
            }
        }
    }
}

/// A reply queued for the client, with the room it takes in its stream's
/// budget (none for the stream's last status).
type Queued = (Result<pb::PagesReply, Status>, Option<OwnedSemaphorePermit>);
type ReplySender = mpsc::UnboundedSender<Queued>;

/// Ends a `GetPages` stream that the shutdown cuts (see [`crate::drain`]):
/// UNAVAILABLE after the replies already queued.
fn cut_stream(replies: &ReplySender, answered: u64) {
    tracing::warn!(answered, "cutting a GetPages stream: the source agent is shutting down and its grace is over");
    let status = Status::unavailable(format!(
        "the source agent is shutting down: this GetPages stream was cut at the end of its shutdown grace, after \
         {answered} requests answered; requests not answered were not read: send them again to its successor"
    ));
    let _ = replies.send((Err(status), None));
}

/// Stops serving a `GetPages` client that does not take its replies, and
/// cuts its connection (which frees what HTTP/2 buffers for it).
fn stalled_stream(
    replies: &ReplySender,
    connection: Option<&ConnectionHandle>,
    budget: &StreamBudget,
    answered: u64,
    stalled: Stalled,
) {
    let why = format!(
        "a GetPages client has taken no reply for {:?} with {} bytes of replies queued (--get-pages-stream-bytes), \
         after {answered} requests answered",
        stalled.0,
        budget.queued_bytes()
    );
    let _ = replies.send((Err(Status::resource_exhausted(format!("{why}: stream and connection cut"))), None));
    match connection {
        Some(ConnectionHandle(connection)) => connection.cut(&why),
        None => tracing::warn!("{why}: no longer served"),
    }
}

/// The replies of one `GetPages` stream, as tonic sends them: each frees
/// its room in the stream's budget once taken, and the stream's
/// reservation of the total goes when the stream does.
#[derive(Debug)]
pub struct BudgetedReplies {
    queued: mpsc::UnboundedReceiver<Queued>,
    _reservation: Reservation,
}

impl Stream for BudgetedReplies {
    type Item = Result<pb::PagesReply, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.queued.poll_recv(cx).map(|queued| queued.map(|(reply, _room)| reply))
    }
}

fn dirty_status(error: DirtyError) -> Status {
    match error {
        DirtyError::EpochTooNew { .. } => Status::invalid_argument(error.to_string()),
        DirtyError::Scan { .. } | DirtyError::Holes { .. } | DirtyError::EpochOverflow => {
            Status::internal(error.to_string())
        }
    }
}

impl PageService {
    fn layout(&self) -> Result<pb::Layout, Status> {
        let memory = self.memory()?;
        let layout = memory.layout();
        Ok(pb::Layout {
            regions: regions_to_proto(layout),
            page_size: layout.page_size(),
            total_pages: layout.total_pages(),
            epoch: memory.dirty().epoch(),
            paused: memory.dirty().is_paused(),
            vm: self.agent.vm().to_owned(),
            memory_source: memory.source_kind().to_owned(),
            incarnation: self.agent.incarnation().to_owned(),
            memory_id: memory.id().to_owned(),
            pause_epoch: memory.dirty().pause_epoch(),
        })
    }

    fn page(&self, request: pb::GetPageRequest) -> Result<pb::Page, Status> {
        let memory = self.memory()?;
        let pb::GetPageRequest { region, index } = request;
        memory.check_pages(region, index, 1).map_err(|e| range_status(&e))?;
        let mut pages = read_pages(&memory, &self.agent, region, index, 1).map_err(|e| read_status(&e))?;
        pages.pop().ok_or_else(|| Status::internal("no page read"))
    }

    /// Scans and encodes the bitmap: the chunks of the reply stream.
    async fn dirty_bitmap(&self, request: pb::DirtyBitmapRequest) -> Result<Vec<pb::DirtyBitmapChunk>, Status> {
        let memory = self.memory()?;
        let pb::DirtyBitmapRequest { since_epoch, r#final } = request;
        let newest = memory.dirty().epoch();
        if since_epoch > newest {
            return Err(dirty_status(DirtyError::EpochTooNew { since: since_epoch, newest }));
        }
        // Read before scanning: only a scan that started after the pause is final.
        let paused = memory.dirty().is_paused();
        let pause_epoch = memory.dirty().pause_epoch();
        if r#final && !paused {
            return Err(Status::failed_precondition("the VM is still running; a final bitmap needs it paused"));
        }
        let scanning = memory.clone();
        let snapshot = tokio::task::spawn_blocking(move || scanning.dirty().dirty_since(since_epoch, r#final))
            .await
            .map_err(|e| Status::internal(format!("dirty scan task failed: {e}")))?
            .map_err(dirty_status)?;
        let mut chunks = encode_chunks(snapshot.epoch, paused, &snapshot.runs)
            .map_err(|e| Status::internal(format!("encoding the dirty bitmap: {e}")))?;
        for chunk in &mut chunks {
            chunk.pause_epoch = pause_epoch;
        }
        // The final bitmap's heat hint: the target's pull order.
        if let Some(last) = chunks.last_mut() {
            last.hot = heat::encode(&snapshot.hot);
        }
        tracing::debug!(
            since_epoch,
            epoch = snapshot.epoch,
            paused,
            dirty_pages = snapshot.dirty_pages,
            hot_runs = snapshot.hot.len(),
            chunks = chunks.len(),
            "dirty bitmap"
        );
        Ok(chunks)
    }
}

#[tonic::async_trait]
impl PageServer for PageService {
    async fn get_layout(&self, _request: Request<pb::GetLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        let memory = self.memory()?;
        self.layout().map(|layout| self.stamped(&memory, layout)).map_err(|s| self.stamped_status(s))
    }

    async fn get_page(&self, request: Request<pb::GetPageRequest>) -> Result<Response<pb::Page>, Status> {
        let memory = self.memory()?;
        self.page(request.into_inner()).map(|page| self.stamped(&memory, page)).map_err(|s| self.stamped_status(s))
    }

    type GetPagesStream = BudgetedReplies;

    async fn get_pages(
        &self,
        request: Request<Streaming<pb::PagesRequest>>,
    ) -> Result<Response<Self::GetPagesStream>, Status> {
        // Requests inside the stream are timed one by one, not the stream (a
        // stream refused as a whole is counted by the metrics layer).
        let memory = self.memory()?;
        let (budget, reservation) = self.pages_in_flight.open_stream()?;
        let connection = request.extensions().get::<ConnectionHandle>().cloned();
        let agent = self.agent.clone();
        let mut requests = request.into_inner();
        let (replies, queued) = mpsc::unbounded_channel();
        let cut = agent.drain.cut_signal();
        let page_size = memory.page_size();
        tokio::spawn(async move {
            let _open = agent.drain.stream_opened();
            let mut cut = std::pin::pin!(cut);
            let mut answered = 0u64;
            loop {
                let message = tokio::select! {
                    () = &mut cut => break cut_stream(&replies, answered),
                    message = requests.message() => message,
                };
                let request = match message {
                    Ok(Some(request)) => request,
                    // The client finished its requests: the stream ends after
                    // the replies already queued.
                    Ok(None) => break,
                    // A request tonic could not decode (e.g. over the size
                    // limit): the stream cannot go on, and the client must
                    // learn why rather than wait for a reply that never comes.
                    Err(status) => {
                        agent.rpcs.reject(Rpc::GetPages);
                        tracing::warn!(%status, "GetPages request stream failed; ending the stream with its status");
                        let _ = replies.send((Err(status), None));
                        break;
                    }
                };
                // Room for the reply first: nothing is read for a client
                // that does not take its replies.
                let room = tokio::select! {
                    () = &mut cut => break cut_stream(&replies, answered),
                    room = budget.room_for(u64::from(request.count).saturating_mul(page_size)) => room,
                };
                let room = match room {
                    Ok(room) => room,
                    Err(stalled) => break stalled_stream(&replies, connection.as_ref(), &budget, answered, stalled),
                };
                let reply = answer_pages_request(&memory, &agent, &request);
                if replies.send((Ok(reply), Some(room))).is_err() {
                    break; // The client went away.
                }
                answered += 1;
            }
        });
        let replies = BudgetedReplies { queued, _reservation: reservation };
        Ok(self.stamped(&*self.memory()?, replies))
    }

    type GetDirtyBitmapStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::DirtyBitmapChunk, Status>>>;

    async fn get_dirty_bitmap(
        &self,
        request: Request<pb::DirtyBitmapRequest>,
    ) -> Result<Response<Self::GetDirtyBitmapStream>, Status> {
        let memory = self.memory()?;
        let chunks = self.dirty_bitmap(request.into_inner()).await.map_err(|s| self.stamped_status(s))?;
        Ok(self.stamped(&memory, tokio_stream::iter(chunks.into_iter().map(Ok).collect::<Vec<_>>())))
    }
}
