//! An agent's life in the shell, with real listeners on 127.0.0.1:0: health
//! and both reflection versions answer, `/metrics` answers, and the metrics
//! server outlives the gRPC server's shutdown, then stops.

use std::time::Duration;

use pageserver_agent_shell::{AgentShell, GrpcLimits, ServerLimits, grpc_router, serve_router};
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha;

const SERVICE: &str = "pageserver.v1.PageServer";

fn metrics_handle() -> pageserver_metrics::MetricsHandle {
    let recorder = pageserver_metrics::builder("shell-vm").expect("builder").build_recorder();
    metrics::with_local_recorder(&recorder, || metrics::gauge!("shell_test_up").set(1.0));
    pageserver_metrics::MetricsHandle::new(recorder.handle(), None)
}

async fn health(channel: &Channel, service: &str) -> i32 {
    let request = HealthCheckRequest { service: service.into() };
    HealthClient::new(channel.clone()).check(request).await.expect("Health/Check").into_inner().status
}

async fn services_v1(channel: &Channel) -> Vec<String> {
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel.clone());
    let mut replies = client.server_reflection_info(tokio_stream::iter([list])).await.expect("reflection").into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("not a service list: {other:?}"),
    }
}

async fn answers_v1alpha(channel: &Channel) -> bool {
    let list = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut replies = client.server_reflection_info(tokio_stream::iter([list])).await.expect("v1alpha").into_inner();
    replies.message().await.expect("reply").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_until_shutdown_and_stops_metrics_after_grpc() {
    let shell = AgentShell::bind("127.0.0.1:0", "127.0.0.1:0", &GrpcLimits::default()).await.expect("bind");
    let (grpc, metrics) = (shell.grpc_address(), shell.metrics_address());
    assert!(grpc.port() != 0 && metrics.port() != 0 && grpc != metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (grpc_done, grpc_done_seen) = tokio::sync::oneshot::channel::<String>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let running = tokio::spawn(shell.run_until(metrics_handle(), shutdown, move |listener, shutdown| async move {
        // Registered before serving: the first check below can never race
        // the agent's own health driver (which here never runs).
        let limits = ServerLimits::new(&GrpcLimits::default());
        let (router, _reporter) = grpc_router(Server::builder(), &limits, SERVICE, ServingStatus::NotServing).await?;
        let served = serve_router(router, listener, &limits, None, None, shutdown, std::future::pending()).await;
        // The gRPC server has finished: metrics must still answer.
        let scraped = pageserver_metrics::scrape(&metrics.to_string()).await.expect("metrics after gRPC");
        let _ = grpc_done.send(scraped);
        served
    }));

    let channel = Channel::from_shared(format!("http://{grpc}")).expect("uri").connect().await.expect("connect");
    let not_serving = health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health(&channel, SERVICE).await, not_serving);
    assert_eq!(health(&channel, "").await, not_serving);
    let services = services_v1(&channel).await;
    for service in ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", SERVICE] {
        assert!(services.iter().any(|s| s == service), "{service} is not listed: {services:?}");
    }
    assert!(answers_v1alpha(&channel).await);
    let text = pageserver_metrics::scrape(&metrics.to_string()).await.expect("scrape");
    assert!(text.contains("shell_test_up{vm=\"shell-vm\"} 1"), "{text}");
    drop(channel);

    stop.send(()).expect("the shell is running");
    let last =
        tokio::time::timeout(Duration::from_secs(10), grpc_done_seen).await.expect("gRPC stops").expect("scrape");
    assert!(last.contains("shell_test_up"), "{last}");
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the shell returns")
        .expect("task")
        .expect("ok");
    tokio::net::TcpStream::connect(metrics).await.expect_err("the metrics server is gone");
}
