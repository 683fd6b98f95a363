//! The `source-agent` binary as a real process: CLI, the "listening" line,
//! reflection, graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pageserver_proto::v1::GetLayoutRequest;
use pageserver_proto::v1::page_server_client::PageServerClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as ServerReflectionClientV1Alpha;

const BINARY: &str = env!("CARGO_BIN_EXE_source-agent");

#[tokio::test]
async fn serves_a_memory_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("guest.mem");
    std::fs::write(&file, vec![7u8; 8 * 4096]).expect("write");
    let mut child = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--vm", "cli-vm"])
        .env("PAGESERVER_METRICS_LISTEN", "127.0.0.1:0")
        .env("PAGESERVER_MEMORY_FILE", &file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn source-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read the listening line");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["event"], "listening", "{line}");
    let address = event["grpc"].as_str().expect("grpc address").to_owned();
    assert!(address.starts_with("127.0.0.1:") && !address.ends_with(":0"), "{line}");
    assert!(line.starts_with(r#"{"event":"listening","grpc":"127.0.0.1:"#), "{line}");
    let metrics_address = event["metrics"].as_str().expect("metrics address").to_owned();
    assert!(metrics_address.starts_with("127.0.0.1:") && !metrics_address.ends_with(":0"), "{line}");

    let uri = format!("http://{address}");
    let mut client = PageServerClient::connect(uri.clone()).await.expect("connect");
    let layout = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner();
    assert_eq!((layout.vm.as_str(), layout.total_pages, layout.memory_source.as_str()), ("cli-vm", 8, "file"));

    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let channel = tonic::transport::Channel::from_shared(uri).expect("uri").connect().await.expect("connect");
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut replies =
        reflection.server_reflection_info(tokio_stream::iter([list])).await.expect("reflection").into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(services)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<_> = services.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"pageserver.v1.PageServer") && names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let list = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut reflection = ServerReflectionClientV1Alpha::new(channel);
    let mut replies =
        reflection.server_reflection_info(tokio_stream::iter([list])).await.expect("v1alpha").into_inner();
    assert!(replies.message().await.expect("reply").is_some());

    // Prometheus metrics on their own port, every series labelled with the VM.
    let metrics = pageserver_metrics::scrape(&metrics_address).await.expect("scrape /metrics");
    assert!(metrics.contains("agent=\"source\""), "{metrics}");
    assert!(
        metrics.contains("pageserver_source_paused{vm=\"cli-vm\"} 1\n"),
        "a memory file counts as paused: {metrics}"
    );
    assert!(
        metrics.contains("pageserver_source_request_duration_seconds_count{vm=\"cli-vm\",rpc=\"GetLayout\"} 1\n"),
        "{metrics}"
    );
    for line in metrics.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.contains("vm=\"cli-vm\""), "{line}");
    }

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn exactly_one_memory_source_is_required() {
    let neither = Command::new(BINARY).env_clear().output().expect("run");
    assert_eq!(neither.status.code(), Some(2));
    let both = Command::new(BINARY)
        .env_clear()
        .args(["--memory-file", "/nonexistent", "--handoff-socket", "/tmp/x.sock"])
        .output()
        .expect("run");
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    let missing =
        Command::new(BINARY).env_clear().args(["--memory-file", "/nonexistent/guest.mem"]).output().expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/guest.mem"));
}
