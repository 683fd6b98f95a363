//! A hand-off attempt by another user, for the agents' peer-credential
//! check: the test binary runs itself again as [`NOBODY`], and that process
//! connects to the agent's hand-off socket, sends a line and prints the
//! agent's reply.
//!
//! A test binary using this has a helper test, ignored (a plain run skips
//! it), that calls [`act_if_asked`]; [`reply_to_foreign_peer`] runs that
//! test alone in the other process. The agent's socket and its directory
//! must let that user in (the test loosens their modes): otherwise the
//! kernel refuses the connection before the agent can.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The uid (and gid) of the foreign peer: `nobody`.
pub const NOBODY: u32 = 65534;
/// Tells the helper test which socket to connect to.
const SOCKET_VARIABLE: &str = "PAGESERVER_TEST_FOREIGN_PEER_SOCKET";
/// What the helper prints before the reply, to find it among the test
/// harness's output (on the line where the harness named the test).
const REPLY_PREFIX: &str = "foreign peer got: ";
/// What the foreign peer sends: not even a hand-off, so that the reply
/// says "malformed" unless the agent refused the peer first.
const MESSAGE: &[u8] = b"not a hand-off\n";

/// What a foreign peer's attempt came to.
#[derive(Debug)]
pub struct ForeignAttempt {
    /// The pid of the process that connected.
    pub pid: u32,
    /// The agent's reply line.
    pub reply: String,
}

/// Runs `helper_test` of this test binary as uid and gid [`NOBODY`]; it
/// connects to `socket`, sends a line and reports the agent's reply.
pub fn reply_to_foreign_peer(socket: &Path, helper_test: &str) -> ForeignAttempt {
    use std::os::unix::fs::PermissionsExt;
    // A copy in the temporary directory: the checkout (and so the test
    // binary) may be where `nobody` cannot go, e.g. under /root.
    let exe = std::env::current_exe().expect("this test binary's path");
    let copy = std::env::temp_dir().join(format!("pageserver-foreign-peer-{}-{helper_test}", std::process::id()));
    std::fs::copy(&exe, &copy).unwrap_or_else(|e| panic!("copying {} to {}: {e}", exe.display(), copy.display()));
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("making the copy runnable");
    let spawned = Command::new(&copy)
        .uid(NOBODY)
        .gid(NOBODY)
        .env(SOCKET_VARIABLE, socket)
        .args([helper_test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let output = spawned.and_then(|child| {
        let pid = child.id();
        child.wait_with_output().map(|output| (pid, output))
    });
    let _ = std::fs::remove_file(&copy);
    let (pid, output) = output.expect("running the test binary again as nobody");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reply =
        stdout.lines().find_map(|line| line.split_once(REPLY_PREFIX).map(|(_, reply)| reply)).unwrap_or_else(|| {
            panic!(
                "the foreign peer reported no reply ({}); stdout: {stdout}; stderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        });
    ForeignAttempt { pid, reply: reply.to_owned() }
}

/// Asserts that `helper_test`, run as [`NOBODY`], is refused by the agent on
/// `socket` for its uid, and that the refusal names its uid and pid and the
/// uids the agent accepts (`allowed`, as the agent lists them); `when`
/// names the moment in the messages.
pub fn assert_refused_as_foreign(socket: &Path, helper_test: &str, allowed: &[u32], when: &str) {
    let attempt = reply_to_foreign_peer(socket, helper_test);
    let reply: serde_json::Value = serde_json::from_str(&attempt.reply).expect("a JSON reply");
    assert_eq!(reply["ok"], false, "{when}: {reply}");
    let allowed: Vec<String> = allowed.iter().map(u32::to_string).collect();
    let expected = format!(
        "hand-off refused: peer uid {NOBODY} (pid {}) is not allowed; this agent accepts uids [{}] \
         (--handoff-allow-uid)",
        attempt.pid,
        allowed.join(", ")
    );
    assert_eq!(reply["error"], expected.as_str(), "{when}: {reply}");
}

/// In the helper test: if [`reply_to_foreign_peer`] started this process,
/// connects, sends a line and prints the reply; otherwise does nothing.
pub fn act_if_asked() {
    let Some(socket) = std::env::var_os(SOCKET_VARIABLE) else { return };
    let stream = UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("connecting to {} as uid {NOBODY}: {e}", Path::new(&socket).display()));
    (&stream).write_all(MESSAGE).expect("sending the line");
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).expect("reading the agent's reply");
    println!("{REPLY_PREFIX}{}", reply.trim_end());
}

/// Lets every user connect to the hand-off socket at `socket`: its
/// directory searchable (0755), the socket writable (0666). The agent's
/// own check is then all that stands between another user and the agent.
pub fn let_everyone_connect(socket: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let directory = socket.parent().expect("the socket's directory");
    for (path, mode) in [(directory, 0o755), (socket, 0o666)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
    }
}
