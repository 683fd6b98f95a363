//! A source agent fed by a real hand-off: this test process is the VMM (a
//! memfd registered with a WP-async userfaultfd, its own /proc/self/pagemap),
//! the kernel does the dirty tracking, gRPC runs over 127.0.0.1.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use common::{RunningServer, TestVmm, bitmap_chunks, dirty_pages, page_pattern, wait_until};
use guest_memory::handoff::{self, FdKind, HandoffError, Role, VmmEvent};
use pageserver_agent_shell::PeerAllowList;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, GetPageRequest};
use source_agent::{HandoffListener, SourceAgent, listen_for_handoff};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const PAGES: u64 = 64;

struct Setup {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    _listener: HandoffListener,
    agent: Arc<SourceAgent>,
    server: RunningServer,
}

async fn start_waiting_agent() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("handoff.sock");
    let agent = Arc::new(SourceAgent::waiting_for_handoff("test-vm", &socket));
    let listener =
        listen_for_handoff(&socket, PeerAllowList::own_uid(), None, agent.clone()).expect("listen for the hand-off");
    let server = RunningServer::start(agent.clone()).await;
    Setup { _dir: dir, socket, _listener: listener, agent, server }
}

/// Runs a blocking hand-off step off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn hand_off(socket: &Path, pages: u64) -> TestVmm {
    common::handed_off(socket, pages).await
}

/// A waiting agent that a test VMM handed `pages` pages, and the epoch of a
/// first bitmap (every page, since 0): what is written afterwards is dirty
/// since it.
async fn handed_off_and_scanned(pages: u64) -> (Setup, PageServerClient<Channel>, TestVmm, u64) {
    let setup = start_waiting_agent().await;
    let mut client = setup.server.client().await;
    let vmm = hand_off(&setup.socket, pages).await;
    let (bitmap, _) = dirty_pages(&mut client, 0, false).await.expect("since 0");
    (setup, client, vmm, bitmap.epoch)
}

async fn paused(client: &mut PageServerClient<Channel>) -> bool {
    client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner().paused
}

/// Waits until `GetLayout` says the VM is paused (`want`), or running.
async fn wait_for_paused(client: &PageServerClient<Channel>, want: bool, what: &str) {
    wait_until(what, || {
        let mut client = client.clone();
        async move { paused(&mut client).await == want }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_pages_follow_the_guest_writes() {
    let setup = start_waiting_agent().await;
    let mut client = setup.server.client().await;
    let vmm = hand_off(&setup.socket, PAGES).await;

    let layout = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner();
    assert_eq!((layout.memory_source.as_str(), layout.total_pages, layout.paused), ("vmm", PAGES, false));
    assert_eq!(layout.regions[0].host_addr, vmm.map.addr());
    let page = client.get_page(GetPageRequest { region: 0, index: 7 }).await.expect("GetPage").into_inner();
    assert_eq!(page.data, page_pattern(7, 0));

    let (bitmap, pages) = dirty_pages(&mut client, 0, false).await.expect("since 0");
    assert_eq!(pages, (0..PAGES).collect::<Vec<_>>());
    assert!(!bitmap.paused);
    let e1 = bitmap.epoch;
    assert!(e1 >= 2, "a scan makes a new epoch");

    let written = [3, 17, 18, 40];
    for page in written {
        vmm.write_page(page, 1);
    }
    let (bitmap, pages) = dirty_pages(&mut client, e1, false).await.expect("since E1");
    assert_eq!(pages, written);
    assert!(bitmap.epoch > e1);
    // The source reads what the guest wrote.
    let page = client.get_page(GetPageRequest { region: 0, index: 17 }).await.expect("GetPage").into_inner();
    assert_eq!(page.data, page_pattern(17, 1));

    // Asking again (a lost response) returns the same pages or more.
    vmm.write_page(50, 1);
    let (_, again) = dirty_pages(&mut client, e1, false).await.expect("since E1 again");
    assert!(written.iter().all(|p| again.contains(p)), "{again:?} lost pages of {written:?}");
    assert!(again.contains(&50));

    let running = bitmap_chunks(&mut client, e1, true).await.expect_err("final while running");
    assert_eq!(running.code(), Code::FailedPrecondition);
    assert!(running.message().contains("still running"), "{}", running.message());

    let before_pause = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner().epoch;
    vmm.write_page(60, 2);
    vmm.send_event(VmmEvent::Paused { at_ns: guest_memory::memfile::monotonic_ns() });
    wait_for_paused(&client, true, "the agent sees the pause").await;
    let (bitmap, pages) = dirty_pages(&mut client, before_pause, true).await.expect("final bitmap");
    assert!(bitmap.paused);
    assert_eq!(pages, [60]);

    vmm.send_event(VmmEvent::Resumed);
    wait_for_paused(&client, false, "the agent sees the resume").await;
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_and_not_serving_until_the_handoff() {
    let setup = start_waiting_agent().await;
    let mut client = setup.server.client().await;
    let mut health = HealthClient::new(setup.server.channel().await);
    let status = |health: &mut HealthClient<Channel>, service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move { health.check(HealthCheckRequest { service }).await.expect("health").into_inner().status }
    };
    assert_eq!(status(&mut health, "pageserver.v1.PageServer").await, ServingStatus::NotServing as i32);
    assert_eq!(status(&mut health, "").await, ServingStatus::NotServing as i32);

    let waiting = client.get_layout(GetLayoutRequest {}).await.expect_err("no memory yet");
    assert_eq!(waiting.code(), Code::Unavailable);
    assert!(waiting.message().contains(&setup.socket.display().to_string()), "{}", waiting.message());
    let waiting = client.get_page(GetPageRequest { region: 0, index: 0 }).await.expect_err("no memory yet");
    assert_eq!(waiting.code(), Code::Unavailable);
    let waiting = bitmap_chunks(&mut client, 0, false).await.expect_err("no memory yet");
    assert_eq!(waiting.code(), Code::Unavailable);

    let _vmm = hand_off(&setup.socket, 8).await;
    wait_until("health says SERVING", || {
        let mut health = health.clone();
        async move { status(&mut health, "pageserver.v1.PageServer").await == ServingStatus::Serving as i32 }
    })
    .await;
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving as i32);
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handoffs_are_refused_and_the_agent_keeps_waiting() {
    let setup = start_waiting_agent().await;
    let socket = setup.socket.clone();
    blocking(move || {
        let vmm = TestVmm::new(8);
        let fds = [vmm.memory.as_fd(), vmm.uffd.as_fd(), vmm.pagemap.as_fd()];

        let wrong_role = vmm.message(Role::Target, vec![FdKind::Memory, FdKind::Uffd]);
        let stream = UnixStream::connect(&socket).expect("connect");
        match handoff::send_handoff(&stream, &wrong_role, &fds[..2]) {
            Err(HandoffError::Refused(message)) => assert!(message.contains("Target"), "{message}"),
            other => panic!("a target hand-off to a source agent must be refused, got {other:?}"),
        }

        let all_kinds = vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap];
        let missing_fd = vmm.message(Role::Source, all_kinds.clone());
        let stream = UnixStream::connect(&socket).expect("connect");
        match handoff::send_handoff(&stream, &missing_fd, &fds[..2]) {
            Err(HandoffError::Refused(message)) => assert!(message.contains("2 are attached"), "{message}"),
            other => panic!("a hand-off missing a descriptor must be refused, got {other:?}"),
        }

        // Well-formed, but the memory is not registered for write tracking:
        // the agent finds out with its first scan and says so.
        let mut untracked = TestVmm::with_tracking(8, false);
        match untracked.hand_off(&socket) {
            Err(HandoffError::Refused(message)) => assert!(message.contains("WP mode"), "{message}"),
            other => panic!("an untrackable hand-off must be refused, got {other:?}"),
        }

        // A peer that sends garbage, then one that says nothing and leaves.
        let garbage = UnixStream::connect(&socket).expect("connect");
        guest_memory::fd_passing::send_with_fds(garbage.as_fd(), b"not json\n", &[]).expect("send");
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&garbage), &mut reply).expect("reply");
        assert!(reply.contains("\"ok\":false") && reply.contains("malformed"), "{reply}");
        drop(UnixStream::connect(&socket).expect("connect"));
    })
    .await;

    let socket = setup.socket.clone();
    let mut vmm = hand_off(&socket, 8).await;
    let mut client = setup.server.client().await;
    let layout = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout after a good hand-off");
    assert_eq!(layout.into_inner().total_pages, 8);

    // One hand-off per agent: a second VMM is told so.
    let second = blocking(move || {
        let mut other = TestVmm::new(4);
        let result = other.hand_off(&socket);
        (result, vmm.connection.take())
    })
    .await;
    match second.0 {
        Err(HandoffError::Refused(message)) => assert!(message.contains("already serves"), "{message}"),
        other => panic!("a second hand-off must be refused, got {other:?}"),
    }
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_gone_while_running_makes_every_page_dirty() {
    let (setup, mut client, mut vmm, e1) = handed_off_and_scanned(16).await;
    vmm.write_page(2, 1);
    // The VMM leaves without pausing: what it wrote since the last scan is
    // unknowable once its page tables are gone.
    drop(vmm.connection.take());
    wait_for_paused(&client, true, "the agent sees the VMM leave").await;
    let (bitmap, pages) = dirty_pages(&mut client, e1, true).await.expect("final bitmap after the VMM left");
    assert!(bitmap.paused);
    assert_eq!(pages, (0..16).collect::<Vec<_>>());
    let (_, pages) = dirty_pages(&mut client, bitmap.epoch, true).await.expect("nothing changes any more");
    assert!(pages.is_empty());
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_gone_after_a_pause_loses_nothing_and_adds_nothing() {
    let (setup, mut client, mut vmm, e1) = handed_off_and_scanned(16).await;
    vmm.write_page(5, 1);
    vmm.send_event(VmmEvent::Paused { at_ns: 0 });
    drop(vmm.connection.take());
    let agent = setup.agent.clone();
    wait_until("the agent sees the VMM leave", || {
        let gone = agent.memory().is_some_and(|memory| memory.dirty().is_vmm_gone());
        async move { gone }
    })
    .await;
    // The pause scan saw page 5; leaving afterwards adds no page.
    let (_, pages) = dirty_pages(&mut client, e1, true).await.expect("final bitmap");
    assert_eq!(pages, [5]);
    setup.server.stop().await;
}

/// For VMMs that cannot report their pause (QEMU), the orchestrator does:
/// `MigrationSource/SetPaused`. Before it, a final bitmap is refused; after
/// it, the final bitmap holds exactly what was written before the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_reports_the_pause_over_grpc() {
    use pageserver_proto::v1::SetPausedRequest;
    use pageserver_proto::v1::migration_source_client::MigrationSourceClient;

    let setup = start_waiting_agent().await;
    let mut control = MigrationSourceClient::new(setup.server.channel().await);
    let early = control.set_paused(SetPausedRequest { paused: true }).await.expect_err("no memory yet");
    assert_eq!(early.code(), Code::Unavailable, "{early}");

    let mut client = setup.server.client().await;
    let vmm = hand_off(&setup.socket, PAGES).await;
    let (bitmap, _) = dirty_pages(&mut client, 0, false).await.expect("since 0");
    let e1 = bitmap.epoch;
    vmm.write_page(9, 1);
    let running = bitmap_chunks(&mut client, e1, true).await.expect_err("final while running");
    assert_eq!(running.code(), Code::FailedPrecondition);

    let reply = control.set_paused(SetPausedRequest { paused: true }).await.expect("SetPaused").into_inner();
    assert!(reply.paused);
    assert!(reply.epoch > e1, "the pause scans at once");
    assert!(paused(&mut client).await);
    let (bitmap, pages) = dirty_pages(&mut client, e1, true).await.expect("final bitmap");
    assert!(bitmap.paused);
    assert_eq!(pages, [9]);

    let reply = control.set_paused(SetPausedRequest { paused: false }).await.expect("SetPaused").into_inner();
    assert!(!reply.paused);
    assert!(!paused(&mut client).await);
    setup.server.stop().await;
}

/// After a round, the VMM drops pages as a balloon or free-page reporting
/// does: `MADV_DONTNEED` (its page-table entries go, the shared file keeps
/// the content), `MADV_REMOVE` and `fallocate(PUNCH_HOLE)` (the content goes:
/// the page reads as zeros), of pages it had not written since the round
/// and of pages it had. Every page whose content changed is in the next
/// bitmap. On this kernel (6.18) `PAGEMAP_SCAN` alone misses the clean pages
/// whose content was removed (the uffd-wp marker survives the hole punch),
/// so the agent also looks for holes (`source_agent::removed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_the_vmm_drops_after_a_round() {
    use guest_memory::sys::Discard;

    let (setup, mut client, vmm, e1) = handed_off_and_scanned(16).await;
    let page = |index: u64| (index * common::PAGE_SIZE) as usize;
    vmm.map.discard(page(2), page(1), Discard::DontNeed).expect("MADV_DONTNEED");
    vmm.map.discard(page(3), page(1), Discard::Remove).expect("MADV_REMOVE");
    vmm.write_page(5, 1);
    vmm.map.discard(page(5), page(1), Discard::DontNeed).expect("MADV_DONTNEED");
    vmm.write_page(6, 1);
    vmm.map.discard(page(6), page(1), Discard::Remove).expect("MADV_REMOVE");
    guest_memory::memfile::punch_hole(vmm.memory.as_fd(), page(8) as u64, page(1) as u64).expect("punch a hole");
    vmm.write_page(9, 1);
    // Removed, then read: shmem fills the hole with a zeroed page, so the
    // file holds data there again at the next look, with other content.
    vmm.map.discard(page(10), page(1), Discard::Remove).expect("MADV_REMOVE");
    assert_eq!(vmm.map.read_u64(page(10)), 0, "a removed page reads as zeros");

    let (_, pages) = dirty_pages(&mut client, e1, false).await.expect("since E1");
    assert_eq!(pages, [3, 5, 6, 8, 9, 10], "every page whose content changed, and only those");
    let content = |index| {
        let mut client = client.clone();
        async move { client.get_page(GetPageRequest { region: 0, index }).await.expect("GetPage").into_inner() }
    };
    // Not in the bitmap, and rightly so: the target's copy is still right.
    assert_eq!(content(2).await.data, page_pattern(2, 0), "MADV_DONTNEED keeps a shared page's content");
    for removed in [3, 6, 8, 10] {
        assert!(content(removed).await.zero, "page {removed} reads as zeros now");
    }
    assert_eq!(content(5).await.data, page_pattern(5, 1));
    setup.server.stop().await;
}

/// A page that is a hole at one look, written, and removed rounds later:
/// after the first look the agent maps in only pages a scan found written
/// (`removed.rs`), so this is the case that proves a written hole is
/// watched from then on. (Passing no written pages to the look loses the
/// last removal: the third bitmap comes back empty.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_written_later_is_watched_for_removal() {
    use guest_memory::sys::Discard;

    let (setup, mut client, vmm, e1) = handed_off_and_scanned(16).await;
    let page = |index: u64| (index * common::PAGE_SIZE) as usize;
    vmm.map.discard(page(12), page(1), Discard::Remove).expect("MADV_REMOVE");
    let (e2, pages) = dirty_pages(&mut client, e1, false).await.expect("since E1");
    assert_eq!(pages, [12], "the removal");
    vmm.write_page(12, 3);
    let (e3, pages) = dirty_pages(&mut client, e2.epoch, false).await.expect("since E2");
    assert_eq!(pages, [12], "the write into the hole");
    let (e4, pages) = dirty_pages(&mut client, e3.epoch, false).await.expect("since E3");
    assert!(pages.is_empty(), "nothing changed: {pages:?}");
    vmm.map.discard(page(12), page(1), Discard::Remove).expect("MADV_REMOVE again");
    let (_, pages) = dirty_pages(&mut client, e4.epoch, false).await.expect("since E4");
    assert_eq!(pages, [12], "the second removal");
    let data = client.get_page(GetPageRequest { region: 0, index: 12 }).await.expect("GetPage").into_inner();
    assert!(data.zero, "page 12 reads as zeros again");
    setup.server.stop().await;
}

/// A hole the VMM writes and then drops from its own page tables
/// (`MADV_DONTNEED`: the file keeps the data) leaves no trace that
/// write-protection or the VMM's page tables can show, so a look during
/// pre-copy may miss it; the scan after the pause looks at the file itself
/// and reports it, so the final bitmap holds it. (With the pause scan's look
/// no more thorough than the others, the final bitmap comes back without
/// page 13.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_written_out_of_the_vmms_sight_is_in_the_final_bitmap() {
    use guest_memory::sys::Discard;
    use pageserver_proto::v1::SetPausedRequest;
    use pageserver_proto::v1::migration_source_client::MigrationSourceClient;

    let (setup, mut client, vmm, e1) = handed_off_and_scanned(16).await;
    let page = |index: u64| (index * common::PAGE_SIZE) as usize;
    vmm.map.discard(page(13), page(1), Discard::Remove).expect("MADV_REMOVE");
    let (e2, pages) = dirty_pages(&mut client, e1, false).await.expect("since E1");
    assert_eq!(pages, [13], "the removal");
    vmm.write_page(13, 5);
    vmm.map.discard(page(13), page(1), Discard::DontNeed).expect("MADV_DONTNEED");
    let mut control = MigrationSourceClient::new(setup.server.channel().await);
    control.set_paused(SetPausedRequest { paused: true }).await.expect("SetPaused");
    let (bitmap, pages) = dirty_pages(&mut client, e2.epoch, true).await.expect("final bitmap");
    assert!(bitmap.paused);
    assert_eq!(pages, [13], "the write the VMM's page tables no longer show");
    let data = client.get_page(GetPageRequest { region: 0, index: 13 }).await.expect("GetPage").into_inner();
    assert_eq!(data.data, page_pattern(13, 5));
    setup.server.stop().await;
}
