//! TLS on an agent's gRPC port: the connections the listener accepts are
//! handed to tonic only once their handshake has succeeded (a client
//! certificate from the CA, valid now). Handshakes run side by side, each
//! within [`HANDSHAKE_TIMEOUT`], at most [`MAX_PENDING_HANDSHAKES`] at a
//! time: a client that connects and says nothing holds a slot for seconds,
//! never an fd for ever, and never delays the next client's handshake.
//!
//! A failed handshake is logged at warn with the peer's address and the
//! reason (at most one such line a second; the rest at debug) and counted
//! in `pageserver_tls_handshake_failures_total`.
#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use pageserver_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A client has this long from its TCP connection to a finished handshake
/// (a handshake on a loopback or data-centre link takes milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; a connection beyond them is closed at
/// once (and counted as a failure) rather than queued.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Secured connections tonic has not taken yet.
const READY_QUEUE: usize = 16;

/// The connections of `incoming` that complete a TLS handshake with `tls`,
/// as long as the returned stream is polled (dropping it stops accepting).
pub fn secured<S, IO>(incoming: S, tls: ServerTls) -> impl Stream<Item = io::Result<TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = TcpConnectInfo> + Unpin + Send + 'static,
{
    let (ready, taken) = mpsc::channel(READY_QUEUE);
    tokio::spawn(accept_loop(incoming, tls, ready));
    ReceiverStream::new(taken).map(Ok)
}

async fn accept_loop<S, IO>(incoming: S, tls: ServerTls, ready: mpsc::Sender<TlsStream<IO>>)
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = TcpConnectInfo> + Unpin + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let log = Arc::new(FailureLog::default());
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let next = tokio::select! {
            _ = ready.closed() => return,
            next = incoming.next() => next,
        };
        let io = match next {
            None => return,
            Some(Ok(io)) => io,
            Some(Err(error)) => {
                tracing::warn!(%error, "accepting a connection failed");
                continue;
            }
        };
        let peer = io.connect_info().remote_addr();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log.failed(peer, "too many handshakes under way: closed at once", "busy");
            continue;
        };
        let (tls, ready, log) = (tls.clone(), ready.clone(), log.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(io)).await;
            drop(slot);
            match handshake {
                Ok(Ok(stream)) => {
                    let _ = ready.send(stream).await;
                }
                Ok(Err(error)) => log.failed(peer, &error.to_string(), "refused"),
                Err(_) => log.failed(peer, "no handshake within the timeout", "timeout"),
            }
        });
    }
}

/// Rate-limits the warnings about failed handshakes: a scan or a flood
/// must not fill the log.
#[derive(Debug, Default)]
struct FailureLog {
    /// The second (since the epoch) of the last warning.
    last_warned: AtomicU64,
}

impl FailureLog {
    fn failed(&self, peer: Option<std::net::SocketAddr>, reason: &str, kind: &'static str) {
        metrics::counter!("pageserver_tls_handshake_failures_total", "reason" => kind).increment(1);
        let peer = peer.map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        if self.last_warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(%peer, reason, "TLS handshake failed: connection closed");
        } else {
            tracing::debug!(%peer, reason, "TLS handshake failed: connection closed");
        }
    }
}
