//! The `/metrics` endpoint, and a scraper for it.
//!
//! A deliberately small HTTP/1.x server on tokio: one request per
//! connection (`Connection: close`, which Prometheus handles), `GET` or
//! `HEAD /metrics` (a query string is ignored) answered with the text format,
//! 404 for other paths, 405 for other methods, 400 for anything that is not
//! an HTTP request line; a request head larger than 16 KiB, or one not
//! received within 10 s, ends the connection. Rendering runs on tokio's
//! blocking pool (the target's collector counts page states, O(pages)).
//! Every 5 s the recorder's pending histogram samples are folded into their
//! buckets, so they do not pile up when nobody scrapes.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::MetricsHandle;

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The only path served.
pub const METRICS_PATH: &str = "/metrics";

const REQUEST_HEAD_LIMIT: usize = 16 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const LINGER: Duration = Duration::from_secs(1);
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `handle` on `listener` until `shutdown` completes. Errors on one
/// connection end that connection only.
pub async fn serve_metrics(listener: TcpListener, handle: MetricsHandle, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut upkeep = tokio::time::interval(UPKEEP_PERIOD);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, handle).await {
                            tracing::debug!(%peer, %error, "metrics request failed");
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors, most likely: back off, keep serving.
                    tracing::warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads a request head: up to the blank line that ends it.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > REQUEST_HEAD_LIMIT {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

/// The method and path of a request line, if it is one.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

fn response(status: &str, content_type: &str, extra_headers: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

async fn answer(mut stream: TcpStream, handle: MetricsHandle) -> io::Result<()> {
    let head = tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let text = "text/plain; charset=utf-8";
    let reply = match head.as_deref().map(request_line) {
        None => response("431 Request Header Fields Too Large", text, "", b"request head too large\n", true),
        Some(None) => response("400 Bad Request", text, "", b"not an HTTP/1.x request\n", true),
        Some(Some((method @ ("GET" | "HEAD"), METRICS_PATH))) => {
            let with_body = method == "GET";
            let renderer = handle.clone();
            match tokio::task::spawn_blocking(move || renderer.render()).await {
                Ok(body) => response("200 OK", CONTENT_TYPE, "", body.as_bytes(), with_body),
                Err(e) => response("500 Internal Server Error", text, "", format!("{e}\n").as_bytes(), with_body),
            }
        }
        Some(Some((_, METRICS_PATH))) => {
            response("405 Method Not Allowed", text, "Allow: GET, HEAD\r\n", b"only GET and HEAD\n", true)
        }
        Some(Some((_, path))) => {
            response("404 Not Found", text, "", format!("nothing at {path}: try {METRICS_PATH}\n").as_bytes(), true)
        }
    };
    tokio::time::timeout(IO_TIMEOUT, stream.write_all(&reply))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.shutdown().await?;
    // Lingering close: take what the client still sends (the rest of an
    // oversized head, a body), so that closing does not reset the
    // connection before the client has read the answer.
    let mut sink = [0u8; 4096];
    let drain = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connecting to the metrics endpoint {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("scraping {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("scraping {addr}: no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("scraping {addr}: {status_line}")]
    Status { addr: String, status_line: String },
    #[error("scraping {addr}: malformed response: {reason}")]
    Malformed { addr: String, reason: String },
}

/// Fetches `http://ADDR/metrics` and returns the exposition text.
pub async fn scrape(addr: &str) -> Result<String, ScrapeError> {
    let run = async {
        let mut stream =
            TcpStream::connect(addr).await.map_err(|source| ScrapeError::Connect { addr: addr.to_owned(), source })?;
        let io_error = |source| ScrapeError::Io { addr: addr.to_owned(), source };
        let request =
            format!("GET {METRICS_PATH} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io_error)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io_error)?;
        parse_response(&raw).map_err(|e| match e {
            ResponseError::Status(status_line) => ScrapeError::Status { addr: addr.to_owned(), status_line },
            ResponseError::Malformed(reason) => ScrapeError::Malformed { addr: addr.to_owned(), reason },
        })
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, run)
        .await
        .map_err(|_| ScrapeError::Timeout { addr: addr.to_owned(), after: SCRAPE_TIMEOUT })?
}

#[derive(Debug, PartialEq, Eq)]
enum ResponseError {
    Status(String),
    Malformed(String),
}

/// The body of a complete `200` response.
fn parse_response(raw: &[u8]) -> Result<String, ResponseError> {
    let malformed = |reason: &str| ResponseError::Malformed(reason.to_owned());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed("headers are not UTF-8"))?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    match status_line.split(' ').nth(1) {
        Some("200") => {}
        Some(_) => return Err(ResponseError::Status(status_line.to_owned())),
        None => return Err(malformed("no status line")),
    }
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            let expected: usize = value.trim().parse().map_err(|_| malformed("bad Content-Length"))?;
            if expected != body.len() {
                return Err(ResponseError::Malformed(format!("{} body bytes, Content-Length {expected}", body.len())));
            }
        }
    }
    String::from_utf8(body.to_vec()).map_err(|_| malformed("body is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(request_line(b"HEAD /metrics?x=1 HTTP/1.0\n\n"), Some(("HEAD", "/metrics")));
        assert_eq!(request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(b"\x16\x03\x01 TLS hello\r\n\r\n"), None);
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(parse_response(ok), Ok("abc".to_owned()));
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabc";
        assert!(matches!(parse_response(short), Err(ResponseError::Malformed(_))));
        let missing = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(parse_response(missing), Err(ResponseError::Status("HTTP/1.1 404 Not Found".to_owned())));
    }
}
