//! `--health-listen`: a second gRPC port, in the clear, that serves
//! `grpc.health.v1.Health` and nothing else, for probes that cannot present
//! a client certificate (the kubelet's gRPC probes) while the main port
//! requires one. It answers exactly what the main port's health answers
//! (the same reporter), plus the service `liveness`, always `SERVING` while
//! the process serves: a liveness probe must not restart an agent that is
//! only waiting for its VMM (the source) or reports a failed migration that
//! a restart would take over (the target). It carries no guest memory and
//! no control, so it needs neither TLS nor the control check; its
//! connections are few and bounded.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;

use crate::connections::{ConnectionLimits, LimitedIncoming, OpenConnections};
use crate::error::ServeError;

/// The service name a liveness probe asks for.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Probes open a connection or two at a time: a small cap keeps a flood of
/// the port from costing descriptors.
const MAX_CONNECTIONS: usize = 16;
/// A probe's connection is reused every period (10 s by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds `listen` and serves `health` on it until the task is aborted.
pub(crate) async fn start(listen: &str, health: HealthServer<HealthService>) -> Result<JoinHandle<()>, ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::HealthPort { address: listen.to_owned(), source })?;
    let bound = listener.local_addr().map_or_else(|_| listen.to_owned(), |address| address.to_string());
    tracing::info!(address = %bound, "gRPC health only, in the clear, for probes (--health-listen)");
    let limits = ConnectionLimits { max_connections: MAX_CONNECTIONS, idle_timeout: IDLE_TIMEOUT };
    let incoming = LimitedIncoming::new(listener, limits, Arc::new(OpenConnections::default()));
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await;
        if let Err(error) = served {
            tracing::error!(error = &error as &dyn std::error::Error, "the health port stopped");
        }
    }))
}
