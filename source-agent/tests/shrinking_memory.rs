//! Memory that shrinks under a serving `source-agent` process: a memory
//! file truncated to half, and a handed-off memfd the VMM truncates. Pages
//! past the new end are a DATA_LOSS error naming the memory, the offset and
//! the short length; pages before it are still served; the process lives on
//! (reading through a mapping, it died of SIGBUS, exit 135, nothing logged).

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{PAGE_SIZE, page_pattern};
use guest_memory::memfile;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, GetPageRequest, PagesRequest};
use tonic::Code;
use tonic::transport::Channel;

const BINARY: &str = env!("CARGO_BIN_EXE_source-agent");
const PAGES: u64 = 16;
const HALF: u64 = PAGES / 2;

/// A `source-agent` process, its client and its log file.
struct Agent {
    child: Child,
    client: PageServerClient<Channel>,
    log: std::path::PathBuf,
}

async fn start_agent(dir: &Path, memory_args: &[&str]) -> Agent {
    let log = dir.join("agent.log");
    let mut child = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--vm", "test-vm"])
        .args(memory_args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn source-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the listening line");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    let address = event["grpc"].as_str().expect("grpc address");
    let client = PageServerClient::connect(format!("http://{address}")).await.expect("connect");
    Agent { child, client, log }
}

impl Agent {
    /// Asks for pages past the new end (refused) and before it (served), then
    /// checks that the process is alive, says why in its log, and stops
    /// cleanly on SIGTERM.
    async fn check_shrunk(mut self, names_memory: &str) {
        let past = self.client.get_page(GetPageRequest { region: 0, index: HALF + 2 }).await;
        let status = past.expect_err("a page past the new end");
        if status.code() != Code::DataLoss {
            tokio::time::sleep(Duration::from_millis(200)).await;
            panic!("{status}; the agent process: {:?}", self.child.try_wait());
        }
        let offset = format!("file offset {:#x}", (HALF + 2) * PAGE_SIZE);
        for part in [names_memory, &offset, "read 0 of 4096 bytes", "shrank"] {
            assert!(status.message().contains(part), "{part:?} missing from: {}", status.message());
        }
        let before = self.client.get_page(GetPageRequest { region: 0, index: HALF - 1 }).await.expect("before the end");
        assert_eq!(before.into_inner().data, page_pattern(HALF - 1, 0));

        // A batch across the new end: one error reply naming the short read;
        // the stream goes on.
        let requests = [
            PagesRequest { request_id: 1, region: 0, first_index: HALF - 2, count: 4, require_paused: false },
            PagesRequest { request_id: 2, region: 0, first_index: 0, count: 2, require_paused: false },
        ];
        let mut replies = self.client.get_pages(tokio_stream::iter(requests)).await.expect("GetPages").into_inner();
        let mut answered = Vec::new();
        while let Some(reply) = replies.message().await.expect("the stream goes on") {
            answered.push(reply);
        }
        answered.sort_by_key(|reply| reply.request_id);
        let error = answered[0].error.as_ref().expect("the batch across the end is refused");
        assert_eq!(error.code, Code::DataLoss as i32, "{}", error.message);
        assert!(error.message.contains("read 8192 of 16384 bytes"), "{}", error.message);
        assert!(answered[1].error.is_none(), "{:?}", answered[1].error);
        assert_eq!(answered[1].pages[1].data, page_pattern(1, 0));

        assert!(self.child.try_wait().expect("wait").is_none(), "the agent died");
        let layout = self.client.get_layout(GetLayoutRequest {}).await.expect("GetLayout after the shrink");
        assert_eq!(layout.into_inner().total_pages, PAGES, "the layout is the one handed over");
        self.stop().await;
        let log = std::fs::read_to_string(&self.log).expect("read the log");
        assert!(log.contains("cannot be read") && log.contains("shrank"), "the log says why: {log}");
    }

    async fn stop(&mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                break exit;
            }
            assert!(Instant::now() < deadline, "the agent did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(exit.success(), "{exit:?}");
    }
}

#[tokio::test]
async fn a_memory_file_truncated_while_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.mem");
    std::fs::write(&path, (0..PAGES).flat_map(|page| page_pattern(page, 0)).collect::<Vec<_>>()).expect("write");
    let file = path.to_str().expect("a UTF-8 path");
    let agent = start_agent(dir.path(), &["--memory-file", file]).await;
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(HALF * PAGE_SIZE).expect("truncate");
    agent.check_shrunk(&format!("memory file {file}")).await;
}

#[tokio::test]
async fn a_handed_off_memfd_the_vmm_truncates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("handoff.sock");
    let agent = start_agent(dir.path(), &["--handoff-socket", socket.to_str().expect("a UTF-8 path")]).await;
    let vmm = common::handed_off(&socket, PAGES).await;
    let mut agent = agent;
    let (before, _) = common::dirty_pages(&mut agent.client, 0, false).await.expect("a first round");
    // The test VMM never touches its mapping past the new end.
    memfile::ftruncate(vmm.memory.as_fd(), HALF * PAGE_SIZE).expect("truncate the memfd");
    // The pages that went are dirty: a target must not keep their old content.
    let (_, dirty) = common::dirty_pages(&mut agent.client, before.epoch, false).await.expect("the next round");
    assert_eq!(dirty, (HALF..PAGES).collect::<Vec<_>>());
    agent.check_shrunk(&format!("VM \"test-vm\" (VMM pid {})", std::process::id())).await;
    drop(vmm);
}
