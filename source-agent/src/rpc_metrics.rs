//! Per-RPC latency and refusal metrics as a tower layer around the gRPC
//! server ([`RpcMetricsLayer`], set with tonic's `Server::builder().layer`).
//!
//! Every call passes through it. Its path (`/pageserver.v1.PageServer/GetPage`,
//! `/pageserver.v1.MigrationSource/SetPaused`, …) says which [`Rpc`] it is;
//! calls to other services (health, reflection) or to unknown methods pass
//! through uncounted. For an RPC:
//!
//! - the time from the request to the response (its headers) is recorded
//!   into the RPC's histogram of [`RpcStats`]. For a unary call that is the
//!   handler's whole work; `GetDirtyBitmap` computes every chunk of its
//!   stream before it answers, so its time includes the scan;
//! - a response whose headers carry a non-OK `grpc-status` is counted as a
//!   rejection: tonic answers a call that fails before any message as a
//!   "trailers-only" response, its status in the headers. A call that
//!   succeeds has its status in the trailers, after the body.
//!
//! `GetPages` is one bidirectional stream for a whole migration: the layer
//! does not time it (the time to its response headers means nothing), but
//! counts it as rejected when it is refused as a whole. The service times,
//! and counts refusals of, each request inside it ([`crate::service`]).
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tonic::Code;
use tower::{Layer, Service};

use crate::metrics::{Rpc, RpcStats};

/// The header holding a trailers-only response's gRPC status.
const GRPC_STATUS: &str = "grpc-status";

/// The RPC a request path (`/SERVICE/METHOD`) calls, if it is one of ours.
pub fn rpc_of_path(path: &str) -> Option<Rpc> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Rpc::ALL.into_iter().find(|rpc| rpc.service() == service && rpc.name() == method)
}

/// Whether the layer times `rpc`'s calls (all but the `GetPages` stream).
fn timed_by_layer(rpc: Rpc) -> bool {
    rpc != Rpc::GetPages
}

/// Whether a response's headers say the call failed.
fn refused(headers: &http::HeaderMap) -> bool {
    headers.get(GRPC_STATUS).is_some_and(|status| Code::from_bytes(status.as_bytes()) != Code::Ok)
}

/// Wraps a service in [`RpcMetrics`], recording into `stats`.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    stats: Arc<RpcStats>,
}

impl RpcMetricsLayer {
    pub fn new(stats: Arc<RpcStats>) -> Self {
        Self { stats }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, stats: self.stats.clone() }
    }
}

/// The service [`RpcMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    stats: Arc<RpcStats>,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcMetrics<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let call = rpc_of_path(request.uri().path()).map(|rpc| Call {
            rpc,
            started: Instant::now(),
            stats: self.stats.clone(),
        });
        RecordedCall { inner: self.inner.call(request), call }
    }
}

/// One call of an [`Rpc`] on its way.
#[derive(Debug)]
struct Call {
    rpc: Rpc,
    started: Instant,
    stats: Arc<RpcStats>,
}

impl Call {
    /// Records the call once its response (or the inner service's error) is
    /// in.
    fn finish<B, E>(self, result: &Result<http::Response<B>, E>) {
        if timed_by_layer(self.rpc) {
            self.stats.observe(self.rpc, self.started.elapsed());
        }
        let rejected = match result {
            Ok(response) => refused(response.headers()),
            Err(_) => true,
        };
        if rejected {
            self.stats.reject(self.rpc);
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcMetrics`]: the inner one, recorded when it
    /// completes.
    #[derive(Debug)]
    pub struct RecordedCall<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for RecordedCall<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(call) = this.call.take() {
            call.finish(&result);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    /// Answers every call after 2 ms, with the gRPC status named by the
    /// request's `x-status` header in a trailers-only response, or as a
    /// success (no status in the headers) without one.
    async fn dummy(request: http::Request<()>) -> Result<http::Response<()>, Infallible> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut response = http::Response::new(());
        if let Some(status) = request.headers().get("x-status") {
            response.headers_mut().insert(GRPC_STATUS, status.clone());
        }
        Ok(response)
    }

    async fn call(stats: &Arc<RpcStats>, path: &str, status: Option<Code>) {
        let service = RpcMetricsLayer::new(stats.clone()).layer(tower::service_fn(dummy));
        let mut request = http::Request::builder().uri(path);
        if let Some(code) = status {
            request = request.header("x-status", (code as i32).to_string());
        }
        service.oneshot(request.body(()).expect("request")).await.expect("infallible");
    }

    fn counts(stats: &RpcStats) -> Vec<(Rpc, u64, u64)> {
        Rpc::ALL.into_iter().map(|rpc| (rpc, stats.latency(rpc).count(), stats.rejected(rpc))).collect()
    }

    #[test]
    fn paths_map_to_rpcs() {
        for rpc in Rpc::ALL {
            assert_eq!(rpc_of_path(&format!("/{}/{}", rpc.service(), rpc.name())), Some(rpc));
        }
        assert_eq!(rpc_of_path("/pageserver.v1.PageServer/GetPage"), Some(Rpc::GetPage));
        assert_eq!(rpc_of_path("/pageserver.v1.MigrationSource/SetPaused"), Some(Rpc::SetPaused));
        for other in [
            "/pageserver.v1.MigrationSource/GetPage",
            "/pageserver.v1.PageServer/SetPaused",
            "/pageserver.v1.PageServer/Nothing",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/pageserver.v1.PageServer/GetPage/more",
            "pageserver.v1.PageServer/GetPage",
            "/",
            "",
        ] {
            assert_eq!(rpc_of_path(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn unary_calls_are_timed_and_errors_counted() {
        let stats = Arc::new(RpcStats::default());
        call(&stats, "/pageserver.v1.PageServer/GetPage", None).await;
        call(&stats, "/pageserver.v1.PageServer/GetPage", Some(Code::Ok)).await;
        call(&stats, "/pageserver.v1.PageServer/GetPage", Some(Code::OutOfRange)).await;
        call(&stats, "/pageserver.v1.MigrationSource/SetPaused", Some(Code::Unavailable)).await;
        call(&stats, "/pageserver.v1.PageServer/GetDirtyBitmap", None).await;
        assert_eq!(
            counts(&stats),
            [
                (Rpc::GetLayout, 0, 0),
                (Rpc::GetPage, 3, 1),
                (Rpc::GetPages, 0, 0),
                (Rpc::GetDirtyBitmap, 1, 0),
                (Rpc::SetPaused, 1, 1),
            ]
        );
        // Request to response: at least the dummy's 2 ms, in the right bucket.
        let snapshot = stats.latency(Rpc::GetPage).snapshot();
        assert!(snapshot.sum_ns() >= 3 * 2_000_000, "{snapshot:?}");
        assert!(snapshot.max_ns() < 1_000_000_000, "{snapshot:?}");
    }

    #[tokio::test]
    async fn the_get_pages_stream_is_counted_when_refused_but_never_timed() {
        let stats = Arc::new(RpcStats::default());
        call(&stats, "/pageserver.v1.PageServer/GetPages", None).await;
        call(&stats, "/pageserver.v1.PageServer/GetPages", Some(Code::Unavailable)).await;
        assert_eq!(stats.latency(Rpc::GetPages).count(), 0);
        assert_eq!(stats.rejected(Rpc::GetPages), 1);
    }

    #[tokio::test]
    async fn health_reflection_and_unknown_methods_are_not_counted() {
        let stats = Arc::new(RpcStats::default());
        call(&stats, "/grpc.health.v1.Health/Check", None).await;
        call(&stats, "/grpc.health.v1.Health/Check", Some(Code::NotFound)).await;
        call(&stats, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None).await;
        call(&stats, "/pageserver.v1.PageServer/Unknown", Some(Code::Unimplemented)).await;
        assert!(counts(&stats).iter().all(|&(_, timed, rejected)| timed == 0 && rejected == 0), "{:?}", counts(&stats));
    }
}
