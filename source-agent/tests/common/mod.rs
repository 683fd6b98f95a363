//! Helpers shared by the integration tests: a real server on 127.0.0.1:0, a
//! client, and a VMM stand-in (this test process) that hands its memory off.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::handoff::{self, FdKind, HANDOFF_VERSION, HandoffError, HandoffMessage, Role, VmmEvent};
use guest_memory::memfile;
use guest_memory::{GuestLayout, MemoryMap, RegionLayout, Userfaultfd};
use pageserver_proto::MAX_MESSAGE_BYTES;
use pageserver_proto::bitmap::{DirtyBitmap, decode_chunks};
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{DirtyBitmapChunk, DirtyBitmapRequest, GetLayoutRequest, Layout};
use source_agent::{SourceAgent, serve};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const PAGE_SIZE: u64 = 4096;

/// A source agent's gRPC server running in this process.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), source_agent::ServeError>>,
}

impl RunningServer {
    pub async fn start(agent: Arc<SourceAgent>) -> Self {
        Self::start_with_limits(agent, source_agent::SourceLimits::default()).await
    }

    /// Like [`RunningServer::start`], under `limits`.
    pub async fn start_with_limits(agent: Arc<SourceAgent>, limits: source_agent::SourceLimits) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, agent, &limits, async {
                let _ = stopped.await;
            })
            .await
        });
        Self { addr, stop: Some(stop), task }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect")
    }

    pub async fn client(&self) -> PageServerClient<Channel> {
        PageServerClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("server task").expect("server result");
    }
}

/// Every chunk of one GetDirtyBitmap call.
pub async fn bitmap_chunks(
    client: &mut PageServerClient<Channel>,
    since_epoch: u64,
    r#final: bool,
) -> Result<Vec<DirtyBitmapChunk>, tonic::Status> {
    let mut stream = client.get_dirty_bitmap(DirtyBitmapRequest { since_epoch, r#final }).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// One GetDirtyBitmap call, decoded, with its pages as global numbers.
pub async fn dirty_pages(
    client: &mut PageServerClient<Channel>,
    since_epoch: u64,
    r#final: bool,
) -> Result<(DirtyBitmap, Vec<u64>), tonic::Status> {
    let chunks = bitmap_chunks(client, since_epoch, r#final).await?;
    let bitmap = decode_chunks(&chunks).expect("a well-formed bitmap stream");
    let layout = client.get_layout(GetLayoutRequest {}).await?.into_inner();
    let pages = bitmap.global_pages(&guest_layout(&layout)).expect("runs inside the layout");
    Ok((bitmap, pages))
}

/// The source's layout as its `GetLayout` reply describes it, to turn
/// (region, index) into global page numbers.
pub fn guest_layout(layout: &Layout) -> GuestLayout {
    let mut regions = layout.regions.clone();
    regions.sort_by_key(|r| r.index);
    let regions = regions
        .iter()
        .map(|r| RegionLayout {
            base_host_virt_addr: r.host_addr,
            size: r.size_bytes,
            offset: r.file_offset,
            page_size: r.page_size,
        })
        .collect();
    GuestLayout::new(regions).expect("a valid layout")
}

/// The content the tests give page `page` (never all zeros).
pub fn page_pattern(page: u64, generation: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8).flat_map(|word| (page << 32 | generation << 16 | word | 1).to_le_bytes()).collect()
}

/// This test process playing the VMM: a memfd mapped read-write, registered
/// with a WP-async userfaultfd, and its own pagemap.
pub struct TestVmm {
    pub pages: u64,
    pub memory: OwnedFd,
    pub map: MemoryMap,
    pub uffd: Userfaultfd,
    pub pagemap: File,
    /// The hand-off connection, kept open for events.
    pub connection: Option<UnixStream>,
}

impl TestVmm {
    pub fn new(pages: u64) -> Self {
        Self::with_tracking(pages, true)
    }

    /// `write_protect: false` makes a VMM that forgot to register its memory
    /// with the userfaultfd (a hand-off that cannot be tracked).
    pub fn with_tracking(pages: u64, write_protect: bool) -> Self {
        let len = pages * PAGE_SIZE;
        let memory = memfile::memfd_create("source-agent-test", false).expect("memfd_create");
        memfile::ftruncate(memory.as_fd(), len).expect("ftruncate");
        let map = MemoryMap::map(memory.as_fd(), 0, len as usize, true).expect("map rw");
        for page in 0..pages {
            map.copy_in((page * PAGE_SIZE) as usize, &page_pattern(page, 0));
        }
        let region = RegionLayout { base_host_virt_addr: map.addr(), size: len, offset: 0, page_size: PAGE_SIZE };
        let uffd = if write_protect {
            Userfaultfd::for_role(Role::Source, &region).expect("a WP-async userfaultfd")
        } else {
            Userfaultfd::create(0).expect("userfaultfd")
        };
        let pagemap = File::open("/proc/self/pagemap").expect("open pagemap");
        Self { pages, memory, map, uffd, pagemap, connection: None }
    }

    pub fn message(&self, role: Role, fds: Vec<FdKind>) -> HandoffMessage {
        HandoffMessage {
            version: HANDOFF_VERSION,
            role,
            vm: "test-vm".into(),
            pid: std::process::id(),
            regions: vec![RegionLayout {
                base_host_virt_addr: self.map.addr(),
                size: self.pages * PAGE_SIZE,
                offset: 0,
                page_size: PAGE_SIZE,
            }],
            fds,
            previous_handoffs: 0,
            checkpoint: None,
        }
    }

    /// A correct source hand-off; keeps the connection for events.
    pub fn hand_off(&mut self, socket: &Path) -> Result<(), HandoffError> {
        let message = self.message(Role::Source, vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap]);
        let stream = UnixStream::connect(socket).expect("connect to the hand-off socket");
        handoff::send_handoff(&stream, &message, &[self.memory.as_fd(), self.uffd.as_fd(), self.pagemap.as_fd()])?;
        self.connection = Some(stream);
        Ok(())
    }

    pub fn write_page(&self, page: u64, generation: u64) {
        self.map.copy_in((page * PAGE_SIZE) as usize, &page_pattern(page, generation));
    }

    pub fn send_event(&self, event: VmmEvent) {
        let connection = self.connection.as_ref().expect("handed off");
        handoff::send_event(connection, event).expect("send event");
    }
}

/// Waits until `condition` holds (polling), or panics after a few seconds.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A test VMM of `pages` pages that handed its memory to the agent on
/// `socket` (run off the async runtime).
#[allow(dead_code, reason = "not every test file hands memory off")]
pub async fn handed_off(socket: &std::path::Path, pages: u64) -> TestVmm {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut vmm = TestVmm::new(pages);
        vmm.hand_off(&socket).expect("the hand-off is accepted");
        vmm
    })
    .await
    .expect("hand-off task")
}

/// Starts the `source-agent` binary waiting for a hand-off on `socket` and
/// reads its listening line.
pub fn agent_process_waiting(socket: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_source-agent"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--handoff-socket"])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn source-agent");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("the listening line");
    assert!(line.contains("\"listening\""), "{line}");
    child
}
