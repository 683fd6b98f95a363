//! The gRPC server of a source agent: the PageServer service, the standard
//! health service and server reflection (v1 and v1alpha, so that every
//! grpcurl version can list and describe the services).
//!
//! Health: `pageserver.v1.PageServer` and the server as a whole (`""`) are
//! NOT_SERVING until the agent has memory to serve, then SERVING.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;

use pageserver_proto::v1::migration_source_server::MigrationSourceServer;
use pageserver_proto::v1::page_server_server::PageServerServer;
use pageserver_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::agent::SourceAgent;
use crate::service::PageService;

/// The PageServer's full name, as the health service knows it.
pub const PAGE_SERVER_SERVICE: &str = "pageserver.v1.PageServer";

/// HTTP/2 flow-control windows: larger than the defaults for bulk transfers.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `agent` on `listener` until `shutdown` completes, then finishes the
/// calls under way.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<SourceAgent>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut attached = agent.subscribe_attached();
    for name in [PAGE_SERVER_SERVICE, ""] {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let health_updater = tokio::spawn(async move {
        if attached.wait_for(|attached| *attached).await.is_ok() {
            for name in [PAGE_SERVER_SERVICE, ""] {
                health.set_service_status(name, ServingStatus::Serving).await;
            }
        }
    });

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let control = MigrationSourceServer::new(crate::control::ControlService::new(agent.clone()));
    let page_server = PageServerServer::new(PageService::new(agent))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let result = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(page_server)
        .add_service(control)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_updater.abort();
    Ok(result?)
}
