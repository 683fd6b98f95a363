//! The gRPC server of a source agent: the PageServer and MigrationSource
//! services, with the shell's health and reflection (v1 and v1alpha), and
//! the per-RPC metrics layer ([`crate::rpc_metrics`]) around them all,
//! under the shell's limits (`--grpc-*`) and the `GetPages` streams' own
//! ([`crate::pages_in_flight`]).
//!
//! Health: `pageserver.v1.PageServer` and the server as a whole (`""`) are
//! NOT_SERVING until the agent has memory to serve, then SERVING.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pageserver_agent_shell::{
    GrpcLimits, GrpcSecurity, ServeError, ServerLimits, grpc_router, serve_router, set_health,
};
use pageserver_proto::MAX_MESSAGE_BYTES;
use pageserver_proto::v1::migration_source_server::MigrationSourceServer;
use pageserver_proto::v1::page_server_server::{self, PageServerServer};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::agent::SourceAgent;
use crate::control::ControlService;
use crate::drain::serve_draining;
use crate::pages_in_flight::{PagesInFlight, PagesInFlightLimits};
use crate::rpc_metrics::RpcMetricsLayer;
use crate::service::PageService;

/// HTTP/2 flow-control windows of what the agent receives: requests, a
/// few dozen bytes each. These are what a client may make the agent buffer
/// (per stream, per connection) while it does not read its requests (a
/// `GetPages` stream waiting for its client to take replies): small, and
/// still room for thousands of requests. (The windows of the pages sent are
/// the client's.)
const STREAM_WINDOW_BYTES: u32 = 256 << 10;
const CONNECTION_WINDOW_BYTES: u32 = 1 << 20;

/// The limits a source agent serves under.
#[derive(Debug, Clone, Default)]
pub struct SourceLimits {
    pub grpc: GrpcLimits,
    pub pages_in_flight: PagesInFlightLimits,
}

/// Serves `agent` on `listener` under `limits` with `security` until
/// `shutdown` completes, then lets the calls and streams under way finish
/// for up to `grace` before it cuts them ([`crate::drain`]).
pub async fn serve_with_grace(
    listener: TcpListener,
    agent: Arc<SourceAgent>,
    limits: &SourceLimits,
    security: GrpcSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), ServeError> {
    let serving = agent.clone();
    serve_draining(
        |shutdown| serve_secured(listener, serving, limits, security, shutdown),
        shutdown,
        grace,
        &agent.drain,
    )
    .await
}

/// [`serve_secured`] in the clear, control RPCs from loopback peers: an
/// in-process server on 127.0.0.1.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<SourceAgent>,
    limits: &SourceLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_secured(listener, agent, limits, GrpcSecurity::loopback_plaintext(), shutdown).await
}

/// Serves `agent` on `listener` under `limits` with `security` (TLS or
/// not, and who may call SetPaused) until `shutdown` completes, then
/// finishes the calls under way, however long they take.
pub async fn serve_secured(
    listener: TcpListener,
    agent: Arc<SourceAgent>,
    limits: &SourceLimits,
    security: GrpcSecurity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server_limits = ServerLimits::new(&limits.grpc);
    let server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .layer(RpcMetricsLayer::new(agent.rpcs.clone()));
    let (router, health) =
        grpc_router(server, &server_limits, page_server_server::SERVICE_NAME, ServingStatus::NotServing).await?;
    let mut attached = agent.subscribe_attached();
    let serving_once_attached = async move {
        if attached.wait_for(|attached| *attached).await.is_ok() {
            set_health(&health, page_server_server::SERVICE_NAME, ServingStatus::Serving).await;
        }
    };
    let control = MigrationSourceServer::new(ControlService::new(agent.clone(), security.control));
    let page_server = PageServerServer::new(PageService::new(agent, PagesInFlight::new(&limits.pages_in_flight)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = router.add_service(page_server).add_service(control);
    let health_listen = security.health_listen.as_deref();
    serve_router(router, listener, &server_limits, security.tls, health_listen, shutdown, serving_once_attached).await
}
