//! A scraper for `/metrics`, for the demo and the tests: one `GET` on a
//! fresh HTTP/1 connection with hyper's client.

use std::io;
use std::string::FromUtf8Error;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::METRICS_PATH;

/// A scrape's whole exchange, connecting included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{addr:?} is not a host:port to scrape")]
    Address { addr: String },
    #[error("connecting to the metrics endpoint {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("scraping {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("scraping {addr}: no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("scraping {addr}: {status}")]
    Status { addr: String, status: StatusCode },
    #[error("scraping {addr}: the body is not UTF-8: {source}")]
    NotUtf8 {
        addr: String,
        #[source]
        source: FromUtf8Error,
    },
}

/// Fetches `http://ADDR/metrics` and returns the exposition text.
pub async fn scrape(addr: &str) -> Result<String, ScrapeError> {
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch(addr))
        .await
        .map_err(|_| ScrapeError::Timeout { addr: addr.to_owned(), after: SCRAPE_TIMEOUT })?
}

/// Fetches `/metrics` over `stream`, a connection already made to `addr`
/// (by a caller that connects its own way, e.g. from inside another network
/// namespace).
pub async fn scrape_over(stream: TcpStream, addr: &str) -> Result<String, ScrapeError> {
    let request = request(addr)?;
    tokio::time::timeout(SCRAPE_TIMEOUT, exchange(stream, request, addr))
        .await
        .map_err(|_| ScrapeError::Timeout { addr: addr.to_owned(), after: SCRAPE_TIMEOUT })?
}

async fn fetch(addr: &str) -> Result<String, ScrapeError> {
    let request = request(addr)?;
    let stream =
        TcpStream::connect(addr).await.map_err(|source| ScrapeError::Connect { addr: addr.to_owned(), source })?;
    exchange(stream, request, addr).await
}

/// `GET /metrics` for the host `addr`.
fn request(addr: &str) -> Result<Request<Empty<Bytes>>, ScrapeError> {
    // The path and `Accept` are valid; only `addr`, the `Host`, can fail.
    Request::get(METRICS_PATH)
        .header(HOST, addr)
        .header(ACCEPT, "text/plain")
        .body(Empty::<Bytes>::new())
        .map_err(|_| ScrapeError::Address { addr: addr.to_owned() })
}

async fn exchange(stream: TcpStream, request: Request<Empty<Bytes>>, addr: &str) -> Result<String, ScrapeError> {
    let http = |source| ScrapeError::Http { addr: addr.to_owned(), source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    // `sender` goes with the exchange: once it is done, the connection ends.
    let exchange = async move {
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status() != StatusCode::OK {
            return Err(ScrapeError::Status { addr: addr.to_owned(), status: response.status() });
        }
        let body = response.into_body().collect().await.map_err(http)?.to_bytes();
        String::from_utf8(body.into()).map_err(|source| ScrapeError::NotUtf8 { addr: addr.to_owned(), source })
    };
    // The connection does the I/O for the exchange; its own error, if any,
    // is the exchange's too.
    let (text, _) = tokio::join!(exchange, connection);
    text
}
