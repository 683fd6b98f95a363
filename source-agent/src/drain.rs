//! Stopping a source agent within a bounded time, while targets hold
//! `GetPages` streams open (a target keeps its stream for the whole
//! migration, so a graceful shutdown that waits for every stream to end
//! waits as long as the target wants).
//!
//! On SIGTERM or SIGINT ([`serve_draining`]):
//!
//! 1. the server stops accepting: the listener closes and every connection
//!    is told (HTTP/2 GOAWAY) to open no new stream; a target that needs a
//!    new one reconnects elsewhere or waits for this agent's successor;
//! 2. for up to the grace (`--shutdown-grace`) the calls and streams under
//!    way go on being served: a target in post-copy may still get the
//!    pages its guest waits for;
//! 3. then every `GetPages` stream still open is cut: it ends with
//!    UNAVAILABLE ("the source agent is shutting down ..."), each one
//!    logged with the requests it answered, the total too; requests not yet
//!    read are never answered (a target sends them again, once, on its next
//!    stream);
//! 4. the server gets [`CUT_FLUSH`] to deliver those statuses and close its
//!    connections; whatever is still open then (a peer that does not read)
//!    is closed with the process.
//!
//! The agent then exits 0: it was told to stop, and it did.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

/// How long the server gets, after the streams were cut, to deliver their
/// last status and close its connections.
pub const CUT_FLUSH: Duration = Duration::from_secs(1);

/// `--shutdown-grace`'s default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The agent's side of a drain: whether the streams are to be cut, and how
/// many are open.
#[derive(Debug)]
pub struct Drain {
    cut: watch::Sender<bool>,
    open_streams: AtomicU64,
}

impl Default for Drain {
    fn default() -> Self {
        Self { cut: watch::Sender::new(false), open_streams: AtomicU64::new(0) }
    }
}

/// One open `GetPages` stream, counted until dropped.
#[derive(Debug)]
pub struct OpenStream<'a>(&'a Drain);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drain {
    /// Counts a stream as open for as long as the guard lives.
    pub fn stream_opened(&self) -> OpenStream<'_> {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self)
    }

    /// `GetPages` streams open now.
    pub fn open_streams(&self) -> u64 {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Completes once the streams are to be cut (never, if they never are).
    pub fn cut_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut cut = self.cut.subscribe();
        async move {
            if cut.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Cuts every open stream; returns how many were open.
    pub fn cut(&self) -> u64 {
        let open = self.open_streams();
        self.cut.send_replace(true);
        open
    }
}

/// Runs `server` (built to stop accepting when `shutdown` completes) with a
/// bounded drain (see the module docs): returns the server's result, or
/// `Ok` once the drain's time is up.
pub async fn serve_draining<S, R>(
    serve: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> S,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    drain: &Drain,
) -> Result<(), R>
where
    S: Future<Output = Result<(), R>>,
{
    let (started_tx, started) = oneshot::channel::<()>();
    let server = serve(Box::pin(async move {
        shutdown.await;
        let _ = started_tx.send(());
    }));
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        Ok(()) = started => {}
    }
    tracing::info!(
        open_streams = drain.open_streams(),
        "shutting down: no new connections or streams; those under way have {grace:?} (--shutdown-grace) to finish"
    );
    if let Ok(result) = tokio::time::timeout(grace, &mut server).await {
        return result;
    }
    let cut = drain.cut();
    tracing::warn!(streams = cut, "the shutdown grace is over: cut the GetPages streams still open");
    match tokio::time::timeout(CUT_FLUSH, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("connections still open {CUT_FLUSH:?} after the cut: they close with the process");
            Ok(())
        }
    }
}
