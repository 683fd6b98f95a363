//! The gRPC services every agent serves besides its own: `grpc.health.v1`
//! and server reflection, both v1 and v1alpha (so that every grpcurl
//! version can list and describe the services) over the whole
//! `pageserver.v1` protocol and health's own descriptors; and serving the
//! router on a listener until a graceful shutdown.
//!
//! This is the one place that puts a server's limits ([`ServerLimits`],
//! from `--grpc-*`, see [`crate::limits`]) together: [`grpc_router`] sets the
//! HTTP/2 and per-call ones and the RPC limit layer ([`crate::rpc_limit`]);
//! [`serve_router`] serves the connections of the accept loop under the
//! connection cap and idle timeout ([`crate::connections`]).
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use pageserver_proto::FILE_DESCRIPTOR_SET;
use pageserver_tls::ServerTls;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::layer::util::Stack;
use tower::{Layer, Service};

use crate::connections::{ConnectionLimits, LimitedIncoming, OpenConnections};
use crate::error::ServeError;
use crate::health_port::LIVENESS_SERVICE;
use crate::limits::GrpcLimits;
use crate::rpc_limit::RpcLimitLayer;
use crate::tls_incoming::secured;

/// One gRPC server's limits, and the connections it has open (shared by
/// the accept loop, the RPC limit layer and the services that look up the
/// connection of a request).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    limits: GrpcLimits,
    open: Arc<OpenConnections>,
    /// The health service [`grpc_router`] made, for `--health-listen`
    /// ([`crate::health_port`]), which [`serve_router`] starts.
    health: Arc<OnceLock<HealthServer<HealthService>>>,
}

impl ServerLimits {
    pub fn new(limits: &GrpcLimits) -> Self {
        Self { limits: limits.clone(), open: Arc::new(OpenConnections::default()), health: Arc::default() }
    }

    pub fn limits(&self) -> &GrpcLimits {
        &self.limits
    }

    /// The connections open on the server.
    pub fn open_connections(&self) -> &Arc<OpenConnections> {
        &self.open
    }
}

/// A router on `server` (with whatever settings and layers it already has,
/// and the `limits`' HTTP/2 settings, per-call timeout and RPC limit layer)
/// carrying health and both reflection versions; the agent adds its own
/// services and drives health through the returned reporter. Health
/// already answers `initial` for `service` and for the server as a whole
/// before the router exists, so no probe ever sees "service not
/// registered" in the moment between listening and the agent's first
/// status.
pub async fn grpc_router<L: Clone>(
    server: Server<L>,
    limits: &ServerLimits,
    service: &str,
    initial: ServingStatus,
) -> Result<(Router<Stack<RpcLimitLayer, L>>, HealthReporter), ServeError> {
    let grpc = &limits.limits;
    // No HTTP/2 keepalive pings of our own (the idle timeout counts what is
    // received: see `connections`), no per-connection queue (tonic's
    // `concurrency_limit_per_connection`: max_concurrent_streams bounds a
    // connection, and the RPC limit refuses rather than queues).
    let mut server = server
        .max_concurrent_streams(grpc.grpc_max_streams_per_connection)
        .timeout(grpc.grpc_unary_timeout)
        .layer(RpcLimitLayer::new(grpc.grpc_max_rpcs, limits.open.clone()));
    // One reporter, and a service of it for each port that serves health
    // (this one, and `--health-listen`'s).
    let reporter = HealthReporter::new();
    let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    set_health(&reporter, service, initial).await;
    reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
    let _ = limits.health.set(health.clone());
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let v1alpha = reflection().build_v1alpha().map_err(ServeError::Reflection)?;
    let router = server.add_service(health).add_service(v1).add_service(v1alpha);
    Ok((router, reporter))
}

/// Sets `status` for the server as a whole (`""`) and for `service` (its
/// full name, e.g. `pageserver.v1.PageServer`): an agent is as healthy as
/// its one service.
pub async fn set_health(reporter: &HealthReporter, service: &str, status: ServingStatus) {
    for name in ["", service] {
        reporter.set_service_status(name, status).await;
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `router` on `listener`, under the connection limits of
/// `limits`, until `shutdown` completes and the calls under way have
/// finished: over mutual TLS with `tls` ([`crate::tls_incoming`]), else in
/// the clear. `health` (the agent's driver of its health reporter) runs
/// alongside, for as long as the server does, and so does the health port
/// on `health_listen` ([`crate::health_port`]), if given.
pub async fn serve_router<L, ResponseBody>(
    router: Router<L>,
    listener: TcpListener,
    limits: &ServerLimits,
    tls: Option<ServerTls>,
    health_listen: Option<&str>,
    shutdown: impl Future<Output = ()>,
    health: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    L: Layer<Routes>,
    L::Service: Service<http::Request<Body>, Response = http::Response<ResponseBody>> + Clone + Send + 'static,
    <L::Service as Service<http::Request<Body>>>::Future: Send,
    <L::Service as Service<http::Request<Body>>>::Error: Into<BoxError> + Send,
    ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResponseBody::Error: Into<BoxError>,
{
    let health_port = match (health_listen, limits.health.get()) {
        (Some(listen), Some(service)) => Some(crate::health_port::start(listen, service.clone()).await?),
        _ => None,
    };
    let health = tokio::spawn(health);
    let connection_limits = ConnectionLimits {
        max_connections: limits.limits.grpc_max_connections,
        idle_timeout: limits.limits.grpc_idle_timeout,
    };
    let incoming = LimitedIncoming::new(listener, connection_limits, limits.open.clone());
    let served = match tls {
        Some(tls) => router.serve_with_incoming_shutdown(secured(incoming, tls), shutdown).await,
        None => router.serve_with_incoming_shutdown(incoming, shutdown).await,
    };
    health.abort();
    if let Some(port) = health_port {
        port.abort();
    }
    served.map_err(ServeError::Transport)
}
