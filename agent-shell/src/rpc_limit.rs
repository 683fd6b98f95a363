//! The RPC-level limit of a gRPC server: at most `--grpc-max-rpcs` RPCs
//! under way across all connections, one more refused at once with
//! `RESOURCE_EXHAUSTED` ([`RpcLimitLayer`], set with tonic's
//! `Server::builder().layer`).
//!
//! Why not tower's `ConcurrencyLimit` with `LoadShed` (tonic's
//! `concurrency_limit_per_connection` and `load_shed`): its permit goes back
//! when the response future resolves, i.e. when a streaming RPC has sent
//! its headers, so a thousand open `GetPages` streams would count as none.
//! Here the permit is held by the response body and goes back when the body
//! is dropped: after its last message, or when the stream is reset or its
//! connection closed. And a permit is taken or the call refused, never
//! waited for: a queue of calls would hold their memory and make the
//! target's calls wait behind a flood.
//!
//! The layer also tells the connection ([`crate::connections`]) that an RPC
//! is under way on it for as long (its idle time does not run), and puts the
//! connection's [`ConnectionHandle`] in the request's extensions, where a
//! service finds it (`request.extensions()`) to cut a connection that
//! misbehaves.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::connections::{ConnectionState, OpenConnections, RpcUnderWay};
use crate::limit_metrics::{self, ShedBecause};
use crate::rate_limited::RateLimited;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

static SHED_WARNING: RateLimited = RateLimited::new();

/// The connection a request came on, in its extensions (absent when the
/// server is not fed by [`crate::connections::LimitedIncoming`]).
#[derive(Debug, Clone)]
pub struct ConnectionHandle(pub Arc<ConnectionState>);

/// Wraps a service in [`RpcLimit`].
#[derive(Debug, Clone)]
pub struct RpcLimitLayer {
    permits: Arc<Semaphore>,
    max_rpcs: usize,
    open: Arc<OpenConnections>,
}

impl RpcLimitLayer {
    pub fn new(max_rpcs: usize, open: Arc<OpenConnections>) -> Self {
        Self { permits: Arc::new(Semaphore::new(max_rpcs)), max_rpcs, open }
    }
}

impl<S> Layer<S> for RpcLimitLayer {
    type Service = RpcLimit<S>;

    fn layer(&self, inner: S) -> RpcLimit<S> {
        RpcLimit { inner, limit: self.clone() }
    }
}

/// The service [`RpcLimitLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcLimit<S> {
    inner: S,
    limit: RpcLimitLayer,
}

/// What an RPC holds until its response body is gone.
#[derive(Debug)]
struct Held {
    _permit: OwnedSemaphorePermit,
    _on_connection: Option<RpcUnderWay>,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, on_connection: Option<RpcUnderWay>) -> Self {
        limit_metrics::rpc_started();
        Self { _permit: permit, _on_connection: on_connection }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        limit_metrics::rpc_ended();
    }
}

/// The answer to an RPC over the limit.
fn shed(path: &str, max_rpcs: usize) -> http::Response<tonic::body::Body> {
    limit_metrics::rpc_shed(ShedBecause::MaxRpcs);
    if let Some(skipped) = SHED_WARNING.due() {
        tracing::warn!(
            path,
            max_rpcs,
            shed_since_last_warning = skipped,
            "refusing an RPC: --grpc-max-rpcs are under way"
        );
    }
    tonic::Status::resource_exhausted(format!(
        "this agent has {max_rpcs} RPCs under way, its limit (--grpc-max-rpcs): try again later"
    ))
    .into_http()
}

type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcLimit<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Body<Data = Bytes> + Send + 'static,
    ResponseBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let Ok(permit) = self.limit.permits.clone().try_acquire_owned() else {
            let response = shed(request.uri().path(), self.limit.max_rpcs);
            return Box::pin(std::future::ready(Ok(response)));
        };
        let connection = self.limit.open.of(request.extensions());
        let held = Held::new(permit, connection.as_ref().map(ConnectionState::rpc_started));
        if let Some(connection) = connection {
            request.extensions_mut().insert(ConnectionHandle(connection));
        }
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| tonic::body::Body::new(HeldBody { inner: body, _held: held })))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its RPC's permit until it is dropped.
    #[derive(Debug)]
    struct HeldBody<B> {
        #[pin]
        inner: B,
        _held: Held,
    }
}

impl<B: Body> Body for HeldBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn request() -> http::Request<()> {
        http::Request::builder().uri("/pageserver.v1.PageServer/GetPages").body(()).expect("request")
    }

    fn status_of(response: &http::Response<tonic::body::Body>) -> Option<tonic::Code> {
        tonic::Status::from_header_map(response.headers()).map(|status| status.code())
    }

    #[tokio::test]
    async fn a_stream_holds_its_permit_until_its_body_is_gone_and_one_more_is_shed() {
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let end_rx = Arc::new(tokio::sync::Mutex::new(Some(end_rx)));
        let service = tower::service_fn(move |_request: http::Request<()>| {
            let end_rx = end_rx.clone();
            async move {
                let end = end_rx.lock().await.take();
                let body = http_body_util::StreamBody::new(tokio_stream::once(Ok::<_, Infallible>(Frame::data(
                    Bytes::from_static(b"x"),
                ))));
                // The body's end waits for `end` (if this is the first call).
                let body = body.with_trailers(async move {
                    if let Some(end) = end {
                        let _ = end.await;
                    }
                    None
                });
                Ok::<_, Infallible>(http::Response::new(body))
            }
        });
        let layer = RpcLimitLayer::new(1, Arc::new(OpenConnections::default()));
        let limited = layer.layer(service);

        // The first stream has answered (headers) but its body is not done.
        let first = limited.clone().oneshot(request()).await.expect("first");
        assert_eq!(status_of(&first), None);
        assert_eq!(layer.permits.available_permits(), 0);

        // One more is shed at once, with RESOURCE_EXHAUSTED.
        let second = limited.clone().oneshot(request()).await.expect("second");
        assert_eq!(status_of(&second), Some(tonic::Code::ResourceExhausted));

        // The first stream's body ends: its permit is back.
        let _ = end_tx.send(());
        let collected = first.into_body().collect().await.expect("body");
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"x"));
        assert_eq!(layer.permits.available_permits(), 1);
        let third = limited.oneshot(request()).await.expect("third");
        assert_eq!(status_of(&third), None);
        drop(third);
        assert_eq!(layer.permits.available_permits(), 1);
    }
}
