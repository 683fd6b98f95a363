//! The agent's `/metrics` server ([`pageserver_metrics::serve_metrics`]) as
//! a task that is started before the gRPC server and stopped after it has
//! finished its calls, so that a last scrape sees them.
#![forbid(unsafe_code)]

use pageserver_metrics::{MetricsHandle, serve_metrics};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running `/metrics` server.
#[derive(Debug)]
pub struct MetricsServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `handle` on `listener` from now on, at most `max_connections`
    /// at once, on the current runtime.
    pub fn start(listener: TcpListener, handle: MetricsHandle, max_connections: usize) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_metrics(listener, handle, max_connections, async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Stops accepting, lets answers in flight finish (within the server's
    /// grace period) and returns once the server is gone.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the metrics server task failed");
        }
    }
}
