//! Demand fetching against a source that misbehaves on purpose: a real gRPC
//! server on 127.0.0.1 playing the source agent, and real guest memory (a
//! memfd registered MINOR|MISSING with a real userfaultfd by this process,
//! handed to the agent's side through a real hand-off).
//!
//! - a refused request is retried with backoff a bounded number of times,
//!   then the fetch fails, loudly, and the page is never installed;
//! - a reply that does not answer its request (another page) is never
//!   installed, and counts as a failed attempt;
//! - after the stream breaks, every unanswered request is sent once on the
//!   new stream, and claims that arrived meanwhile once too;
//! - the fence: a reply read while the source VM runs is never installed
//!   (and the fetch fails after the pause timeout), a reply from another
//!   pause fails the migration at once, and a source serving another memory
//!   on the same address is never used (the fetch fails after the
//!   unreachable timeout).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use guest_memory::handoff::{HANDOFF_VERSION, HandoffMessage, Role, receive_handoff, send_handoff};
use guest_memory::{MemoryMap, RegionLayout, Userfaultfd, memfile};
use pageserver_proto::v1::page_server_server::{PageServer, PageServerServer};
use pageserver_proto::v1::{
    DirtyBitmapChunk, DirtyBitmapRequest, GetLayoutRequest, GetPageRequest, Layout, Page, PagesReply, PagesRequest,
    Region, RequestError,
};
use pageserver_proto::{INCARNATION_HEADER, MEMORY_ID_HEADER};
use target_agent::demand::{DemandError, DemandFetcher};
use target_agent::fence::SourceFence;
use target_agent::guest::GuestMemory;
use target_agent::page_state::{FaultAction, PageState};
use target_agent::source::{SourceAddress, SourceError, SourceLink};
use target_agent::stats::TargetStats;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const PAGE: u64 = 4096;
const PAGES: u64 = 8;

/// How the fake source answers a demand request for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The page, filled with its number.
    Page,
    /// NOT_FOUND, as a refusal inside the stream.
    Refuse,
    /// Another page than the one asked for.
    WrongPage,
    /// Nothing; the stream is closed (the first time this page is asked).
    BreakStream,
    /// The page, read while the VM runs (pause epoch 0), from a source that
    /// ignores `require_paused`.
    WhileRunning,
    /// The page, read at another pause (pause epoch 2; the others 1).
    OtherPause,
}

/// The fake source's pause epoch.
const PAUSE_EPOCH: u64 = 1;

/// A source agent that answers GetPages as `answers` says and records every
/// request, by stream.
#[derive(Clone)]
struct FakeSource {
    answers: Arc<BTreeMap<u64, Answer>>,
    /// (stream number, page) for every request received.
    requests: Arc<Mutex<Vec<(usize, u64)>>>,
    streams: Arc<Mutex<usize>>,
    broken_once: Arc<Mutex<bool>>,
    /// The memory id it names (a test may switch it to another VM's).
    memory_id: Arc<Mutex<String>>,
}

impl FakeSource {
    fn stamped<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        let memory_id = self.memory_id.lock().expect("lock").clone();
        response.metadata_mut().insert(MEMORY_ID_HEADER, memory_id.parse().expect("ascii"));
        response.metadata_mut().insert(INCARNATION_HEADER, "fake-1".parse().expect("ascii"));
        response
    }

    fn layout(&self) -> Layout {
        Layout {
            regions: vec![Region {
                index: 0,
                size_bytes: PAGES * PAGE,
                page_size: PAGE,
                page_count: PAGES,
                ..Default::default()
            }],
            page_size: PAGE,
            total_pages: PAGES,
            epoch: 1,
            paused: true,
            vm: "demand-test".into(),
            memory_source: "vmm".into(),
            incarnation: "fake-1".into(),
            memory_id: self.memory_id.lock().expect("lock").clone(),
            pause_epoch: PAUSE_EPOCH,
        }
    }
}

fn content(page: u64) -> Bytes {
    Bytes::from(vec![page as u8 + 1; PAGE as usize])
}

#[tonic::async_trait]
impl PageServer for FakeSource {
    async fn get_layout(&self, _: Request<GetLayoutRequest>) -> Result<Response<Layout>, Status> {
        Ok(self.stamped(self.layout()))
    }

    async fn get_page(&self, _: Request<GetPageRequest>) -> Result<Response<Page>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type GetPagesStream = ReceiverStream<Result<PagesReply, Status>>;

    async fn get_pages(
        &self,
        request: Request<Streaming<PagesRequest>>,
    ) -> Result<Response<Self::GetPagesStream>, Status> {
        let stream_no = {
            let mut streams = self.streams.lock().expect("lock");
            *streams += 1;
            *streams
        };
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let page = request.first_index;
                me.requests.lock().expect("lock").push((stream_no, page));
                let answer = me.answers.get(&page).copied().unwrap_or(Answer::Page);
                let reply = |pages, error| PagesReply {
                    request_id: request.request_id,
                    pages,
                    error,
                    pause_epoch: PAUSE_EPOCH,
                };
                let page_of = |index: u64| Page { region: 0, index, zero: false, data: content(index) };
                let reply = match answer {
                    Answer::Page => reply(vec![page_of(page)], None),
                    Answer::Refuse => {
                        reply(vec![], Some(RequestError { code: tonic::Code::NotFound as i32, message: "no".into() }))
                    }
                    Answer::WrongPage => reply(vec![page_of((page + 1) % PAGES)], None),
                    Answer::BreakStream => {
                        let mut broken = me.broken_once.lock().expect("lock");
                        if !*broken {
                            *broken = true;
                            return; // drops the reply stream: the client sees it end
                        }
                        reply(vec![page_of(page)], None)
                    }
                    Answer::WhileRunning => PagesReply { pause_epoch: 0, ..reply(vec![page_of(page)], None) },
                    Answer::OtherPause => PagesReply { pause_epoch: 2, ..reply(vec![page_of(page)], None) },
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(self.stamped(ReceiverStream::new(rx)))
    }

    type GetDirtyBitmapStream = ReceiverStream<Result<DirtyBitmapChunk, Status>>;

    async fn get_dirty_bitmap(
        &self,
        _: Request<DirtyBitmapRequest>,
    ) -> Result<Response<Self::GetDirtyBitmapStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

impl FakeSource {
    fn new(answers: &[(u64, Answer)]) -> Self {
        Self {
            answers: Arc::new(answers.iter().copied().collect()),
            requests: Arc::default(),
            streams: Arc::default(),
            broken_once: Arc::default(),
            memory_id: Arc::new(Mutex::new("vmm-1-fake".into())),
        }
    }

    /// Serves on 127.0.0.1:0; returns the URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = PageServerServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn requests(&self) -> Vec<(usize, u64)> {
        self.requests.lock().expect("lock").clone()
    }
}

/// This process plays the target VMM: guest memory registered MINOR|MISSING,
/// handed to the agent's side, which the test then drives.
struct Vmm {
    _memory: std::os::fd::OwnedFd,
    map: MemoryMap,
    _uffd: Userfaultfd,
    _connection: UnixStream,
}

fn hand_off() -> (Vmm, Arc<GuestMemory>) {
    let memory = memfile::memfd_create("demand-test", false).expect("memfd");
    memfile::ftruncate(memory.as_fd(), PAGES * PAGE).expect("ftruncate");
    let map = MemoryMap::map(memory.as_fd(), 0, (PAGES * PAGE) as usize, true).expect("map");
    let region = RegionLayout { base_host_virt_addr: map.addr(), size: PAGES * PAGE, offset: 0, page_size: PAGE };
    let uffd = Userfaultfd::for_role(Role::Target, &region).expect("a MINOR|MISSING userfaultfd");
    let (vmm_end, agent_end) = UnixStream::pair().expect("socket pair");
    let agent = std::thread::spawn(move || receive_handoff(agent_end, Role::Target));
    let message = HandoffMessage {
        version: HANDOFF_VERSION,
        role: Role::Target,
        vm: "demand-test".into(),
        pid: std::process::id(),
        regions: vec![region],
        fds: Role::Target.fds().to_vec(),
        previous_handoffs: 0,
        checkpoint: None,
    };
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    send_handoff(&vmm_end, &message, &[memory.as_fd(), uffd.as_fd(), pagemap.as_fd()]).expect("hand-off accepted");
    let handoff = agent.join().expect("no panic").expect("a valid hand-off");
    let guest = GuestMemory::new(handoff, Arc::new(TargetStats::default())).expect("guest memory");
    (Vmm { _memory: memory, map, _uffd: uffd, _connection: vmm_end }, Arc::new(guest))
}

/// Claims `page` as a fault would.
fn fault(guest: &GuestMemory, page: u64) -> target_agent::page_state::Claim {
    match guest.states.on_fault(page, false) {
        FaultAction::Fetch(claim) => claim,
        other => panic!("page {page}: expected to own the fetch, got {other:?}"),
    }
}

/// A fetcher against a fake source answering as `answers` says, over fresh
/// guest memory; claims go in through the returned sender.
/// (The guest memory lives as long as `vmm`: keep it bound.)
struct Running {
    source: FakeSource,
    vmm: Vmm,
    guest: Arc<GuestMemory>,
    claims: mpsc::UnboundedSender<target_agent::page_state::Claim>,
    fetcher: tokio::task::JoinHandle<Result<(), DemandError>>,
}

async fn start(answers: &[(u64, Answer)]) -> Running {
    let source = FakeSource::new(answers);
    let url = source.serve().await;
    let (vmm, guest) = hand_off();
    let stats = guest.stats.clone();
    let link = Arc::new(SourceLink {
        address: SourceAddress::plaintext(&url),
        fence: SourceFence::learn(&source.layout(), stats.clone()).expect("the fake source names itself"),
        unreachable_timeout: UNREACHABLE_TIMEOUT,
        pause_timeout: PAUSE_TIMEOUT,
        stats,
    });
    let (claims, claims_rx) = mpsc::unbounded_channel();
    let fetcher = tokio::spawn(DemandFetcher::new(guest.clone(), link).run(claims_rx));
    Running { source, vmm, guest, claims, fetcher }
}

/// The fetcher's deadlines in these tests (short, so that a failure comes
/// soon; no test measures them).
const UNREACHABLE_TIMEOUT: Duration = Duration::from_secs(2);
const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The fetcher's end, which must come within 30 s.
async fn ended(fetcher: tokio::task::JoinHandle<Result<(), DemandError>>) -> Result<(), DemandError> {
    tokio::time::timeout(Duration::from_secs(30), fetcher).await.expect("ends in time").expect("no panic")
}

#[tokio::test]
async fn a_refused_request_is_retried_a_bounded_number_of_times_then_fails() {
    let Running { source, vmm, guest, claims, fetcher } = start(&[(3, Answer::Refuse)]).await;
    claims.send(fault(&guest, 3)).expect("fetcher running");
    claims.send(fault(&guest, 5)).expect("fetcher running");
    match ended(fetcher).await {
        Err(DemandError::Refused { page: 3, attempts, .. }) => assert_eq!(attempts, 5),
        other => panic!("expected page 3 refused for good, got {other:?}"),
    }
    let asked_for_3 = source.requests().iter().filter(|(_, page)| *page == 3).count();
    assert_eq!(asked_for_3, 6, "one request and five retries: {:?}", source.requests());
    assert_eq!(guest.states.state(3), PageState::FetchingUnknown, "a refused page is never installed");
    assert_eq!(guest.states.state(5), PageState::Installed, "the other page was fetched meanwhile");
    let mut word = [0u8; 8];
    vmm.map.copy_out((5 * PAGE) as usize, &mut word);
    assert_eq!(word, [6u8; 8], "page 5 has the source's content");
}

#[tokio::test]
async fn a_reply_with_another_page_is_never_installed() {
    let Running { vmm: _vmm, guest, claims, fetcher, .. } = start(&[(2, Answer::WrongPage)]).await;
    claims.send(fault(&guest, 2)).expect("fetcher running");
    let result = ended(fetcher).await;
    assert!(matches!(result, Err(DemandError::Refused { page: 2, .. })), "{result:?}");
    assert_eq!(guest.states.state(2), PageState::FetchingUnknown);
    assert_eq!(guest.states.state(3), PageState::Unknown, "the page the source sent instead is untouched");
    assert!(!guest.states.is_present(3));
}

#[tokio::test]
async fn after_a_broken_stream_each_request_is_sent_once_again() {
    // Page 1's first request breaks the stream; page 4 is claimed while the
    // fetcher reconnects.
    let Running { source, vmm: _vmm, guest, claims, fetcher } = start(&[(1, Answer::BreakStream)]).await;
    claims.send(fault(&guest, 1)).expect("fetcher running");
    claims.send(fault(&guest, 4)).expect("fetcher running");
    for _ in 0..3000 {
        if guest.states.state(1) == PageState::Installed && guest.states.state(4) == PageState::Installed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!((guest.states.state(1), guest.states.state(4)), (PageState::Installed, PageState::Installed));
    drop(claims);
    let result = ended(fetcher).await;
    assert!(result.is_ok(), "{result:?}");
    let requests = source.requests();
    let last_stream = requests.iter().map(|(stream, _)| *stream).max().expect("requests");
    assert!(last_stream >= 2, "the stream was reopened: {requests:?}");
    for page in [1, 4] {
        let on_last = requests.iter().filter(|&&(stream, p)| stream == last_stream && p == page).count();
        assert_eq!(on_last, 1, "page {page} must be asked exactly once on the new stream: {requests:?}");
    }
    assert_eq!(guest.stats.pages_fetched_on_demand.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_page_read_while_the_source_runs_is_never_installed() {
    let Running { source, vmm: _vmm, guest, claims, fetcher } = start(&[(2, Answer::WhileRunning)]).await;
    claims.send(fault(&guest, 2)).expect("fetcher running");
    match ended(fetcher).await {
        Err(DemandError::NotPaused { page: 2, last: SourceError::NotPaused(_), .. }) => {}
        other => panic!("expected page 2 to fail for want of a pause, got {other:?}"),
    }
    assert!(source.requests().len() > 1, "asked again while waiting for the pause: {:?}", source.requests());
    assert_eq!(guest.states.state(2), PageState::FetchingUnknown, "never installed");
    assert!(guest.stats.source_replies_refused.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn a_page_from_another_pause_fails_the_fetch_at_once() {
    let Running { vmm: _vmm, guest, claims, fetcher, .. } = start(&[(4, Answer::OtherPause)]).await;
    claims.send(fault(&guest, 1)).expect("fetcher running");
    while guest.states.state(1) != PageState::Installed {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    claims.send(fault(&guest, 4)).expect("fetcher running");
    match ended(fetcher).await {
        Err(DemandError::Fence { page: 4, source: SourceError::PauseChanged { fenced: 1, got: 2, .. } }) => {}
        other => panic!("expected the pause fence to stop page 4, got {other:?}"),
    }
    assert_eq!(guest.states.state(4), PageState::FetchingUnknown, "never installed");
}

#[tokio::test]
async fn another_memory_on_the_source_address_is_never_used() {
    let Running { source, vmm: _vmm, guest, claims, fetcher } = start(&[]).await;
    // The migration learned its source; now another VM's agent answers there.
    *source.memory_id.lock().expect("lock") = "vmm-2-another-vm".into();
    claims.send(fault(&guest, 3)).expect("fetcher running");
    match ended(fetcher).await {
        Err(DemandError::Unreachable { page: 3, last: SourceError::WrongSource(why), .. }) => {
            assert!(why.contains("vmm-2-another-vm"), "{why}")
        }
        other => panic!("expected the wrong source to be refused until the deadline, got {other:?}"),
    }
    assert!(source.requests().is_empty(), "nothing asked of it: {:?}", source.requests());
    assert_eq!(guest.states.state(3), PageState::FetchingUnknown, "never installed");
}
