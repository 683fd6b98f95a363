//! Runs one `vmm-standin` process for a test and plays the agent's side of
//! its hand-off socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use pageserver_demo::process::{WorkDir, tail_of_file};
use pageserver_demo::vmm::protocol::StandinEvent;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A running stand-in: commands in, events out, stderr in a log file that is
/// printed if the test fails. Killed when dropped.
pub struct Standin {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Standin {
    pub fn spawn(dir: &Path, name: &str, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-standin"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning vmm-standin");
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
        Self { stdin: child.stdin.take(), child, lines, log }
    }

    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("writing a command");
        stdin.flush().expect("flushing a command");
    }

    /// The next event, or a panic after [`TIMEOUT`].
    pub fn event(&mut self) -> StandinEvent {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event line {line:?}: {e}")),
            Err(RecvTimeoutError::Timeout) => panic!("no event within {TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("vmm-standin closed its stdout"),
        }
    }

    /// Sends `command` and returns the event that answers it.
    pub fn request(&mut self, command: &str) -> StandinEvent {
        self.send(command);
        self.event()
    }

    /// Closes stdin (or sends `quit`) and returns whether it exited with 0.
    pub fn finish(mut self, with_quit: bool) -> bool {
        if with_quit {
            self.send("quit");
        }
        self.stdin = None;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for vmm-standin") {
                return status.success();
            }
            assert!(Instant::now() < deadline, "vmm-standin did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- vmm-standin stderr ---\n{}", tail_of_file(&self.log, 50));
        }
    }
}

/// The agent's end of a hand-off socket.
pub struct HandoffListener {
    pub path: PathBuf,
    listener: UnixListener,
}

impl HandoffListener {
    pub fn bind(dir: &WorkDir, name: &str) -> Self {
        let path = dir.path().join(name);
        let listener = UnixListener::bind(&path).expect("binding the hand-off socket");
        listener.set_nonblocking(true).expect("non-blocking listener");
        Self { path, listener }
    }

    /// Waits for the stand-in to connect.
    pub fn accept(&self) -> UnixStream {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    return stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("no hand-off connection: {e}"),
            }
        }
    }
}

/// The stand-in's command line.
pub fn standin_args(role: &str, memory: &str, socket: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--role", role, "--memory", memory, "--vm", "test-vm", "--handoff-socket"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(socket.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Makes `pages` free 2 MiB huge pages available for the test (growing the
/// pool as root, given back when the guard drops); fails the test if it
/// cannot.
pub fn reserve_huge_pages(pages: u64) -> pageserver_demo::hugepages::HugePageReservation {
    pageserver_demo::hugepages::reserve(pages).unwrap_or_else(|e| panic!("huge pages: {e}"))
}
