//! An agent binary that must refuse to start: run it to its end (killed if
//! it starts instead), and check that it failed with the expected message
//! before ever saying it was listening.
#![forbid(unsafe_code)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// How long an agent that should refuse may run before it counts as having
/// started instead (a hang guard, not a deadline under test).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Runs `binary` with `args` (port-0 listeners unless given) and an empty
/// environment, and returns its output once it exited by itself.
pub fn run_to_end(binary: &str, args: &[&str]) -> Output {
    let mut command = Command::new(binary);
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    if !args.contains(&"--metrics-listen") {
        command.args(["--metrics-listen", "127.0.0.1:0"]);
    }
    output_of(command.env_clear().args(args))
}

/// Runs `command` to its end: one that should have refused to start and
/// runs instead is killed, and the test panics.
pub fn output_of(command: &mut Command) -> Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning the agent");
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match waited.recv_timeout(HANG_GUARD) {
        Ok(output) => output.expect("waiting for the agent"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("the agent started instead of refusing to");
        }
    }
}

/// It failed with `code`, said `needle` on stderr, and never said it was
/// listening.
pub fn assert_refused(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    assert!(output.stdout.is_empty(), "it said it was listening: {}", String::from_utf8_lossy(&output.stdout));
}
