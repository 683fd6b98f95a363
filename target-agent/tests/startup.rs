//! The `target-agent` binary refuses bad configuration at start, before it
//! says it is listening, and holds its hand-off socket for its whole life:
//! a second agent on the same path is refused ("in use"), a later hand-off
//! is refused with a clear reply, a regular file at the path is left alone,
//! and the stale socket of an agent that died is taken by the next one; a
//! peer not on its `--handoff-allow-uid` is refused and logged; its socket
//! is 0600, or 0660 and owned by its `--handoff-group`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use guest_memory::handoff::HandoffError;
use pageserver_proto::v1::MigrationPhase;
use pageserver_test_support::refusal::{self, assert_refused, output_of};
use pageserver_test_support::socket_access::{another_group, socket_access_of_agent};
use rustix::process::Signal;
use support::{Agent, Migration, Scratch, TARGET_AGENT, TargetVmm, wait_for_status};

/// Runs the agent with `args` to its end ([`refusal::run_to_end`]).
fn run(args: &[&str]) -> Output {
    refusal::run_to_end(TARGET_AGENT, args)
}

#[test]
fn bad_flags_are_refused_at_start() {
    let dir = Scratch::new("bad-flags");
    let socket = dir.join("t.sock").display().to_string();
    let with = |extra: &[&str]| {
        let mut args = vec!["--source", "http://127.0.0.1:9", "--handoff-socket", socket.as_str()];
        args.extend(extra);
        run(&args)
    };
    assert_refused(
        &run(&["--source", "not a url", "--handoff-socket", &socket]),
        1,
        "bad source address \"not a url\"",
    );
    assert_refused(
        &run(&["--source", "ftp://host:1", "--handoff-socket", &socket]),
        1,
        "scheme \"ftp\": write https://NAME:PORT or http://HOST:PORT",
    );
    assert_refused(
        &run(&["--source", "https://127.0.0.1:9", "--handoff-socket", &socket]),
        1,
        "https needs this agent's certificates: give --tls-cert, --tls-key and --tls-ca",
    );
    assert_refused(
        &run(&["--listen", "0.0.0.0:0", "--source", "http://127.0.0.1:9", "--handoff-socket", &socket]),
        1,
        "0.0.0.0:0 is reachable from other hosts and no TLS was configured",
    );
    assert_refused(&with(&["--max-precopy-rounds", "0"]), 2, "invalid value '0' for '--max-precopy-rounds");
    assert_refused(&with(&["--shutdown-grace", "soon"]), 2, "invalid value 'soon' for '--shutdown-grace");
    assert_refused(&with(&["--source-unreachable-timeout=-1s"]), 2, "--source-unreachable-timeout");
    assert_refused(
        &with(&["--handoff-allow-uid", "abc"]),
        2,
        "invalid value 'abc' for '--handoff-allow-uid <UID[,UID...]>': \"abc\" is not a uid",
    );
    assert_refused(&with(&["--handoff-allow-uid", "0,,1"]), 2, "\"\" is not a uid");
    let allow_from_env = output_of(
        Command::new(TARGET_AGENT)
            .env_clear()
            .env("PAGESERVER_HANDOFF_ALLOW_UID", "root")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--source", "http://127.0.0.1:9"])
            .args(["--handoff-socket", &socket]),
    );
    assert_refused(&allow_from_env, 2, "\"root\" is not a uid (a number from 0 to 4294967295) in the list \"root\"");
    assert_refused(&with(&["--listen", "nowhere"]), 1, "binding the gRPC listener nowhere");
    assert_refused(&with(&["--metrics-listen", "127.0.0.1:99999"]), 1, "binding the metrics listener 127.0.0.1:99999");
    assert!(!Path::new(&socket).exists(), "a refused start leaves no hand-off socket behind");
}

/// `PAGESERVER_DIE_WITH_PARENT` names the parent's pid; an agent whose
/// parent is not (or no longer) that one stops at once.
#[test]
fn a_bad_or_gone_parent_is_refused_at_start() {
    let dir = Scratch::new("parent");
    let socket = dir.join("t.sock").display().to_string();
    let args = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--source", "http://127.0.0.1:9"];
    let with_parent = |value: &str| {
        output_of(
            Command::new(TARGET_AGENT)
                .env_clear()
                .env("PAGESERVER_DIE_WITH_PARENT", value)
                .args(args)
                .args(["--handoff-socket", &socket]),
        )
    };
    assert_refused(&with_parent("yes"), 1, "PAGESERVER_DIE_WITH_PARENT=\"yes\" is not a process id");
    // pid 1 is not this test: as if the parent had died before the agent asked to die with it.
    let gone = with_parent("1");
    assert_refused(
        &gone,
        1,
        &format!("the parent (pid 1) is already gone (the parent is now pid {})", std::process::id()),
    );
}

#[test]
fn a_regular_file_at_the_handoff_socket_path_is_refused_and_left_alone() {
    let dir = Scratch::new("regular-file");
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"precious").expect("write");
    let output = run(&["--source", "http://127.0.0.1:9", "--handoff-socket", &path.display().to_string()]);
    assert_refused(&output, 1, "is not a socket; refusing to replace it");
    assert_eq!(std::fs::read(&path).expect("the file is still there"), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_a_socket_in_use_is_refused() {
    let dir = Scratch::new("in-use");
    let socket = dir.join("t.sock").display().to_string();
    let first = Agent::start(
        "first",
        Path::new(TARGET_AGENT),
        &["--source", "http://127.0.0.1:9", "--handoff-socket", &socket],
        &dir,
    );
    let output = run(&["--source", "http://127.0.0.1:9", "--handoff-socket", &socket]);
    assert_refused(&output, 1, "is in use");
    // The first one still has its socket, and takes a hand-off on it.
    let mut vmm = TargetVmm::new(16);
    let handed = tokio::task::spawn_blocking(move || vmm.hand_off(Path::new(&socket)).map(|()| vmm));
    handed.await.expect("hand-off thread").expect("the first agent takes the hand-off");
    drop(first);
}

/// Once it has its VM's memory, the agent keeps its socket: another agent
/// cannot take the path, and another hand-off is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_handoff_the_agent_keeps_its_socket_and_refuses_later_ones() {
    let m = Migration::start("keeps-socket", 64, &[]).await;
    wait_for_status(&m.target, "pre-copy converged", |s| s.phase() == MigrationPhase::PrecopyConverged).await;
    let socket = m.dir.join("target.sock");
    assert!(socket.exists(), "the socket stays bound after the hand-off");

    let output = run(&["--source", &m.source.url(), "--handoff-socket", &socket.display().to_string()]);
    assert_refused(&output, 1, "is in use");

    let mut other = TargetVmm::new(64);
    let refused = tokio::task::spawn_blocking(move || other.hand_off(&socket)).await.expect("hand-off thread");
    match refused {
        Err(HandoffError::Refused(why)) => {
            assert!(why.starts_with("this agent already has its VM's memory (VM \"test-vm\", VMM pid"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let status = support::status(&m.target).await;
    assert_eq!(status.phase(), MigrationPhase::PrecopyConverged, "the refused hand-off changed nothing");
}

/// An agent that dies leaves its socket file behind; nothing listens on it,
/// so the next agent replaces it and gets the VMM's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_socket_of_a_dead_agent_is_taken_by_the_next_one() {
    let dir = Scratch::new("stale");
    let socket = dir.join("t.sock").display().to_string();
    let args = ["--source", "http://127.0.0.1:9", "--handoff-socket", socket.as_str()];
    let mut first = Agent::start("first", Path::new(TARGET_AGENT), &args, &dir);
    first.signal(Signal::KILL);
    first.wait();
    assert!(Path::new(&socket).exists(), "a killed agent leaves its socket file");

    let second = Agent::start("second", Path::new(TARGET_AGENT), &args, &dir);
    assert!(second.stderr().contains("replaced a stale hand-off socket"), "{}", second.stderr());
    let mut vmm = TargetVmm::new(16);
    let handed = tokio::task::spawn_blocking(move || vmm.hand_off(Path::new(&socket)).map(|()| vmm));
    handed.await.expect("hand-off thread").expect("the new agent takes the hand-off");
}

/// `--handoff-allow-uid` reaches the binary's hand-off socket: an agent
/// that allows other uids than this test's refuses its hand-off with the
/// reason, logs a warning naming the peer's uid and pid, and goes on
/// waiting (a second attempt is refused alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_on_the_handoff_allow_list_is_refused_and_logged() {
    let dir = Scratch::new("allow-list");
    let socket = dir.join("t.sock");
    let own_uid = rustix::process::getuid().as_raw();
    let (others, listed) = (format!("{},{}", own_uid + 1, own_uid + 2), format!("[{}, {}]", own_uid + 1, own_uid + 2));
    let args = [
        "--source",
        "http://127.0.0.1:9",
        "--handoff-socket",
        &socket.display().to_string(),
        "--handoff-allow-uid",
        &others,
    ];
    let mut agent = Agent::start("allow-list", Path::new(TARGET_AGENT), &args, &dir);
    let peer = format!("peer uid {own_uid} (pid {})", std::process::id());
    for attempt in ["first", "second"] {
        let socket = socket.clone();
        let refused =
            tokio::task::spawn_blocking(move || TargetVmm::new(16).hand_off(&socket)).await.expect("hand-off thread");
        match refused {
            Err(HandoffError::Refused(why)) => assert_eq!(
                why,
                format!(
                    "hand-off refused: {peer} is not allowed; this agent accepts uids {listed} (--handoff-allow-uid)"
                ),
                "{attempt} attempt"
            ),
            other => panic!("{attempt} attempt: expected a refusal, got {other:?}"),
        }
    }
    agent.wait_for_log(&peer);
    assert!(agent.stderr().contains("WARN"), "the refusal is logged as a warning: {}", agent.stderr());
    assert!(agent.running(), "the agent goes on waiting");
}

/// The hand-off socket is mode 0600 and the agent's group's; with
/// `--handoff-group` (a group name) or `PAGESERVER_HANDOFF_GROUP` (a gid)
/// it is that group's and mode 0660; a group that does not exist is
/// refused at start.
#[test]
fn the_handoff_socket_is_shared_with_the_handoff_group_only() {
    let dir = Scratch::new("handoff-group");
    let socket = dir.join("t.sock");
    let agent = || {
        let mut command = Command::new(TARGET_AGENT);
        command.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--source", "http://127.0.0.1:9"]);
        command.arg("--handoff-socket").arg(&socket);
        command
    };
    let own_gid = rustix::process::getegid().as_raw();
    assert_eq!(socket_access_of_agent(agent(), &socket), (0o600, own_gid), "without a group");
    let (name, gid) = another_group();
    let mut by_name = agent();
    by_name.args(["--handoff-group", &name]);
    assert_eq!(socket_access_of_agent(by_name, &socket), (0o660, gid), "--handoff-group {name}");
    let mut by_gid = agent();
    by_gid.env("PAGESERVER_HANDOFF_GROUP", gid.to_string());
    assert_eq!(socket_access_of_agent(by_gid, &socket), (0o660, gid), "PAGESERVER_HANDOFF_GROUP={gid}");
    let socket = socket.display().to_string();
    assert_refused(
        &run(&[
            "--source",
            "http://127.0.0.1:9",
            "--handoff-socket",
            &socket,
            "--handoff-group",
            "no-such-group-pageserver",
        ]),
        2,
        "invalid value 'no-such-group-pageserver' for '--handoff-group <GROUP>': no group named \
         \"no-such-group-pageserver\"",
    );
}
