//! The connection-level limits of a gRPC listener: at most
//! `--grpc-max-connections` open at once, and idle connections closed.
//!
//! [`LimitedIncoming`] is the accept loop: a stream of [`LimitedConnection`]s
//! that tonic serves (`serve_with_incoming_shutdown`), directly or after a
//! TLS handshake wraps them (each is `AsyncRead + AsyncWrite`, and
//! [`Connected`] with its TCP stream's [`TcpConnectInfo`]).
//!
//! - Over the cap, a connection is accepted and closed at once: the
//!   kernel's backlog then never holds descriptors for clients that will
//!   not be served, and the client learns it at once (EOF) rather than
//!   after a timeout. Counted, and logged at most every 10 s.
//! - A connection with no RPC under way that has received nothing for the
//!   idle timeout is closed. An RPC under way (a `GetPages` stream waiting
//!   for faults, however quiet) keeps its connection; the idle time counts
//!   from the later of the last byte received and the end of the last RPC.
//!   HTTP/2 PINGs from the client count as received: the target agent pings
//!   only while it has a call open, so it holds no connection idle, and a
//!   client that pings to hold an idle connection still counts against the
//!   cap. The agent sends no PINGs of its own.
//! - An agent may cut a connection ([`ConnectionState::cut`]): its next read
//!   fails, and the HTTP/2 connection, every stream on it and everything
//!   they buffer are dropped. The source agent cuts a `GetPages` client that
//!   stopped reading its replies: the only way to free what HTTP/2 buffers
//!   for a peer that does not read.
//!
//! The RPC layer ([`crate::rpc_limit`]) and the services find the
//! connection a request came on in [`OpenConnections`], by the peer address
//! of its [`TcpConnectInfo`].
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::limit_metrics::{self, ClosedBecause};
use crate::rate_limited::RateLimited;

/// After a failed accept (out of descriptors, most likely), before the next:
/// retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

static REFUSED_WARNING: RateLimited = RateLimited::new();
static ACCEPT_FAILED_WARNING: RateLimited = RateLimited::new();

/// The connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// The connections open on a listener, by their peer's address.
#[derive(Debug, Default)]
pub struct OpenConnections {
    by_peer: Mutex<HashMap<SocketAddr, Arc<ConnectionState>>>,
}

impl OpenConnections {
    /// The connection a request came on, by the [`TcpConnectInfo`] tonic
    /// puts in its extensions.
    pub fn of(&self, extensions: &http::Extensions) -> Option<Arc<ConnectionState>> {
        // Over TLS the connection's information is wrapped (tls_incoming).
        let peer = match extensions.get::<TcpConnectInfo>() {
            Some(info) => info.remote_addr()?,
            None => extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?.get_ref().remote_addr()?,
        };
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).get(&peer).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, state: Arc<ConnectionState>) {
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).insert(state.peer, state);
    }

    fn remove(&self, peer: SocketAddr) {
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).remove(&peer);
    }
}

/// What the agent knows of one open connection: shared by its
/// [`LimitedConnection`], the RPC layer and the services.
#[derive(Debug)]
pub struct ConnectionState {
    peer: SocketAddr,
    opened: Instant,
    rpcs: AtomicUsize,
    /// Milliseconds from `opened` to the last byte received or the end of
    /// the last RPC.
    last_active_ms: AtomicU64,
    cut: AtomicBool,
    /// The connection's reader, woken by a cut.
    reader: Mutex<Option<Waker>>,
}

impl ConnectionState {
    fn new(peer: SocketAddr) -> Self {
        Self {
            peer,
            opened: Instant::now(),
            rpcs: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            reader: Mutex::new(None),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// An RPC on this connection starts; it ends when the guard is dropped.
    pub fn rpc_started(self: &Arc<Self>) -> RpcUnderWay {
        self.rpcs.fetch_add(1, Ordering::AcqRel);
        RpcUnderWay(self.clone())
    }

    /// Cuts the connection: its next read fails, and hyper drops it with
    /// every stream on it. `why` is logged with the peer.
    pub fn cut(&self, why: &str) {
        if self.cut.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(peer = %self.peer, "cutting a gRPC connection: {why}");
        limit_metrics::connection_closed_because(ClosedBecause::Cut);
        if let Some(reader) = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take() {
            reader.wake();
        }
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn touch(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.fetch_max(now, Ordering::AcqRel);
    }

    /// How long the connection has been idle; `None` while an RPC is under
    /// way.
    fn idle_for(&self) -> Option<Duration> {
        if self.rpcs.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Acquire));
        Some(self.opened.elapsed().saturating_sub(last))
    }

    fn wake_me(&self, waker: &Waker) {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if !reader.as_ref().is_some_and(|r| r.will_wake(waker)) {
            *reader = Some(waker.clone());
        }
    }
}

/// An RPC under way on a connection (see [`ConnectionState::rpc_started`]).
#[derive(Debug)]
pub struct RpcUnderWay(Arc<ConnectionState>);

impl Drop for RpcUnderWay {
    fn drop(&mut self) {
        self.0.touch();
        self.0.rpcs.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accepted connection, holding its slot under the cap.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: TcpStream,
    state: Arc<ConnectionState>,
    open: Arc<OpenConnections>,
    idle_timeout: Duration,
    idle_check: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl LimitedConnection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        open: Arc<OpenConnections>,
        idle_timeout: Duration,
    ) -> Self {
        // Small replies (a page a vCPU waits for) go out at once.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "TCP_NODELAY not set");
        }
        let state = Arc::new(ConnectionState::new(peer));
        open.insert(state.clone());
        limit_metrics::connection_opened();
        let idle_check = Box::pin(tokio::time::sleep(idle_timeout));
        Self { stream, state, open, idle_timeout, idle_check, _slot: slot }
    }

    pub fn state(&self) -> &Arc<ConnectionState> {
        &self.state
    }

    /// Pending until the connection is found idle; then the error its
    /// reader gets.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.idle_check.as_mut().poll(cx));
            let wait = match self.state.idle_for() {
                Some(idle) if idle >= self.idle_timeout => {
                    tracing::debug!(peer = %self.state.peer, ?idle, "closing an idle gRPC connection");
                    limit_metrics::connection_closed_because(ClosedBecause::Idle);
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no RPC and nothing received for {idle:?}: closed"),
                    ));
                }
                Some(idle) => self.idle_timeout - idle,
                None => self.idle_timeout,
            };
            self.idle_check.as_mut().reset(tokio::time::Instant::now() + wait);
        }
    }
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        self.open.remove(self.state.peer);
        limit_metrics::connection_closed();
    }
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut by the agent")
}

impl AsyncRead for LimitedConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        this.state.wake_me(cx.waker());
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.state.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// The accept loop over a listener, as a stream of connections under the
/// limits. It never ends and never yields an error: a failed accept is
/// logged and retried after [`ACCEPT_BACKOFF`].
#[derive(Debug)]
pub struct LimitedIncoming {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    open: Arc<OpenConnections>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl LimitedIncoming {
    pub fn new(listener: TcpListener, limits: ConnectionLimits, open: Arc<OpenConnections>) -> Self {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        Self { listener, slots, limits, open, backoff: None }
    }

    fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        drop(stream);
        limit_metrics::connection_refused();
        if let Some(skipped) = REFUSED_WARNING.due() {
            tracing::warn!(
                %peer,
                refused_since_last_warning = skipped,
                max = self.limits.max_connections,
                "refusing a gRPC connection: --grpc-max-connections are open"
            );
        }
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedConnection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(backoff) = &mut this.backoff {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => match this.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let connection =
                            LimitedConnection::new(stream, peer, slot, this.open.clone(), this.limits.idle_timeout);
                        return Poll::Ready(Some(Ok(connection)));
                    }
                    Err(_) => this.refuse(stream, peer),
                },
                Err(error) => {
                    if let Some(skipped) = ACCEPT_FAILED_WARNING.due() {
                        tracing::warn!(%error, failed_since_last_warning = skipped, "gRPC listener: accept failed");
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}
