//! What the process-level tests of the target agent share: the real
//! `target-agent` and `source-agent` binaries as child processes on
//! 127.0.0.1, this test process as the target VMM (a memfd registered
//! MINOR|MISSING with a real userfaultfd, handed over through the agent's
//! real socket), memory files, and the agents' status over gRPC.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::handoff::{HANDOFF_VERSION, HandoffError, HandoffMessage, Role, send_handoff};
use guest_memory::{MemoryMap, RegionLayout, Userfaultfd, memfile};
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationPhase, MigrationStatus};
use rustix::process::{Pid, Signal, kill_process};

pub const TARGET_AGENT: &str = env!("CARGO_BIN_EXE_target-agent");
pub const PAGE: u64 = 4096;

/// The longest wait for anything a test waits for: a hang guard, generous
/// because the tests share two cores with everything else; no test
/// measures time with it.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The `source-agent` binary, built next to this package's binary (by
/// `cargo test -p target-agent -p source-agent`, or a workspace build).
pub fn source_agent_binary() -> PathBuf {
    let path = Path::new(TARGET_AGENT).with_file_name("source-agent");
    assert!(
        path.is_file(),
        "{} is missing: build it (cargo build --release -p source-agent, or test with -p source-agent too)",
        path.display()
    );
    path
}

/// A scratch directory under /dev/shm, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let path = PathBuf::from(format!("/dev/shm/target-agent-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch directory");
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The content of page `page` of the test memory: every fourth page is all
/// zeros (a hole on the target), the others a pattern naming the page.
pub fn page_content(page: u64) -> Vec<u8> {
    if page % 4 == 3 {
        return vec![0; PAGE as usize];
    }
    (0..PAGE / 8).flat_map(|word| (page << 20 | word | 1 << 63).to_le_bytes()).collect()
}

/// A memory file of `pages` pages of [`page_content`].
pub fn memory_file(path: &Path, pages: u64) {
    let mut content = Vec::with_capacity((pages * PAGE) as usize);
    for page in 0..pages {
        content.extend(page_content(page));
    }
    std::fs::write(path, content).expect("writing the memory file");
}

/// An agent process: stderr in a log file, its listening line read.
pub struct Agent {
    pub name: String,
    child: Child,
    log: PathBuf,
    pub grpc: String,
}

impl Agent {
    /// Starts `program` with `args` (plus port-0 listeners) and waits for its
    /// listening line.
    pub fn start(name: &str, program: &Path, args: &[&str], dir: &Scratch) -> Self {
        let log = dir.join(&format!("{name}.log"));
        let mut child = Command::new(program)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the listening line");
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name} printed {line:?} ({e}); stderr:\n{stderr}"));
        let grpc = event["grpc"].as_str().expect("grpc address").to_owned();
        Self { name: name.to_owned(), child, log, grpc }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32).expect("a pid");
        kill_process(pid, signal).unwrap_or_else(|e| panic!("signalling {}: {e}", self.name));
    }

    /// SIGSTOP, and waits until every thread of the process has stopped:
    /// `kill` returns before a busy thread on another CPU has, and a reply
    /// it sends meanwhile would come from a "stopped" agent.
    pub fn stop(&self) {
        self.signal(Signal::STOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        let stopped = || {
            std::fs::read_dir(&tasks).expect("the agent's threads").flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the command name's closing parenthesis.
                let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
                matches!(state, Some('T' | 't') | None)
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !stopped() {
            assert!(std::time::Instant::now() < deadline, "{} did not stop", self.name);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for it to exit (a hang guard, not a deadline under test).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit; stderr:\n{}", self.name, self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its stderr contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.stderr().contains(needle) {
            assert!(self.running(), "{} exited before logging {needle:?}; stderr:\n{}", self.name, self.stderr());
            assert!(Instant::now() < deadline, "{} never logged {needle:?}; stderr:\n{}", self.name, self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.stderr());
        }
    }
}

/// This test process as the target VMM: a memfd mapped read-write and
/// registered MINOR|MISSING, as a VMM registers its guest memory.
pub struct TargetVmm {
    pub pages: u64,
    memory: OwnedFd,
    pub map: Arc<MemoryMap>,
    uffd: Userfaultfd,
    /// The hand-off connection, held as a VMM holds it.
    connection: Option<UnixStream>,
}

impl TargetVmm {
    pub fn new(pages: u64) -> Self {
        let len = pages * PAGE;
        let memory = memfile::memfd_create("target-agent-test", false).expect("memfd");
        memfile::ftruncate(memory.as_fd(), len).expect("ftruncate");
        let map = MemoryMap::map(memory.as_fd(), 0, len as usize, true).expect("mmap");
        let region = RegionLayout { base_host_virt_addr: map.addr(), size: len, offset: 0, page_size: PAGE };
        let uffd = Userfaultfd::for_role(Role::Target, &region).expect("a MINOR|MISSING userfaultfd");
        Self { pages, memory, map: Arc::new(map), uffd, connection: None }
    }

    /// Hands the memory to the agent on `socket` (waiting for the socket).
    pub fn hand_off(&mut self, socket: &Path) -> Result<(), HandoffError> {
        let message = HandoffMessage {
            version: HANDOFF_VERSION,
            role: Role::Target,
            vm: "test-vm".into(),
            pid: std::process::id(),
            regions: vec![RegionLayout {
                base_host_virt_addr: self.map.addr(),
                size: self.pages * PAGE,
                offset: 0,
                page_size: PAGE,
            }],
            fds: Role::Target.fds().to_vec(),
            previous_handoffs: 0,
            checkpoint: None,
        };
        let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        let stream = UnixStream::connect(socket).expect("connecting to the hand-off socket");
        send_handoff(&stream, &message, &[self.memory.as_fd(), self.uffd.as_fd(), pagemap.as_fd()])?;
        self.connection = Some(stream);
        Ok(())
    }

    /// Reads pages `pages` of guest memory on another thread, as a vCPU
    /// would (faulting on the ones not mapped yet).
    pub fn read_pages(&self, pages: std::ops::Range<u64>) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
        let map = self.map.clone();
        std::thread::spawn(move || {
            pages
                .map(|page| {
                    let mut content = vec![0u8; PAGE as usize];
                    map.copy_out((page * PAGE) as usize, &mut content);
                    content
                })
                .collect()
        })
    }
}

/// Waits for a reading thread (a hang guard: a read stuck on a fault nobody
/// resolves fails the test).
pub fn join_reads(reads: std::thread::JoinHandle<Vec<Vec<u8>>>, what: &str) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + PATIENCE;
    while !reads.is_finished() {
        assert!(Instant::now() < deadline, "{what}: the guest's reads never completed (frozen on a fault)");
        std::thread::sleep(Duration::from_millis(10));
    }
    reads.join().expect("the reading thread")
}

/// The target agent's status.
pub async fn status(agent: &Agent) -> MigrationStatus {
    let mut client = MigrationTargetClient::connect(agent.url()).await.expect("connecting to the target agent");
    client.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner()
}

/// Polls the status until `done` holds (hang guard), returning it.
pub async fn wait_for_status(agent: &Agent, what: &str, done: impl Fn(&MigrationStatus) -> bool) -> MigrationStatus {
    let mut client = MigrationTargetClient::connect(agent.url()).await.expect("connecting to the target agent");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = client.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner();
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "never {what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A migration set up to its convergence: a source agent serving a memory
/// file of `pages` pages, a target agent (with `target_args`) and this
/// process as the target VMM, whose memory is handed over.
pub struct Migration {
    pub source: Agent,
    pub target: Agent,
    pub vmm: TargetVmm,
    pub dir: Scratch,
}

impl Migration {
    pub async fn start(name: &str, pages: u64, target_args: &[&str]) -> Self {
        let dir = Scratch::new(name);
        let file = dir.join("guest.mem");
        memory_file(&file, pages);
        let file = file.display().to_string();
        let source = Agent::start("source-agent", &source_agent_binary(), &["--memory-file", &file], &dir);
        let socket = dir.join("target.sock").display().to_string();
        let url = source.url();
        let mut args = vec!["--source", url.as_str(), "--handoff-socket", socket.as_str()];
        args.extend(target_args);
        let target = Agent::start("target-agent", Path::new(TARGET_AGENT), &args, &dir);
        let mut vmm = TargetVmm::new(pages);
        let socket = PathBuf::from(socket);
        let vmm = tokio::task::spawn_blocking(move || {
            vmm.hand_off(&socket).expect("the target agent takes the hand-off");
            vmm
        })
        .await
        .expect("hand-off thread");
        Self { source, target, vmm, dir }
    }

    pub fn phase_is(status: &MigrationStatus, phase: MigrationPhase) -> bool {
        status.phase() == phase
    }
}
