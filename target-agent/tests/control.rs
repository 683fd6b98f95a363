//! The target agent's gRPC API and hand-off socket before any migration:
//! a real server on 127.0.0.1 and a real Unix socket.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_memory::RegionLayout;
use guest_memory::handoff::{FdKind, HANDOFF_VERSION, HandoffError, HandoffMessage, Role, send_handoff};
use guest_memory::{MemoryMap, Userfaultfd, memfile};
use pageserver_agent_shell::PeerAllowList;
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationPhase, SwitchoverRequest};
use pageserver_test_support::foreign_peer::{self, NOBODY};
use target_agent::agent::{TargetAgent, TargetConfig};

mod support;
use support::TargetVmm;

struct Running {
    client: MigrationTargetClient<tonic::transport::Channel>,
    socket: std::path::PathBuf,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(name: &str) -> Running {
    let dir = std::env::temp_dir().join(format!("target-agent-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("target.sock");
    // Nothing listens at the source's address: the agent must not need the
    // source before a VMM has handed its memory over.
    let agent = TargetAgent::new(TargetConfig::new("http://127.0.0.1:9", &socket, "test-vm"));
    tokio::spawn(agent.clone().run());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let limits = pageserver_agent_shell::GrpcLimits::default();
        target_agent::service::serve(
            listener,
            agent,
            &limits,
            pageserver_agent_shell::GrpcSecurity::loopback_plaintext(),
            std::future::pending(),
        )
        .await
    });
    let client = MigrationTargetClient::connect(format!("http://{addr}")).await.expect("connect");
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { client, socket, _dir: TempDir(dir) }
}

#[tokio::test]
async fn switchover_before_the_handoff_is_refused() {
    let mut t = start("early").await;
    let status = t.client.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner();
    assert_eq!(status.phase(), MigrationPhase::WaitingForHandoff);
    let err = t.client.switchover(SwitchoverRequest::default()).await.expect_err("Switchover must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("hand-off"), "{err}");
}

/// Once the VMM hears its hand-off was taken, `Switchover` is accepted,
/// even though the agent has not reached its source yet (nothing listens
/// there: it keeps trying, for a minute, in phase `waiting_for_handoff`).
/// An orchestrator that restarted a target agent mid-migration switches
/// over as soon as the VMM has handed its memory over again; before this,
/// that Switchover was refused with "no guest memory yet" whenever it came
/// before the agent's first contact with the source (a QEMU chaos test
/// failed on it).
#[tokio::test]
async fn switchover_right_after_the_handoff_is_accepted() {
    let t = start("right-after").await;
    let socket = t.socket.clone();
    // The VMM's hand-off connection stays open (its end would mean the VMM left).
    let vmm = tokio::task::spawn_blocking(move || {
        let mut vmm = TargetVmm::new(16);
        vmm.hand_off(&socket).expect("a hand-off taken");
        vmm
    })
    .await
    .expect("the VMM's hand-off");
    switchover_is_taken_before_the_source(&t).await;
    drop(vmm);
}

/// The agent has a VMM's memory but cannot reach its source (nothing
/// listens there): it still says `waiting_for_handoff`, and takes a
/// Switchover.
async fn switchover_is_taken_before_the_source(t: &Running) {
    let mut client = t.client.clone();
    let status = client.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner();
    assert_eq!(status.phase(), MigrationPhase::WaitingForHandoff, "the source is unreachable: not started yet");
    let reply = client.switchover(SwitchoverRequest::default()).await.expect("Switchover after the hand-off");
    assert_eq!(reply.into_inner().phase(), MigrationPhase::Postcopy);
}

/// A target VMM's memory, registered MINOR|MISSING like the real thing.
fn target_vmm(pages: u64) -> (std::os::fd::OwnedFd, MemoryMap, Userfaultfd) {
    let len = pages * 4096;
    let memfd = memfile::memfd_create("target-test", false).expect("memfd");
    memfile::ftruncate(memfd.as_fd(), len).expect("ftruncate");
    let map = MemoryMap::map(memfd.as_fd(), 0, len as usize, true).expect("mmap");
    let region = RegionLayout { base_host_virt_addr: map.addr(), size: len, offset: 0, page_size: 4096 };
    let uffd = Userfaultfd::for_role(Role::Target, &region).expect("a MINOR|MISSING userfaultfd");
    (memfd, map, uffd)
}

#[tokio::test]
async fn malformed_handoffs_get_a_clear_refusal() {
    let t = start("malformed").await;
    let socket = t.socket.clone();
    tokio::task::spawn_blocking(move || {
        let (memfd, map, uffd) = target_vmm(16);
        let message = |role, fds, size| HandoffMessage {
            version: HANDOFF_VERSION,
            role,
            vm: "test-vm".into(),
            pid: std::process::id(),
            regions: vec![RegionLayout { base_host_virt_addr: map.addr(), size, offset: 0, page_size: 4096 }],
            fds,
            previous_handoffs: 0,
            checkpoint: None,
        };
        let refusal = |msg: &HandoffMessage, fds: &[std::os::fd::BorrowedFd<'_>]| {
            let stream = UnixStream::connect(&socket).expect("connect");
            match send_handoff(&stream, msg, fds) {
                Err(HandoffError::Refused(why)) => why,
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        let all = [memfd.as_fd(), uffd.as_fd(), pagemap.as_fd()];
        let kinds = vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap];
        let why = refusal(&message(Role::Source, kinds.clone(), 16 * 4096), &all);
        assert!(why.contains("Source") && why.contains("Target"), "{why}");
        let why = refusal(&message(Role::Target, kinds.clone(), 64 * 4096), &all);
        assert!(why.contains("memory file has"), "{why}");
        let why = refusal(&message(Role::Target, kinds.clone(), 16 * 4096), &[memfd.as_fd(), uffd.as_fd()]);
        assert!(why.contains("attached"), "{why}");
        // The descriptors swapped: the "uffd" is a memfd.
        let why = refusal(&message(Role::Target, kinds, 16 * 4096), &[uffd.as_fd(), memfd.as_fd(), pagemap.as_fd()]);
        assert!(why.contains("not what it claims"), "{why}");
    })
    .await
    .expect("hand-off attempts");
    let mut client = t.client.clone();
    let status = client.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner();
    assert_eq!(status.phase(), MigrationPhase::WaitingForHandoff, "a refused hand-off must leave the agent waiting");
}

/// A peer of another uid (`nobody`, while the agent allows only its own) is
/// refused by its credentials, with a reply naming its uid and pid, before
/// and after the hand-off; the agent goes on accepting, and a proper
/// hand-off in between is taken. The socket is opened to everyone for this,
/// so that the agent's check, not the socket's mode, is what refuses.
#[tokio::test]
async fn a_peer_of_another_uid_is_refused_and_a_proper_handoff_follows() {
    let t = start("foreign-peer").await;
    let socket = t.socket.clone();
    let own_uid = PeerAllowList::own_uid().uids()[0];
    assert_ne!(own_uid, NOBODY, "the test must not run as the foreign peer's user");
    let vmm = tokio::task::spawn_blocking(move || {
        foreign_peer::let_everyone_connect(&socket);
        let refused_as_foreign =
            |when: &str| foreign_peer::assert_refused_as_foreign(&socket, "as_a_foreign_peer", &[own_uid], when);
        refused_as_foreign("before the hand-off");
        let mut vmm = TargetVmm::new(16);
        vmm.hand_off(&socket).expect("a hand-off taken");
        refused_as_foreign("after the hand-off");
        vmm
    })
    .await
    .expect("the foreign peer and the VMM");
    switchover_is_taken_before_the_source(&t).await;
    drop(vmm);
}

/// Not a test: the foreign peer of the test above, run by it as `nobody`.
#[test]
#[ignore = "a helper, run as another user by a_peer_of_another_uid_is_refused_and_a_proper_handoff_follows"]
fn as_a_foreign_peer() {
    foreign_peer::act_if_asked();
}
