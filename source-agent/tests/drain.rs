//! Stopping a `source-agent` process while a target holds a `GetPages`
//! stream open (as a target does for a whole migration): SIGTERM ends it
//! within its `--shutdown-grace` whatever the client does. The stream goes
//! on being served during the grace, no new connection is accepted, then
//! the stream is cut with UNAVAILABLE saying why, and the agent exits 0.
//! (Before the drain, the agent waited for the client for ever.)

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::PAGE_SIZE;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{PagesReply, PagesRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const BINARY: &str = env!("CARGO_BIN_EXE_source-agent");
/// A hang guard only: no test measures time with it.
const PATIENCE: Duration = Duration::from_secs(120);

struct Agent {
    child: Child,
    log: std::path::PathBuf,
    grpc: String,
}

impl Agent {
    fn start(dir: &Path, grace: &str) -> Self {
        let file = dir.join("guest.mem");
        std::fs::write(&file, vec![7u8; 16 * PAGE_SIZE as usize]).expect("write");
        let log = dir.join("agent.log");
        let mut child = Command::new(BINARY)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--shutdown-grace", grace])
            .arg("--memory-file")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn source-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the listening line");
        let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        Self { child, log, grpc: event["grpc"].as_str().expect("grpc").to_owned() }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.stderr().contains(needle) {
            assert!(Instant::now() < deadline, "never logged {needle:?}: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit; stderr:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(id: u64) -> PagesRequest {
    PagesRequest { request_id: id, region: 0, first_index: id, count: 1, require_paused: false }
}

/// A GetPages stream the test keeps open: its request sender and replies.
async fn open_stream(agent: &Agent) -> (mpsc::Sender<PagesRequest>, Streaming<PagesReply>) {
    let mut client = PageServerClient::connect(format!("http://{}", agent.grpc)).await.expect("connect");
    let (requests, outgoing) = mpsc::channel(4);
    requests.send(request(1)).await.expect("queue a request");
    let mut replies = client.get_pages(ReceiverStream::new(outgoing)).await.expect("GetPages").into_inner();
    let first = replies.message().await.expect("a reply").expect("one reply");
    assert_eq!((first.request_id, first.pages.len()), (1, 1));
    (requests, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_getpages_stream_held_open_cuts_it_after_the_grace_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(dir.path(), "1s");
    let (requests, mut replies) = open_stream(&agent).await;
    agent.terminate();
    agent.wait_for_log("shutting down: no new connections or streams").await;
    // No new connection is accepted during the grace.
    let refused = PageServerClient::connect(format!("http://{}", agent.grpc)).await;
    assert!(refused.is_err(), "a new connection was accepted after SIGTERM");

    // The client keeps its stream open; at the end of the grace it is cut.
    let next = tokio::time::timeout(PATIENCE, replies.message()).await.expect("the stream was never cut");
    let status = match next {
        Ok(Some(reply)) => panic!("no request is pending, yet a reply came: {reply:?}"),
        Ok(None) => panic!("the stream ended without saying why"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("the source agent is shutting down"), "{status}");
    assert!(status.message().contains("after 1 requests answered"), "{status}");
    let exit = agent.wait().await;
    assert_eq!(exit.code(), Some(0), "{}", agent.stderr());
    let stderr = agent.stderr();
    assert!(stderr.contains("the shutdown grace is over: cut the GetPages streams still open streams=1"), "{stderr}");
    drop(requests);
}

/// During the grace the stream is still served; a client that then ends
/// its stream lets the agent exit without waiting for the grace (ten
/// minutes here, far beyond the test's hang guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_grace_streams_are_served_and_a_finished_stream_lets_the_agent_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(dir.path(), "10m");
    let (requests, mut replies) = open_stream(&agent).await;
    agent.terminate();
    agent.wait_for_log("shutting down: no new connections or streams").await;
    requests.send(request(2)).await.expect("a request during the grace");
    let reply = tokio::time::timeout(PATIENCE, replies.message()).await.expect("a reply in time");
    let reply = reply.expect("a reply during the grace").expect("one reply");
    assert_eq!((reply.request_id, reply.error), (2, None));
    drop(requests);
    let end = tokio::time::timeout(PATIENCE, replies.message()).await.expect("the stream ends");
    assert!(end.expect("the stream ends cleanly").is_none());
    let exit = agent.wait().await;
    assert_eq!(exit.code(), Some(0), "{}", agent.stderr());
    assert!(!agent.stderr().contains("cutting a GetPages stream"), "nothing was cut: {}", agent.stderr());
}

/// A SIGTERM sent as soon as the agent says it is listening is handled (the
/// signals are watched before that line), not the signal's default action
/// killing it. Several agents, to give a regression its chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_listening_line_is_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    for attempt in 0..5 {
        let mut agent = Agent::start(dir.path(), "10s");
        agent.terminate();
        let exit = agent.wait().await;
        assert_eq!(exit.code(), Some(0), "attempt {attempt}: {exit:?}; stderr:\n{}", agent.stderr());
    }
}
