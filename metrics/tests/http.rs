//! The `/metrics` server over real TCP on 127.0.0.1: scrapes, HEAD, wrong
//! paths and methods, garbage, silent clients, and shutdown.

use std::time::{Duration, Instant};

use pageserver_metrics::{Collector, ScrapeError, builder, register, scrape, serve_metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The servers' cap on connections open at once in these tests.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug)]
struct Scrapes(metrics::Counter);

impl Collector for Scrapes {
    fn collect(&self) {
        self.0.increment(1);
    }
}

/// A server on an ephemeral port, and what stops it.
struct Server {
    addr: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start() -> Server {
    let recorder = builder("http-test").expect("builder").build_recorder();
    let handle = register(&recorder, || {
        metrics::describe_counter!("scrapes_total", "Renders so far.");
        Scrapes(metrics::counter!("scrapes_total"))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_metrics(listener, handle, MAX_CONNECTIONS, async {
        let _ = stopped.await;
    }));
    Server { addr, stop, task }
}

/// A response as read off the wire.
#[derive(Debug)]
struct Reply {
    status_line: String,
    /// Names in lower case: HTTP header names are case-insensitive, and
    /// hyper writes them in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn status(&self) -> &str {
        self.status_line.split(' ').nth(1).unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is and reads the whole answer, until the server
/// closes the connection.
async fn raw(addr: &str, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head: {out:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("bad header line {line:?}"));
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    Reply { status_line, headers, body: body.to_owned() }
}

#[tokio::test]
async fn scrapes_render_through_the_collector() {
    let server = start().await;
    let first = scrape(&server.addr).await.expect("scrape");
    assert!(first.contains("scrapes_total{vm=\"http-test\"} 1\n"), "{first}");
    let second = scrape(&server.addr).await.expect("scrape");
    assert!(second.contains("scrapes_total{vm=\"http-test\"} 2\n"), "{second}");

    let get = raw(&server.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(get.status_line, "HTTP/1.1 200 OK", "{get:?}");
    assert_eq!(get.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "{get:?}");
    assert_eq!(get.header("content-length"), Some(get.body.len().to_string().as_str()), "{get:?}");
    assert!(get.body.contains("scrapes_total{vm=\"http-test\"} 3\n"), "{get:?}");
}

#[tokio::test]
async fn head_and_query_string() {
    let server = start().await;
    let head = raw(&server.addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(head.status_line, "HTTP/1.1 200 OK", "{head:?}");
    assert_eq!(head.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "{head:?}");
    assert!(head.body.is_empty(), "HEAD has no body: {head:?}");
    let length: usize = head.header("content-length").expect("HEAD has the length").parse().expect("a number");
    assert!(length > 0, "{head:?}");

    let query = raw(&server.addr, b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n").await;
    assert_eq!(query.status(), "200", "{query:?}");
    assert!(query.body.contains("scrapes_total"), "{query:?}");
}

#[tokio::test]
async fn wrong_paths_methods_and_garbage() {
    let server = start().await;
    let missing = raw(&server.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(missing.status_line, "HTTP/1.1 404 Not Found", "{missing:?}");
    assert!(missing.body.contains("try /metrics"), "{missing:?}");

    let post = raw(&server.addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(post.status(), "405", "{post:?}");
    let allow = post.header("allow").expect("405 says what is allowed");
    let mut allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
    allowed.sort_unstable();
    assert_eq!(allowed, ["GET", "HEAD"], "{post:?}");

    // A request with a body the server does not read still gets its answer
    // (the server lingers instead of resetting the connection).
    let body = raw(&server.addr, b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").await;
    assert_eq!(body.status(), "405", "{body:?}");

    let garbage = raw(&server.addr, b"hello\r\n\r\n").await;
    assert_eq!(garbage.status(), "400", "{garbage:?}");
    let huge = raw(&server.addr, &[b'a'; 40_000]).await;
    assert_eq!(huge.status(), "431", "{huge:?}");
    let huge_header = [b"GET /metrics HTTP/1.1\r\nX-Big: ".as_slice(), &[b'b'; 20_000], b"\r\n\r\n"].concat();
    let huge_header = raw(&server.addr, &huge_header).await;
    assert_eq!(huge_header.status(), "431", "{huge_header:?}");

    // The server still serves after all that.
    assert!(scrape(&server.addr).await.is_ok());
}

#[tokio::test]
async fn silent_clients_block_neither_others_nor_shutdown() {
    let server = start().await;
    // One says nothing; one starts a request head and never finishes it.
    let _silent = TcpStream::connect(&server.addr).await.expect("connect");
    let mut partial = TcpStream::connect(&server.addr).await.expect("connect");
    partial.write_all(b"GET /metr").await.expect("write");
    assert!(scrape(&server.addr).await.is_ok());

    let stopping = Instant::now();
    server.stop.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(5), server.task).await.expect("stops").expect("no panic");
    assert!(stopping.elapsed() < Duration::from_secs(4), "took {:?}", stopping.elapsed());
    let after = scrape(&server.addr).await;
    assert!(matches!(after, Err(ScrapeError::Connect { .. })), "nothing listens after shutdown: {after:?}");
}

#[tokio::test]
async fn scrape_reports_what_went_wrong() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed = listener.local_addr().expect("addr").to_string();
    drop(listener);
    assert!(matches!(scrape(&closed).await, Err(ScrapeError::Connect { .. })));
    assert!(matches!(scrape("127.0.0.1:1\n").await, Err(ScrapeError::Address { .. })));

    // A listener that answers 404 to everything.
    let not_metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = not_metrics.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let (mut stream, _) = not_metrics.accept().await.expect("accept");
        let mut head = [0u8; 1024];
        let _ = stream.read(&mut head).await;
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    });
    let status = scrape(&addr).await;
    assert!(matches!(&status, Err(ScrapeError::Status { status, .. }) if status.as_u16() == 404), "{status:?}");
}
