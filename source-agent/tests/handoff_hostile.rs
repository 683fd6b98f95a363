//! Hostile and broken hand-offs to a waiting source agent (its real hand-off
//! socket, this test process as the VMM): each is refused with a reply line
//! naming the problem, and a proper hand-off is accepted afterwards; a peer
//! that connects and says nothing does not hold up the VMM behind it.
//! (`guest-memory/tests/handoff_refusals.rs` checks that refused descriptors
//! are closed.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{PAGE_SIZE, RunningServer, TestVmm};
use guest_memory::fd_passing::send_with_fds;
use guest_memory::handoff::{FdKind, HandoffMessage, MAX_MESSAGE_BYTES, Role};
use guest_memory::{RegionLayout, memfile};
use pageserver_agent_shell::PeerAllowList;
use pageserver_proto::v1::GetLayoutRequest;
use pageserver_test_support::foreign_peer::{self, NOBODY};
use source_agent::{HandoffListener, SourceAgent, listen_for_handoff};

const PAGES: u64 = 8;

struct Setup {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    _listener: HandoffListener,
    server: RunningServer,
}

async fn start_waiting_agent() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("handoff.sock");
    let agent = Arc::new(SourceAgent::waiting_for_handoff("test-vm", &socket));
    let listener =
        listen_for_handoff(&socket, PeerAllowList::own_uid(), None, agent.clone()).expect("listen for the hand-off");
    let server = RunningServer::start(agent).await;
    Setup { _dir: dir, socket, _listener: listener, server }
}

/// Sends `bytes` with `fds` on a new connection, then reads the agent's
/// reply line (the agent may stop reading early: send errors are expected).
fn reply_to(socket: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> serde_json::Value {
    let stream = UnixStream::connect(socket).expect("connect");
    let first = bytes.len().min(4096);
    if send_with_fds(stream.as_fd(), &bytes[..first], fds).is_ok() {
        let _ = (&stream).write_all(&bytes[first..]);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).expect("a reply line");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?} is not JSON: {e}"))
}

fn line(message: &HandoffMessage) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("serialize");
    line.push(b'\n');
    line
}

/// Refusals of everything a VMM can get wrong, then a proper hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handoffs_are_refused_with_their_reason_and_a_good_one_follows() {
    let setup = start_waiting_agent().await;
    let socket = setup.socket.clone();
    tokio::task::spawn_blocking(move || {
        let vmm = TestVmm::new(PAGES);
        let (memory, uffd, pagemap) = (vmm.memory.as_fd(), vmm.uffd.as_fd(), vmm.pagemap.as_fd());
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let (pipe, _pipe_writer) = std::io::pipe().expect("pipe");
        let all = vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap];
        let good = vmm.message(Role::Source, all.clone());
        let with_regions = |regions: Vec<RegionLayout>| HandoffMessage { regions, ..good.clone() };
        let region = good.regions[0];
        let huge = 2 << 20;
        let other_memory = memfile::memfd_create("a-huge-page-of-4k-pages", false).expect("memfd");
        memfile::ftruncate(other_memory.as_fd(), huge).expect("ftruncate");
        let long = HandoffMessage { vm: "x".repeat(2 * MAX_MESSAGE_BYTES), ..good.clone() };
        let cases: Vec<(&str, Vec<u8>, Vec<BorrowedFd<'_>>, &str)> = vec![
            ("garbage", b"not json\n".to_vec(), vec![], "malformed hand-off message"),
            ("no descriptors", line(&good), vec![], "names 3 descriptors but 0 are attached"),
            ("an extra descriptor", line(&good), vec![memory, uffd, pagemap, null.as_fd()], "but 4 are attached"),
            ("a pipe as the uffd", line(&good), vec![memory, pipe.as_fd(), pagemap], "Uffd is not what it claims"),
            ("/dev/null as the uffd", line(&good), vec![memory, null.as_fd(), pagemap], "(it is /dev/null)"),
            ("a pipe as memory", line(&good), vec![pipe.as_fd(), uffd, pagemap], "Memory is not what it claims"),
            ("/dev/null as memory", line(&good), vec![null.as_fd(), uffd, pagemap], "(it is /dev/null)"),
            ("10 MiB without a newline", vec![b'{'; 10 << 20], vec![memory, uffd, pagemap], "larger than 1048576"),
            ("a long valid-looking message", line(&long), vec![memory, uffd, pagemap], "larger than 1048576"),
            ("no newline before the end", b"{\"version\":1".to_vec(), vec![], "ends after 12 bytes without a newline"),
            (
                "a region past the file's end",
                line(&with_regions(vec![RegionLayout { offset: PAGE_SIZE, ..region }])),
                vec![memory, uffd, pagemap],
                "memory file has 32768 bytes, the layout needs 36864",
            ),
            (
                "2 MiB pages in a file of 4 KiB pages",
                line(&with_regions(vec![RegionLayout {
                    base_host_virt_addr: 1 << 30,
                    size: huge,
                    offset: 0,
                    page_size: huge,
                }])),
                vec![other_memory.as_fd(), uffd, pagemap],
                "page size is 4096 bytes, the layout says 2097152",
            ),
            (
                "overlapping regions",
                line(&with_regions(vec![region, RegionLayout { offset: region.size, ..region }])),
                vec![memory, uffd, pagemap],
                "regions 0 and 1 overlap (host addresses)",
            ),
            (
                "a region the uffd does not cover",
                line(&with_regions(vec![RegionLayout { base_host_virt_addr: 1 << 40, ..region }])),
                vec![memory, uffd, pagemap],
                "is the uffd registered in WP mode?",
            ),
        ];
        for (what, bytes, fds, reason) in cases {
            let reply = reply_to(&socket, &bytes, &fds);
            assert_eq!(reply["ok"], false, "{what}: {reply}");
            let error = reply["error"].as_str().unwrap_or_else(|| panic!("{what}: no reason in {reply}"));
            assert!(error.contains(reason), "{what}: {error:?} does not say {reason:?}");
        }
        let mut vmm = vmm;
        vmm.hand_off(&socket).expect("a proper hand-off after all the bad ones");
        vmm
    })
    .await
    .expect("the VMM");
    let layout = setup.server.client().await.get_layout(GetLayoutRequest {}).await.expect("GetLayout");
    assert_eq!(layout.into_inner().total_pages, PAGES);
    setup.server.stop().await;
}

/// A peer that connects and says nothing is still open (not yet timed out)
/// when the VMM's hand-off behind it is accepted; once the agent's read
/// timeout expires it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_does_not_hold_up_the_vmm() {
    let setup = start_waiting_agent().await;
    let socket = setup.socket.clone();
    let silent = tokio::task::spawn_blocking(move || {
        let silent = UnixStream::connect(&socket).expect("connect and say nothing");
        let mut vmm = TestVmm::new(PAGES);
        vmm.hand_off(&socket).expect("the hand-off behind a silent peer");
        silent.set_nonblocking(true).expect("non-blocking");
        let still_open = (&silent).read(&mut [0u8; 64]).expect_err("no reply yet");
        assert_eq!(still_open.kind(), std::io::ErrorKind::WouldBlock, "the silent peer was already answered");
        (silent, vmm)
    })
    .await
    .expect("the VMM");
    let layout = setup.server.client().await.get_layout(GetLayoutRequest {}).await.expect("GetLayout");
    assert_eq!(layout.into_inner().total_pages, PAGES);

    let reply = tokio::task::spawn_blocking(move || {
        let (silent, _vmm) = silent;
        silent.set_nonblocking(false).expect("blocking");
        let mut reply = String::new();
        BufReader::new(&silent).read_line(&mut reply).expect("the reply once the read timeout expires");
        reply
    })
    .await
    .expect("the silent peer");
    // Whether its handler looked before or after the VMM's memory was
    // attached, it waited out the read timeout for a message, then refused.
    let reasons = ["no complete hand-off message arrived in time", "this agent already serves the memory"];
    assert!(reply.contains("\"ok\":false") && reasons.iter().any(|r| reply.contains(r)), "{reply}");
    setup.server.stop().await;
}

/// A peer of another uid (`nobody`, while the agent allows only its own) is
/// refused by its credentials, before the agent reads what it sent, with a
/// reply naming its uid and pid; the agent goes on waiting, and a proper
/// hand-off follows. The socket is opened to everyone for this, so that the
/// agent's check, not the socket's mode, is what refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_uid_is_refused_and_a_proper_handoff_follows() {
    let setup = start_waiting_agent().await;
    let socket = setup.socket.clone();
    let own_uid = PeerAllowList::own_uid().uids()[0];
    assert_ne!(own_uid, NOBODY, "the test must not run as the foreign peer's user");
    tokio::task::spawn_blocking(move || {
        foreign_peer::let_everyone_connect(&socket);
        foreign_peer::assert_refused_as_foreign(&socket, "as_a_foreign_peer", &[own_uid], "before the hand-off");
        let mut vmm = TestVmm::new(PAGES);
        vmm.hand_off(&socket).expect("a proper hand-off after the foreign peer's");
        vmm
    })
    .await
    .expect("the foreign peer, then the VMM");
    let layout = setup.server.client().await.get_layout(GetLayoutRequest {}).await.expect("GetLayout");
    assert_eq!(layout.into_inner().total_pages, PAGES);
    setup.server.stop().await;
}

/// Not a test: the foreign peer of the test above, run by it as `nobody`.
#[test]
#[ignore = "a helper, run as another user by a_peer_of_another_uid_is_refused_and_a_proper_handoff_follows"]
fn as_a_foreign_peer() {
    foreign_peer::act_if_asked();
}
