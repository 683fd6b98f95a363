//! The gRPC services every agent serves besides its own: `grpc.health.v1`
//! and server reflection, both v1 and v1alpha (so that every grpcurl
//! version can list and describe the services) over the whole
//! `pageserver.v1` protocol and health's own descriptors; and serving the
//! router on a listener until a graceful shutdown.
#![forbid(unsafe_code)]

use std::future::Future;

use bytes::Bytes;
use pageserver_proto::FILE_DESCRIPTOR_SET;
use pageserver_tls::ServerTls;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::{Layer, Service};

use crate::error::ServeError;
use crate::tls_incoming::secured;

/// A router on `server` (with whatever settings and layers it already has)
/// carrying health and both reflection versions; the agent adds its own
/// services and drives health through the returned reporter. Health
/// already answers `initial` for `service` and for the server as a whole
/// before the router exists, so no probe ever sees "service not
/// registered" in the moment between listening and the agent's first
/// status.
pub async fn grpc_router<L: Clone>(
    mut server: Server<L>,
    service: &str,
    initial: ServingStatus,
) -> Result<(Router<L>, HealthReporter), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, service, initial).await;
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

/// Serves `router` on `listener` until `shutdown` completes and the calls
/// under way have finished: over mutual TLS with `tls`
/// ([`crate::tls_incoming`]), else in the clear. `health` (the agent's
/// driver of its health reporter) runs alongside, for as long as the server
/// does.
pub async fn serve_router<L, ResponseBody>(
    router: Router<L>,
    listener: TcpListener,
    tls: Option<ServerTls>,
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
    let health = tokio::spawn(health);
    let incoming = TcpListenerStream::new(listener);
    let served = match tls {
        Some(tls) => router.serve_with_incoming_shutdown(secured(incoming, tls), shutdown).await,
        None => router.serve_with_incoming_shutdown(incoming, shutdown).await,
    };
    health.abort();
    served.map_err(ServeError::Transport)
}
