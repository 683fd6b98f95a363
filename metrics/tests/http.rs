//! The `/metrics` server over real TCP on 127.0.0.1: scrapes, HEAD, wrong
//! paths and methods, garbage, and shutdown.

use std::time::Duration;

use pageserver_metrics::{Collector, builder, register, scrape, serve_metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
struct Scrapes(metrics::Counter);

impl Collector for Scrapes {
    fn collect(&self) {
        self.0.increment(1);
    }
}

async fn raw(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn serves_metrics_until_shutdown() {
    let recorder = builder("http-test").expect("builder").build_recorder();
    let handle = register(&recorder, || {
        metrics::describe_counter!("scrapes_total", "Renders so far.");
        Scrapes(metrics::counter!("scrapes_total"))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_metrics(listener, handle, async {
        let _ = stopped.await;
    }));

    let first = scrape(&addr).await.expect("scrape");
    assert!(first.contains("scrapes_total{vm=\"http-test\"} 1\n"), "{first}");
    let second = scrape(&addr).await.expect("scrape");
    assert!(second.contains("scrapes_total{vm=\"http-test\"} 2\n"), "{second}");

    let head = raw(&addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
    let query = raw(&addr, b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n").await;
    assert!(query.starts_with("HTTP/1.1 200 OK\r\n") && query.contains("scrapes_total"), "{query}");
    let missing = raw(&addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n") && missing.contains("try /metrics"), "{missing}");
    let post = raw(&addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
    let garbage = raw(&addr, b"hello\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let huge = raw(&addr, &[b'a'; 40_000]).await;
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");

    // A client that connects and says nothing does not block others.
    let _silent = TcpStream::connect(&addr).await.expect("connect");
    assert!(scrape(&addr).await.is_ok());

    stop.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops").expect("no panic");
    assert!(scrape(&addr).await.is_err(), "nothing listens after shutdown");
}
