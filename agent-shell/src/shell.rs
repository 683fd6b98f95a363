//! [`AgentShell`]: an agent binary's two listeners and its life from
//! "listening" to a graceful shutdown.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use pageserver_metrics::MetricsHandle;
use tokio::net::TcpListener;

use crate::error::{ServeError, ShellError};
use crate::fd_limit::raise_fd_limit;
use crate::limits::GrpcLimits;
use crate::listening::{ListeningEvent, announce_listening};
use crate::metrics_server::MetricsServer;
use crate::shutdown::shutdown_signal;

/// The future a gRPC server is given to know when to stop taking calls.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An agent's gRPC and metrics listeners, bound.
#[derive(Debug)]
pub struct AgentShell {
    grpc: TcpListener,
    metrics: TcpListener,
    grpc_address: SocketAddr,
    metrics_address: SocketAddr,
    metrics_max_connections: usize,
}

async fn bind(what: &'static str, address: &str) -> Result<(TcpListener, SocketAddr), ShellError> {
    let listener = TcpListener::bind(address).await.map_err(|source| ShellError::Bind {
        what,
        address: address.to_owned(),
        source,
    })?;
    let bound = listener.local_addr().map_err(|source| ShellError::LocalAddress { what, source })?;
    Ok((listener, bound))
}

impl AgentShell {
    /// Binds the gRPC and the metrics listener (`HOST:PORT`; port 0 picks a
    /// free port, reported by the listening event), after raising the
    /// descriptor limit ([`raise_fd_limit`]); the metrics server will take
    /// `limits.metrics_max_connections` at once.
    pub async fn bind(grpc: &str, metrics: &str, limits: &GrpcLimits) -> Result<Self, ShellError> {
        let fd_limit = raise_fd_limit();
        let large_buffers_returned = crate::sys::return_large_buffers_to_the_kernel();
        tracing::info!(
            fd_limit,
            large_buffers_returned,
            max_connections = limits.grpc_max_connections,
            max_rpcs = limits.grpc_max_rpcs,
            max_streams_per_connection = limits.grpc_max_streams_per_connection,
            idle_timeout = ?limits.grpc_idle_timeout,
            unary_timeout = ?limits.grpc_unary_timeout,
            metrics_max_connections = limits.metrics_max_connections,
            "limits"
        );
        let (grpc, grpc_address) = bind("gRPC", grpc).await?;
        let (metrics, metrics_address) = bind("metrics", metrics).await?;
        Ok(Self {
            grpc,
            metrics,
            grpc_address,
            metrics_address,
            metrics_max_connections: limits.metrics_max_connections,
        })
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_address
    }

    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_address
    }

    /// [`AgentShell::run_until`] SIGTERM or SIGINT.
    pub async fn run<F, Served>(self, metrics: MetricsHandle, serve: F) -> Result<(), ShellError>
    where
        F: FnOnce(TcpListener, Shutdown) -> Served,
        Served: Future<Output = Result<(), ServeError>>,
    {
        self.run_until(metrics, shutdown_signal(), serve).await
    }

    /// Prints the listening event, serves `metrics`, and runs `serve` (the
    /// agent's gRPC server on the gRPC listener) until `shutdown` completes
    /// and the server has finished its calls; then stops the metrics server
    /// and returns the gRPC server's result.
    pub async fn run_until<F, Served>(
        self,
        metrics: MetricsHandle,
        shutdown: impl Future<Output = ()> + Send + 'static,
        serve: F,
    ) -> Result<(), ShellError>
    where
        F: FnOnce(TcpListener, Shutdown) -> Served,
        Served: Future<Output = Result<(), ServeError>>,
    {
        let event = ListeningEvent::new(self.grpc_address, self.metrics_address);
        announce_listening(&mut std::io::stdout().lock(), &event).map_err(ShellError::Announce)?;
        tracing::info!(grpc = %self.grpc_address, metrics = %self.metrics_address, "gRPC and metrics listening");
        let metrics_server = MetricsServer::start(self.metrics, metrics, self.metrics_max_connections);
        let served = serve(self.grpc, Box::pin(shutdown)).await;
        metrics_server.stop().await;
        served.map_err(ShellError::Serve)?;
        tracing::info!("stopped");
        Ok(())
    }
}
