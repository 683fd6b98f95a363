//! The `source-agent` binary refuses bad configuration at start, before it
//! says it is listening: page sizes other than 4 KiB and 2 MiB, a memory
//! file that is not whole pages (its tail would silently go unserved) or is
//! not a file, addresses it cannot bind, a hand-off socket path that is a
//! regular file (left alone) or a socket another agent listens on, a
//! `--handoff-allow-uid` that is not a list of uids, a `--handoff-group`
//! that does not exist. And the allow-list it is given is the one its
//! hand-off socket applies; its socket is 0600, or 0660 and its group's.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::TestVmm;
use guest_memory::handoff::HandoffError;
use pageserver_test_support::refusal::{self, assert_refused, output_of};
use pageserver_test_support::socket_access::{another_group, socket_access_of_agent};

const BINARY: &str = env!("CARGO_BIN_EXE_source-agent");

/// Runs the agent with `args` to its end ([`refusal::run_to_end`]).
fn run(args: &[&str]) -> Output {
    refusal::run_to_end(BINARY, args)
}

#[test]
fn a_memory_file_that_is_not_whole_pages_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("guest.mem");
    std::fs::write(&file, vec![7u8; 8 * 4096 + 100]).expect("write");
    let path = file.display().to_string();
    assert_refused(
        &run(&["--memory-file", &path]),
        1,
        &format!(
            "memory file {path} holds 32868 bytes, not a whole number of 4096-byte pages (100 bytes past the last \
             whole page): refusing to serve a truncated guest"
        ),
    );
    // 3 MiB in 2 MiB pages: one whole page and 1 MiB more.
    std::fs::write(&file, vec![7u8; 3 << 20]).expect("write");
    assert_refused(
        &run(&["--memory-file", &path, "--page-size", "2097152"]),
        1,
        "holds 3145728 bytes, not a whole number of 2097152-byte pages (1048576 bytes past the last whole page)",
    );
    std::fs::write(&file, vec![7u8; 100]).expect("write");
    assert_refused(&run(&["--memory-file", &path]), 1, "holds 100 bytes, less than one 4096-byte page");
}

#[test]
fn bad_flags_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("guest.mem");
    std::fs::write(&file, vec![7u8; 8 * 4096]).expect("write");
    let path = file.display().to_string();
    for size in ["1000", "8192", "0", "4k"] {
        assert_refused(
            &run(&["--memory-file", &path, "--page-size", size]),
            2,
            &format!("invalid value '{size}' for '--page-size <PAGE_SIZE>'"),
        );
    }
    let here = dir.path().display().to_string();
    assert_refused(&run(&["--memory-file", &here]), 1, &format!("memory file {here} is not a regular file"));
    assert_refused(&run(&["--memory-file", &path, "--shutdown-grace", "soon"]), 2, "'--shutdown-grace");
    assert_refused(&run(&["--memory-file", &path, "--listen", "nowhere"]), 1, "binding the gRPC listener nowhere");
    assert_refused(
        &run(&["--memory-file", &path, "--metrics-listen", "127.0.0.1:99999"]),
        1,
        "binding the metrics listener 127.0.0.1:99999",
    );
}

/// `--handoff-allow-uid` (or `PAGESERVER_HANDOFF_ALLOW_UID`) that is not a
/// list of uids stops the agent before it binds anything.
#[test]
fn a_bad_handoff_allow_list_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("source.sock").display().to_string();
    assert_refused(
        &run(&["--handoff-socket", &socket, "--handoff-allow-uid", "abc"]),
        2,
        "invalid value 'abc' for '--handoff-allow-uid <UID[,UID...]>': \"abc\" is not a uid",
    );
    let from_env = output_of(Command::new(BINARY).env_clear().env("PAGESERVER_HANDOFF_ALLOW_UID", "0,-1").args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--handoff-socket",
        &socket,
    ]));
    assert_refused(&from_env, 2, "\"-1\" is not a uid (a number from 0 to 4294967295) in the list \"0,-1\"");
    assert!(!Path::new(&socket).exists(), "a refused start leaves no hand-off socket behind");
}

#[test]
fn a_regular_file_at_the_handoff_socket_path_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"precious").expect("write");
    let output = run(&["--handoff-socket", &path.display().to_string()]);
    assert_refused(&output, 1, "is not a socket; refusing to replace it");
    assert_eq!(std::fs::read(&path).expect("the file is still there"), b"precious");
}

#[test]
fn a_second_agent_on_a_socket_in_use_is_refused_and_a_dead_agents_socket_is_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("source.sock");
    let mut first = common::agent_process_waiting(&socket);
    assert_refused(&run(&["--handoff-socket", &socket.display().to_string()]), 1, "is in use");
    assert!(first.try_wait().expect("try_wait").is_none(), "the first agent goes on");
    first.kill().expect("kill");
    first.wait().expect("wait");
    assert!(socket.exists(), "a killed agent leaves its socket file");
    let mut second = common::agent_process_waiting(&socket);
    second.kill().expect("kill");
    second.wait().expect("wait");
}

/// `PAGESERVER_HANDOFF_ALLOW_UID` reaches the binary's hand-off socket: an
/// agent that allows another uid than this test's refuses its hand-off with
/// the reason, logs a warning naming the peer's uid and pid, and goes on
/// waiting (a second attempt is refused alike).
#[test]
fn a_peer_not_on_the_handoff_allow_list_is_refused_and_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("source.sock");
    let log = dir.path().join("agent.log");
    let other_uid = rustix::process::getuid().as_raw() + 1;
    let mut child = Command::new(BINARY)
        .env("PAGESERVER_HANDOFF_ALLOW_UID", other_uid.to_string())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--handoff-socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn source-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the listening line");
    let own = format!("peer uid {} (pid {})", rustix::process::getuid().as_raw(), std::process::id());
    for attempt in ["first", "second"] {
        match TestVmm::new(8).hand_off(&socket) {
            Err(HandoffError::Refused(why)) => assert_eq!(
                why,
                format!(
                    "hand-off refused: {own} is not allowed; this agent accepts uids [{other_uid}] (--handoff-allow-uid)"
                ),
                "{attempt} attempt"
            ),
            other => panic!("{attempt} attempt: expected a refusal, got {other:?}"),
        }
    }
    let running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill");
    child.wait().expect("wait");
    let stderr = std::fs::read_to_string(&log).expect("the log");
    assert!(running, "the agent goes on waiting: {stderr}");
    assert!(
        stderr.lines().any(|line| line.contains("WARN") && line.contains(&own)),
        "no warning naming {own}: {stderr}"
    );
}

/// The hand-off socket is mode 0600 and the agent's group's; with
/// `PAGESERVER_HANDOFF_GROUP` (a group name) or `--handoff-group` (a gid)
/// it is that group's and mode 0660; a group that does not exist is refused
/// at start.
#[test]
fn the_handoff_socket_is_shared_with_the_handoff_group_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("source.sock");
    let agent = || {
        let mut command = Command::new(BINARY);
        command.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--handoff-socket"]).arg(&socket);
        command
    };
    let own_gid = rustix::process::getegid().as_raw();
    assert_eq!(socket_access_of_agent(agent(), &socket), (0o600, own_gid), "without a group");
    let (name, gid) = another_group();
    let mut by_name = agent();
    by_name.env("PAGESERVER_HANDOFF_GROUP", &name);
    assert_eq!(socket_access_of_agent(by_name, &socket), (0o660, gid), "PAGESERVER_HANDOFF_GROUP={name}");
    let mut by_gid = agent();
    by_gid.args(["--handoff-group", &gid.to_string()]);
    assert_eq!(socket_access_of_agent(by_gid, &socket), (0o660, gid), "--handoff-group {gid}");
    let socket = socket.display().to_string();
    assert_refused(
        &run(&["--handoff-socket", &socket, "--handoff-group", "no-such-group-pageserver"]),
        2,
        "invalid value 'no-such-group-pageserver' for '--handoff-group <GROUP>': no group named \
         \"no-such-group-pageserver\"",
    );
}
