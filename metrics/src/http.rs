//! The `/metrics` endpoint: an axum router on hyper's HTTP/1 connections.
//!
//! axum answers `GET` and `HEAD /metrics` (a query string is ignored) with
//! the text format, other paths with 404, other methods on `/metrics` with
//! 405 and an `Allow` header. hyper itself answers 400 to what is not an
//! HTTP/1 request and 431 to a request head over 16 KiB. The connections
//! are served here rather than with `axum::serve` because these limits, a
//! head timeout and the shutdown below need hyper's connection settings.
//!
//! One request per connection (`Connection: close`, which Prometheus
//! handles): every connection's life is bounded (its head within 10 s, the
//! whole exchange within 30 s), so idle keep-alive connections never pile
//! up, and shutdown only has in-flight answers to wait for. At most
//! `max_connections` are open at once: one more is accepted and closed at
//! once (so the backlog holds no descriptors), counted in
//! [`CONNECTIONS_REFUSED`] and logged at most every 10 s.
//!
//! Rendering runs on tokio's blocking pool (the target's collector counts
//! page states, O(pages)). Every 5 s the recorder's pending histogram
//! samples are folded into their buckets, so they do not pile up when
//! nobody scrapes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::MetricsHandle;

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The only path served.
pub const METRICS_PATH: &str = "/metrics";
/// Connections accepted and closed at once, over the cap.
pub const CONNECTIONS_REFUSED: &str = "pageserver_metrics_connections_refused_total";

/// hyper's read buffer, hence the largest request head (a larger one gets
/// 431). Prometheus sends a few hundred bytes; hyper allows no less than 8 KiB.
const REQUEST_HEAD_LIMIT: usize = 16 << 10;
/// A client that has not sent its whole request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's whole exchange, so that a client that never reads its
/// answer does not hold a task (and shutdown) forever.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closed connection takes what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);
/// How long shutdown waits for answers in flight; connections still open
/// then are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// After a failed accept (out of descriptors, most likely), before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A refusal (or a failed accept) is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Serves `handle` on `listener`, at most `max_connections` at once, until
/// `shutdown` completes, then stops accepting, lets answers in flight finish
/// and returns within 2 s (`SHUTDOWN_GRACE`), even if a client holds a
/// connection open without sending anything. Errors on one connection end
/// that connection only.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: MetricsHandle,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let app = router(handle.clone());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT).max_buf_size(REQUEST_HEAD_LIMIT).keep_alive(false);
    let (closing, closing_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut last_warning: Option<std::time::Instant> = None;
    let mut warning_due = move || {
        let due = last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY);
        if due {
            last_warning = Some(std::time::Instant::now());
        }
        due
    };
    tokio::pin!(shutdown);
    let mut upkeep = tokio::time::interval(UPKEEP_PERIOD);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = upkeep.tick() => handle.run_upkeep(),
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = ended {
                    tracing::warn!(%error, "metrics connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= max_connections => {
                    drop(stream);
                    metrics::counter!(CONNECTIONS_REFUSED).increment(1);
                    if warning_due() {
                        tracing::warn!(%peer, max_connections, "refusing a metrics connection: the cap is reached");
                    }
                }
                Ok((stream, peer)) => {
                    connections.spawn(connection(stream, peer, http.clone(), app.clone(), closing_seen.clone()));
                }
                Err(error) => {
                    if warning_due() {
                        tracing::warn!(%error, "metrics listener: accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    closing.send_replace(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::debug!(open = connections.len(), "metrics: dropping connections still open after the grace period");
    }
    // Dropping the set aborts what is left.
}

fn router(handle: MetricsHandle) -> Router {
    Router::new()
        // `get` serves HEAD too, without the body but with its length.
        // axum adds `Allow: GET,HEAD` to the method fallback's answer.
        .route(METRICS_PATH, get(render).fallback(method_not_allowed))
        .fallback(not_found)
        .with_state(handle)
}

async fn render(State(handle): State<MetricsHandle>) -> Response {
    match tokio::task::spawn_blocking(move || handle.render()).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::error!(%error, "rendering the metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("rendering the metrics: {error}\n")).into_response()
        }
    }
}

async fn method_not_allowed() -> (StatusCode, &'static str) {
    (StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n")
}

async fn not_found(uri: Uri) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, format!("nothing at {}: try {METRICS_PATH}\n", uri.path()))
}

/// Serves one connection, gracefully closed when `closing` turns true
/// (at once if nothing was received yet), then lingers.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    http: http1::Builder,
    app: Router,
    mut closing: watch::Receiver<bool>,
) {
    let exchange = async {
        let served = http.serve_connection(TokioIo::new(&mut stream), TowerToHyperService::new(app));
        tokio::pin!(served);
        tokio::select! {
            result = served.as_mut() => result,
            // It only ever turns true; an error means the server is gone:
            // close as well.
            _ = closing.changed() => {
                served.as_mut().graceful_shutdown();
                served.await
            }
        }
    };
    match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        // A head timeout, a malformed request (answered by hyper), a reset.
        Ok(Err(error)) => tracing::debug!(%peer, %error, "metrics connection ended"),
        Err(_) => tracing::debug!(%peer, "metrics connection: no complete exchange within {EXCHANGE_TIMEOUT:?}"),
    }
    linger(&mut stream).await;
}

/// Lingering close: takes what the client still sends (the rest of an
/// oversized head, a body, a pipelined request) for up to [`LINGER`], so
/// that closing with unread input does not reset the connection before the
/// client has read the answer.
async fn linger(stream: &mut TcpStream) {
    // hyper has usually shut down writing already; a second time is harmless.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
