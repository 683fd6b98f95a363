//! Hostile clients of a source agent, as the tests (and `pageserver-flood`)
//! run them against its gRPC port: streams that ask for every page, a
//! stream that asks for gigabytes and never reads a reply, connections that
//! never send anything. Each reports how the agent dealt with it: served,
//! refused (RESOURCE_EXHAUSTED) or cut.
#![forbid(unsafe_code)]

use std::time::Duration;

use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, Layout, PagesReply, PagesRequest};
use pageserver_proto::{MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use tokio::net::TcpStream;

use crate::resources::ProcessResources;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

/// How one hostile stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every reply came: that many pages.
    Served { pages: u64 },
    /// Refused with RESOURCE_EXHAUSTED, at once or later.
    Refused,
    /// Anything else: the connection cut or refused, another status.
    Cut(String),
}

impl StreamEnd {
    fn of_status(status: &tonic::Status) -> Self {
        if status.code() == Code::ResourceExhausted {
            StreamEnd::Refused
        } else {
            StreamEnd::Cut(format!("{:?}: {}", status.code(), status.message()))
        }
    }
}

/// A new HTTP/2 connection to `grpc` (`HOST:PORT`), plaintext, no pings.
pub async fn connect(grpc: &str) -> Result<PageServerClient<Channel>, tonic::transport::Error> {
    let channel =
        Endpoint::from_shared(format!("http://{grpc}"))?.connect_timeout(Duration::from_secs(5)).connect().await?;
    Ok(PageServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The source's layout, once it has memory (UNAVAILABLE before).
pub async fn layout(grpc: &str) -> Result<Layout, tonic::Status> {
    let mut client = connect(grpc).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(client.get_layout(GetLayoutRequest {}).await?.into_inner())
}

/// Requests for every page of `layout`, each as large as allowed.
pub fn every_page(layout: &Layout) -> Vec<PagesRequest> {
    let per_request = (MAX_REQUEST_BYTES / layout.page_size.max(1)).max(1);
    let mut requests = Vec::new();
    for region in &layout.regions {
        let mut first = 0;
        while first < region.page_count {
            let count = per_request.min(region.page_count - first);
            requests.push(PagesRequest {
                request_id: requests.len() as u64,
                region: region.index,
                first_index: first,
                count: count as u32,
                require_paused: false,
            });
            first += count;
        }
    }
    requests
}

/// One stream asking for `requests`, reading every reply.
async fn read_stream(mut client: PageServerClient<Channel>, requests: Vec<PagesRequest>) -> StreamEnd {
    match client.get_pages(tokio_stream::iter(requests)).await {
        Ok(response) => read_to_end(response.into_inner()).await,
        Err(status) => StreamEnd::of_status(&status),
    }
}

/// Reads every reply of `replies`: how the stream ended.
async fn read_to_end(mut replies: Streaming<PagesReply>) -> StreamEnd {
    let mut pages = 0u64;
    loop {
        match replies.message().await {
            Ok(Some(reply)) => pages += reply.pages.len() as u64,
            Ok(None) => return StreamEnd::Served { pages },
            Err(status) => return StreamEnd::of_status(&status),
        }
    }
}

/// `per_connection` streams on each of `connections` connections, each
/// asking for every page of `layout` and reading every reply.
pub async fn read_everything(grpc: &str, layout: &Layout, connections: usize, per_connection: usize) -> Vec<StreamEnd> {
    let requests = every_page(layout);
    let mut streams = JoinSet::new();
    let mut ends = Vec::new();
    for _ in 0..connections {
        match connect(grpc).await {
            Ok(client) => {
                for _ in 0..per_connection {
                    streams.spawn(read_stream(client.clone(), requests.clone()));
                }
            }
            Err(error) => ends.extend((0..per_connection).map(|_| StreamEnd::Cut(format!("connecting: {error}")))),
        }
    }
    while let Some(end) = streams.join_next().await {
        ends.push(end.unwrap_or_else(|e| StreamEnd::Cut(format!("task: {e}"))));
    }
    ends
}

/// A stream that has sent its requests and reads no reply until
/// [`NeverReading::end`].
#[derive(Debug)]
pub struct NeverReading {
    replies: Result<Streaming<PagesReply>, tonic::Status>,
    _client: PageServerClient<Channel>,
}

/// Opens a stream of `requests` requests for the first `pages` pages of
/// region 0 (all sent at once), and reads nothing.
pub async fn never_reading(grpc: &str, requests: u64, pages: u32) -> Result<NeverReading, tonic::transport::Error> {
    let mut client = connect(grpc).await?;
    let asked = (0..requests).map(move |request_id| PagesRequest {
        request_id,
        region: 0,
        first_index: 0,
        count: pages,
        require_paused: false,
    });
    let replies = client.get_pages(tokio_stream::iter(asked)).await.map(tonic::Response::into_inner);
    Ok(NeverReading { replies, _client: client })
}

impl NeverReading {
    /// Whether the agent refused the stream as a whole.
    pub fn refused_at_once(&self) -> bool {
        self.replies.is_err()
    }

    /// Reads it now: how the agent ended it (or the pages, if it served
    /// everything after all).
    pub async fn end(self) -> StreamEnd {
        match self.replies {
            Ok(replies) => read_to_end(replies).await,
            Err(status) => StreamEnd::of_status(&status),
        }
    }
}

/// `count` TCP connections to `grpc` that send nothing (those that could
/// not even connect are left out).
pub async fn idle_connections(grpc: &str, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        if let Ok(stream) = TcpStream::connect(grpc).await {
            connections.push(stream);
        }
    }
    connections
}

/// How many of `connections` the other end has closed (EOF or reset), by
/// now, without waiting.
pub fn closed_by_peer(connections: &[TcpStream]) -> usize {
    let mut byte = [0u8; 64];
    connections
        .iter()
        .filter(|stream| {
            loop {
                match stream.try_read(&mut byte) {
                    Ok(0) => break true,
                    // An HTTP/2 server may have sent its SETTINGS: read on.
                    Ok(_) => continue,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            }
        })
        .count()
}

/// `done`'s output, and the worst of process `pid`'s resources (each
/// field's maximum) sampled every 20 ms until it completed.
pub async fn worst_during<T>(pid: u32, done: impl std::future::Future<Output = T>) -> (T, ProcessResources) {
    let mut worst = ProcessResources::default();
    let mut sample = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(done);
    loop {
        tokio::select! {
            result = &mut done => return (result, worst),
            _ = sample.tick() => if let Ok(now) = ProcessResources::of(pid) {
                worst.fds = worst.fds.max(now.fds);
                worst.threads = worst.threads.max(now.threads);
                worst.rss_anon_kib = worst.rss_anon_kib.max(now.rss_anon_kib);
                worst.page_tables_kib = worst.page_tables_kib.max(now.page_tables_kib);
                worst.vm_rss_kib = worst.vm_rss_kib.max(now.vm_rss_kib);
            },
        }
    }
}
