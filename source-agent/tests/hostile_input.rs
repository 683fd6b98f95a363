//! Hostile and broken input to the PageServer service, over real gRPC on
//! 127.0.0.1, against a memory file and against memory a VMM (this test
//! process) handed off: every field at 0, at its maximum and past the
//! layout; messages over the size limit, unary and inside a `GetPages`
//! stream; hundreds of concurrent `GetPages` streams. Each refusal has its
//! documented code (`source_agent::service`), and the agent serves correct
//! pages afterwards.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{PAGE_SIZE, RunningServer, bitmap_chunks, page_pattern};
use pageserver_agent_shell::GrpcLimits;
use pageserver_agent_shell::PeerAllowList;
use pageserver_proto::MAX_MESSAGE_BYTES;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, GetPageRequest, Page, PagesReply, PagesRequest};
use source_agent::memory::PageRangeError;
use source_agent::metrics::Rpc;
use source_agent::pages_in_flight::PagesInFlightLimits;
use source_agent::{SourceAgent, SourceLimits, SourceMemory, listen_for_handoff};
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const PAGES: u64 = 64;

/// An agent under attack, and what keeps its memory alive.
struct Served {
    agent: Arc<SourceAgent>,
    server: RunningServer,
    _keep: Box<dyn std::any::Any + Send>,
}

fn write_memory_file(path: &std::path::Path) {
    let content: Vec<u8> = (0..PAGES).flat_map(|page| page_pattern(page, 0)).collect();
    std::fs::write(path, content).expect("write memory file");
}

/// Limits that admit [`STREAMS`] streams at once (the defaults refuse
/// most of them with RESOURCE_EXHAUSTED: see the demo's tests/flood.rs),
/// each holding one request's worth of replies.
fn limits_for_many_streams() -> SourceLimits {
    let stream_bytes = pageserver_proto::MAX_REQUEST_BYTES;
    SourceLimits {
        grpc: GrpcLimits { grpc_max_rpcs: 2 * STREAMS, ..GrpcLimits::default() },
        pages_in_flight: PagesInFlightLimits {
            get_pages_stream_bytes: stream_bytes,
            get_pages_total_bytes: STREAMS as u64 * stream_bytes,
            ..PagesInFlightLimits::default()
        },
    }
}

async fn serve_file() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.mem");
    write_memory_file(&path);
    let memory = SourceMemory::open_file(&path, PAGE_SIZE).expect("open memory file");
    let agent = Arc::new(SourceAgent::with_memory("test-vm", memory));
    let server = RunningServer::start_with_limits(agent.clone(), limits_for_many_streams()).await;
    Served { agent, server, _keep: Box::new(dir) }
}

async fn serve_handoff() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("handoff.sock");
    let agent = Arc::new(SourceAgent::waiting_for_handoff("test-vm", &socket));
    let listener =
        listen_for_handoff(&socket, PeerAllowList::own_uid(), None, agent.clone()).expect("listen for the hand-off");
    let server = RunningServer::start_with_limits(agent.clone(), limits_for_many_streams()).await;
    let vmm = common::handed_off(&socket, PAGES).await;
    Served { agent, server, _keep: Box::new((dir, listener, vmm)) }
}

fn request(request_id: u64, region: u32, first_index: u64, count: u32) -> PagesRequest {
    PagesRequest { request_id, region, first_index, count, require_paused: false }
}

fn assert_page(page: &Page, region: u32, index: u64) {
    assert_eq!((page.region, page.index, page.zero), (region, index, false));
    assert_eq!(page.data, page_pattern(index, 0), "content of page {index}");
}

/// The agent still serves correct pages, one by one and in a stream.
async fn assert_still_serving(client: &mut PageServerClient<Channel>) {
    let page = client.get_page(GetPageRequest { region: 0, index: 5 }).await.expect("GetPage").into_inner();
    assert_page(&page, 0, 5);
    let mut replies = client.get_pages(tokio_stream::iter([request(1, 0, 10, 3)])).await.expect("GetPages");
    let reply = replies.get_mut().message().await.expect("reply").expect("one reply");
    assert!(reply.error.is_none(), "{:?}", reply.error);
    for (i, page) in reply.pages.iter().enumerate() {
        assert_page(page, 0, 10 + i as u64);
    }
}

async fn refuses_extreme_fields(served: &Served) {
    let mut client = served.server.client().await;
    let page = |region, index| GetPageRequest { region, index };
    let get_page_cases = [
        (page(u32::MAX, 0), Code::NotFound, "unknown region 4294967295"),
        (page(1, 0), Code::NotFound, "unknown region 1"),
        (page(u32::MAX, u64::MAX), Code::NotFound, "unknown region 4294967295"),
        (page(0, u64::MAX), Code::OutOfRange, "page 18446744073709551615"),
        (page(0, PAGES), Code::OutOfRange, &format!("page {PAGES} is out of range")),
    ];
    for (request, code, message) in get_page_cases {
        let status = client.get_page(request).await.expect_err("a refusal");
        assert_eq!(status.code(), code, "{request:?}: {status}");
        assert!(status.message().contains(message), "{request:?}: {}", status.message());
    }
    assert_page(&client.get_page(page(0, 0)).await.expect("page 0").into_inner(), 0, 0);
    assert_page(&client.get_page(page(0, PAGES - 1)).await.expect("last page").into_inner(), 0, PAGES - 1);

    let refusals: HashMap<u64, (PagesRequest, Code, &str)> = [
        (request(0, 0, 0, 0), Code::InvalidArgument, "empty batch"),
        (request(u64::MAX, 0, 0, u32::MAX), Code::InvalidArgument, "oversized batch"),
        (request(2, u32::MAX, 0, 1), Code::NotFound, "unknown region 4294967295"),
        (request(3, 0, u64::MAX, 1), Code::OutOfRange, "page 18446744073709551615"),
        (request(4, 0, PAGES - 1, 2), Code::OutOfRange, "run past its end"),
        (request(5, 0, u64::MAX, u32::MAX), Code::InvalidArgument, "oversized batch"),
        (request(6, 0, u64::MAX - 1, 512), Code::OutOfRange, "out of range"),
        (request(7, 0, 0, 512), Code::OutOfRange, "run past its end"),
        (request(8, u32::MAX, u64::MAX, 0), Code::InvalidArgument, "empty batch"),
    ]
    .into_iter()
    .map(|(request, code, message)| (request.request_id, (request, code, message)))
    .collect();
    let good = request(9, 0, 0, PAGES as u32);
    let requests: Vec<_> = refusals.values().map(|(r, _, _)| *r).chain([good]).collect();
    let before = served.agent.rpcs.rejected(Rpc::GetPages);
    let mut replies = client.get_pages(tokio_stream::iter(requests.clone())).await.expect("GetPages").into_inner();
    let mut answered = HashMap::<u64, PagesReply>::new();
    while let Some(reply) = replies.message().await.expect("the stream goes on after bad requests") {
        assert!(answered.insert(reply.request_id, reply).is_none(), "one reply per request");
    }
    assert_eq!(answered.len(), requests.len());
    for (id, (request, code, message)) in &refusals {
        let error = answered[id].error.as_ref().unwrap_or_else(|| panic!("{request:?} must be refused"));
        assert_eq!(error.code, *code as i32, "{request:?}: {}", error.message);
        assert!(error.message.contains(message), "{request:?}: {}", error.message);
        assert!(answered[id].pages.is_empty());
    }
    let whole = &answered[&good.request_id];
    assert!(whole.error.is_none(), "{:?}", whole.error);
    assert_eq!(whole.pages.len() as u64, PAGES);
    for page in &whole.pages {
        assert_page(page, 0, page.index);
    }
    assert_eq!(served.agent.rpcs.rejected(Rpc::GetPages) - before, refusals.len() as u64);

    let newest = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner().epoch;
    for (since, r#final) in [(u64::MAX, false), (u64::MAX, true), (newest + 1, false)] {
        let status = bitmap_chunks(&mut client, since, r#final).await.expect_err("an epoch from the future");
        assert_eq!(status.code(), Code::InvalidArgument, "since {since}: {status}");
        assert!(status.message().contains(&format!("epoch {since} is newer")), "{}", status.message());
    }
    let chunks = bitmap_chunks(&mut client, 0, false).await.expect("since 0");
    let bitmap = pageserver_proto::bitmap::decode_chunks(&chunks).expect("a well-formed bitmap");
    assert_eq!(bitmap.page_count(), PAGES, "since 0 is every page");
    assert_still_serving(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_fields_of_a_memory_file() {
    let served = serve_file().await;
    refuses_extreme_fields(&served).await;
    served.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_fields_of_handed_off_memory() {
    let served = serve_handoff().await;
    refuses_extreme_fields(&served).await;
    served.server.stop().await;
}

#[test]
fn page_ranges_that_overflow_are_out_of_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.mem");
    write_memory_file(&path);
    let memory = SourceMemory::open_file(&path, PAGE_SIZE).expect("open memory file");
    assert_eq!(
        memory.check_pages(0, 1, u64::MAX),
        Err(PageRangeError::PastEnd { region: 0, first: 1, end: u64::MAX, pages: PAGES })
    );
    assert_eq!(
        memory.check_pages(0, PAGES - 1, u64::MAX - (PAGES - 2)),
        Err(PageRangeError::PastEnd { region: 0, first: PAGES - 1, end: u64::MAX, pages: PAGES })
    );
    assert_eq!(
        memory.check_pages(0, u64::MAX, u64::MAX),
        Err(PageRangeError::OutOfRange { region: 0, index: u64::MAX, pages: PAGES })
    );
    assert_eq!(memory.check_pages(u32::MAX, 0, 1), Err(PageRangeError::UnknownRegion { region: u32::MAX, count: 1 }));
    assert_eq!(memory.check_pages(0, 0, PAGES), Ok(()));
}

/// A `PagesRequest` or `GetPageRequest` with an unknown field that pads it
/// to any size: the service skips the field, so only the size matters.
#[derive(Clone, PartialEq, prost::Message)]
struct Padded {
    #[prost(uint64, tag = "1")]
    first: u64,
    #[prost(uint32, tag = "2")]
    second: u32,
    #[prost(uint64, tag = "3")]
    third: u64,
    #[prost(uint32, tag = "4")]
    fourth: u32,
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

/// `request` padded to about `bytes` bytes.
fn padded_pages_request(request: PagesRequest, bytes: usize) -> Padded {
    let PagesRequest { request_id, region, first_index, count, .. } = request;
    Padded { first: request_id, second: region, third: first_index, fourth: count, padding: vec![0x5A; bytes] }
}

/// A client that sends messages of any size.
async fn unlimited_client(server: &RunningServer) -> tonic::client::Grpc<Channel> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    grpc.ready().await.expect("ready");
    grpc
}

async fn padded_get_page(server: &RunningServer, index: u64, bytes: usize) -> Result<Page, tonic::Status> {
    let mut grpc = unlimited_client(server).await;
    let path = http::uri::PathAndQuery::from_static("/pageserver.v1.PageServer/GetPage");
    let message = PaddedGetPage { region: 0, index, padding: vec![0x5A; bytes] };
    let codec = tonic_prost::ProstCodec::<PaddedGetPage, Page>::default();
    grpc.unary(tonic::Request::new(message), path, codec).await.map(tonic::Response::into_inner)
}

/// `GetPageRequest` with a padding field.
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedGetPage {
    #[prost(uint32, tag = "1")]
    region: u32,
    #[prost(uint64, tag = "2")]
    index: u64,
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_out_of_range() {
    let served = serve_file().await;
    let server = &served.server;

    // Padding under the limit is skipped; over it, tonic refuses the call.
    assert_page(&padded_get_page(server, 3, 1 << 20).await.expect("a padded request under the limit"), 0, 3);
    let status = padded_get_page(server, 3, MAX_MESSAGE_BYTES + 1).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status}");
    assert!(status.message().contains("message length too large"), "{}", status.message());

    // Inside a stream: the request before it is answered, then the stream
    // ends with the same status; the one after it is never read.
    let mut grpc = unlimited_client(server).await;
    let path = http::uri::PathAndQuery::from_static("/pageserver.v1.PageServer/GetPages");
    let codec = tonic_prost::ProstCodec::<Padded, PagesReply>::default();
    let requests = [
        padded_pages_request(request(1, 0, 0, 2), 0),
        padded_pages_request(request(2, 0, 2, 2), MAX_MESSAGE_BYTES + 1),
        padded_pages_request(request(3, 0, 4, 2), 0),
    ];
    let before = served.agent.rpcs.rejected(Rpc::GetPages);
    let mut replies = grpc
        .streaming(tonic::Request::new(tokio_stream::iter(requests)), path, codec)
        .await
        .expect("GetPages")
        .into_inner();
    let first = replies.message().await.expect("the reply to request 1").expect("a reply");
    assert_eq!(first.request_id, 1);
    assert!(first.error.is_none(), "{:?}", first.error);
    let status = replies.message().await.expect_err("the stream ends with the oversized message's status");
    assert_eq!(status.code(), Code::OutOfRange, "{status}");
    assert!(status.message().contains("message length too large"), "{}", status.message());
    assert_eq!(served.agent.rpcs.rejected(Rpc::GetPages) - before, 1, "counted as a rejected GetPages");

    let mut client = server.client().await;
    assert_still_serving(&mut client).await;
    served.server.stop().await;
}

/// Streams open at once, spread over this many connections.
const STREAMS: usize = 300;
const CONNECTIONS: usize = 10;

/// One stream: a first request, then (once every stream has its first
/// reply, so that all are open together) three more, one of them bad.
async fn one_stream(mut client: PageServerClient<Channel>, stream: u64, barrier: Arc<Barrier>) {
    let (send, requests) = mpsc::channel(8);
    let mut replies = client.get_pages(ReceiverStream::new(requests)).await.expect("GetPages").into_inner();
    let first = (stream * 7) % (PAGES - 8);
    let sent = [
        request(0, 0, first, 1),
        request(1, 0, first + 1, 1 + (stream % 4) as u32),
        request(2, 0, PAGES - 1, 2),
        request(3, 0, (first + 3) % PAGES, 1),
    ];
    send.send(sent[0]).await.expect("send");
    let mut answered = vec![replies.message().await.expect("reply").expect("the first reply")];
    barrier.wait().await;
    for request in &sent[1..] {
        send.send(*request).await.expect("send");
    }
    drop(send);
    while let Some(reply) = replies.message().await.expect("reply") {
        answered.push(reply);
    }
    answered.sort_by_key(|reply| reply.request_id);
    assert_eq!(answered.iter().map(|r| r.request_id).collect::<Vec<_>>(), [0, 1, 2, 3], "stream {stream}");
    for (request, reply) in sent.iter().zip(&answered) {
        if request.request_id == 2 {
            assert_eq!(reply.error.as_ref().map(|e| e.code), Some(Code::OutOfRange as i32), "stream {stream}");
            continue;
        }
        assert!(reply.error.is_none(), "stream {stream}: {:?}", reply.error);
        assert_eq!(reply.pages.len(), request.count as usize, "stream {stream}");
        let mut pages = reply.pages.clone();
        pages.sort_by_key(|page| page.index);
        for (i, page) in pages.iter().enumerate() {
            assert_page(page, 0, request.first_index + i as u64);
        }
    }
}

async fn many_concurrent_streams(served: &Served) {
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(served.server.channel().await);
    }
    let barrier = Arc::new(Barrier::new(STREAMS));
    let streams: Vec<_> = (0..STREAMS)
        .map(|stream| {
            let client = PageServerClient::new(channels[stream % CONNECTIONS].clone());
            tokio::spawn(one_stream(client, stream as u64, barrier.clone()))
        })
        .collect();
    for stream in streams {
        stream.await.expect("a stream checked every reply");
    }
    let mut client = served.server.client().await;
    assert_still_serving(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_streams_on_a_memory_file() {
    let served = serve_file().await;
    many_concurrent_streams(&served).await;
    served.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_streams_on_handed_off_memory() {
    let served = serve_handoff().await;
    many_concurrent_streams(&served).await;
    served.server.stop().await;
}
