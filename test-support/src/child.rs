//! A VMM process under test: commands on its stdin, its stdout lines on a
//! channel (read by a thread, so a wait has a deadline), its stderr in a log
//! file that the test can read and that is printed when the test fails.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use crate::{PATIENCE, TempDir};

/// Lines of stderr shown when a test fails with the child still around.
const STDERR_LINES_ON_FAILURE: usize = 50;
/// How often an exit is polled for while waiting.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// A running child process; killed when dropped.
#[derive(Debug)]
pub struct TestChild {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: PathBuf,
    _log_dir: TempDir,
}

impl TestChild {
    /// Starts `command` (its stdio is set here) as `name`, for messages.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let log_dir = TempDir::new("log");
        let log = log_dir.join(&format!("{name}.log"));
        let stderr = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { name: name.to_owned(), stdin: child.stdin.take(), child, lines, log, _log_dir: log_dir }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Writes one line to its stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap_or_else(|| panic!("{}'s stdin is closed", self.name));
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to {}: {e}", self.name));
    }

    /// The next stdout line; `None` once stdout is closed. Fails the test
    /// after [`PATIENCE`] without one.
    pub fn line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("{} printed nothing for {PATIENCE:?}", self.name),
        }
    }

    /// Closes its stdin (EOF: end of commands).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Its exit status if it has exited, without waiting.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name))
    }

    /// Waits for it to exit; fails the test after `patience`.
    pub fn wait(&mut self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {patience:?}", self.name);
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
    }

    /// Fails the test if it has exited: "NAME exited (STATUS) WHILE; stderr: ...".
    pub fn assert_running(&mut self, during: &str) {
        if let Some(status) = self.exit_status() {
            panic!("{} exited ({status}) {during}; stderr:\n{}", self.name, self.stderr());
        }
    }
}

impl Drop for TestChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let stderr = self.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(STDERR_LINES_ON_FAILURE)..].join("\n");
            eprintln!("--- {} stderr (last lines) ---\n{tail}", self.name);
        }
    }
}
