//! The child processes of a migration: finding the binaries (built
//! beforehand: `scripts/demo` and `scripts/test` build the workspace),
//! spawning them with piped stdin/stdout and stderr in a log file, reading
//! their JSON lines (an agent's `listening` line, a stand-in's events), and
//! killing them when the migration ends (also on error: every child is
//! killed when dropped).
//!
//! Every child is started with `PAGESERVER_DIE_WITH_PARENT` set to the
//! demo's pid: the agents and the VMM stand-ins then ask the kernel to kill
//! them when the demo dies ([`pageserver_parent_death`]), so that not even a
//! demo killed with SIGKILL leaves them running. The kernel does so when the
//! *thread* that started them ends: they are started from the thread that
//! runs the migration (the future is never moved to a spawned task), which
//! lives as long as the run. (QEMU ignores the variable: a `--vmm qemu` run
//! killed with SIGKILL leaves its QEMUs running.)

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

/// Overrides the directory the binaries are taken from.
pub const BIN_DIR_ENV: &str = "PAGESERVER_BIN_DIR";
/// What builds every binary a migration runs (the VMM shim is a cdylib,
/// which `cargo build --bins` or a test build leaves out).
pub const BUILD_COMMAND: &str = "cargo build --release --workspace";
/// Lines of a child's log shown when it fails.
const LOG_TAIL_LINES: usize = 30;

/// Why a child process could not be found, started or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot locate the current executable: {0}")]
    CurrentExe(#[source] io::Error),
    #[error(
        "{binary} not found in {dir}{from_env}: build the workspace first \
         (`{BUILD_COMMAND}`; `scripts/demo` and `scripts/test` do)",
        dir = dir.display(),
        from_env = if *from_env { format!(" (set by {BIN_DIR_ENV})") } else { String::new() }
    )]
    Missing { binary: &'static str, dir: PathBuf, from_env: bool },
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name}: {context}: {source}")]
    Io {
        name: String,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{name} exited ({status}); last lines of its log:\n{log_tail}")]
    Exited { name: String, status: String, log_tail: String },
    #[error("timed out after {after:.1?} waiting for {what} from {name}")]
    Timeout { name: String, what: String, after: Duration },
    #[error("{name} reported an error: {message}")]
    Reported { name: String, message: String },
    #[error("{name} printed an unexpected line {line:?}: {reason}")]
    Protocol { name: String, line: String, reason: String },
}

/// Where the three binaries a migration runs live.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub source_agent: PathBuf,
    pub target_agent: PathBuf,
    pub vmm_standin: PathBuf,
    /// The LD_PRELOAD library for QEMU.
    pub vmm_shim: PathBuf,
    /// `pageserver-migrate`, which drives QEMU migrations; only they need
    /// it ([`Binaries::migrate`]).
    pageserver_migrate: PathBuf,
}

const BINARY_NAMES: [&str; 4] = ["source-agent", "target-agent", "vmm-standin", "libpageserver_vmm_shim.so"];
const MIGRATE_BINARY: &str = "pageserver-migrate";

impl Binaries {
    fn in_dir(dir: &Path) -> Self {
        Self {
            source_agent: dir.join(BINARY_NAMES[0]),
            target_agent: dir.join(BINARY_NAMES[1]),
            vmm_standin: dir.join(BINARY_NAMES[2]),
            vmm_shim: dir.join(BINARY_NAMES[3]),
            pageserver_migrate: dir.join(MIGRATE_BINARY),
        }
    }

    /// `pageserver-migrate`, if it is there.
    pub fn migrate(&self) -> Result<&Path, ProcessError> {
        if self.pageserver_migrate.is_file() {
            return Ok(&self.pageserver_migrate);
        }
        let dir = self.pageserver_migrate.parent().unwrap_or(Path::new(".")).to_owned();
        Err(ProcessError::Missing { binary: MIGRATE_BINARY, dir, from_env: std::env::var_os(BIN_DIR_ENV).is_some() })
    }

    fn missing(&self) -> Option<&'static str> {
        [&self.source_agent, &self.target_agent, &self.vmm_standin, &self.vmm_shim]
            .into_iter()
            .zip(BINARY_NAMES)
            .find_map(|(path, name)| (!path.is_file()).then_some(name))
    }

    /// Finds the binaries: in `$PAGESERVER_BIN_DIR` if set, else next to the
    /// current executable (or one level up from a `deps` directory, as for
    /// integration tests). Nothing is built here: a missing binary is an
    /// error that names the command that builds it.
    pub fn locate() -> Result<Self, ProcessError> {
        let (dir, from_env) = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) => (PathBuf::from(dir), true),
            None => (bin_dir_of(&std::env::current_exe().map_err(ProcessError::CurrentExe)?), false),
        };
        let binaries = Self::in_dir(&dir);
        match binaries.missing() {
            Some(binary) => Err(ProcessError::Missing { binary, dir, from_env }),
            None => Ok(binaries),
        }
    }
}

/// The directory cargo puts binaries in, seen from `exe`.
pub fn bin_dir_of(exe: &Path) -> PathBuf {
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|name| name == "deps") { dir.parent().unwrap_or(dir) } else { dir }.to_path_buf()
}

/// A fresh directory under /dev/shm, removed when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn create() -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = PathBuf::from(format!(
            "/dev/shm/pageserver-demo-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("pageserver-demo: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Where an agent listens, from its `listening` line.
#[derive(Debug, Clone)]
pub struct AgentAddrs {
    pub grpc: String,
    /// Prometheus metrics: `http://METRICS/metrics`.
    pub metrics: String,
}

/// A running child: commands go to its stdin, JSON lines come from its
/// stdout, stderr goes to `<log dir>/<name>.log`. Killed when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: tokio::process::Child,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log_path: PathBuf,
}

impl ChildProcess {
    pub fn spawn(name: &str, program: &Path, args: &[impl AsRef<OsStr>], log_dir: &Path) -> Result<Self, ProcessError> {
        Self::spawn_with_env(name, program, args, &[], log_dir)
    }

    /// Like [`ChildProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[impl AsRef<OsStr>],
        env: &[(&str, &OsStr)],
        log_dir: &Path,
    ) -> Result<Self, ProcessError> {
        let spawn_error = |source| ProcessError::Spawn { name: name.to_owned(), program: program.to_owned(), source };
        let log_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(spawn_error)?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env(pageserver_parent_death::ENV, std::process::id().to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|out| BufReader::new(out).lines());
        Ok(Self { name: name.to_owned(), child, stdin, stdout, log_path })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sends one command line.
    pub async fn send(&mut self, command: &str) -> Result<(), ProcessError> {
        let name = self.name.clone();
        let io_error = |source| ProcessError::Io { name: name.clone(), context: "writing a command", source };
        let stdin = self.stdin.as_mut().ok_or_else(|| io_error(io::ErrorKind::BrokenPipe.into()))?;
        let line = format!("{command}\n");
        match stdin.write_all(line.as_bytes()).await {
            Ok(()) => stdin.flush().await.map_err(io_error),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(self.exited().await),
            Err(e) => Err(io_error(e)),
        }
    }

    /// The next JSON line on stdout (other lines are skipped), waiting at
    /// most until `deadline`. `what` names what we wait for, for errors.
    pub async fn next_json(&mut self, what: &str, deadline: Instant) -> Result<serde_json::Value, ProcessError> {
        loop {
            let lines = self.stdout.as_mut().ok_or_else(|| ProcessError::Io {
                name: self.name.clone(),
                context: "reading stdout",
                source: io::ErrorKind::BrokenPipe.into(),
            })?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(remaining, lines.next_line()).await {
                Err(_) => {
                    return Err(ProcessError::Timeout {
                        name: self.name.clone(),
                        what: what.to_owned(),
                        after: remaining,
                    });
                }
                Ok(Err(source)) => {
                    return Err(ProcessError::Io { name: self.name.clone(), context: "reading stdout", source });
                }
                Ok(Ok(None)) => return Err(self.exited().await),
                Ok(Ok(Some(line))) => line,
            };
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(value) if value.is_object() => return Ok(value),
                _ if line.trim().is_empty() => {}
                _ => eprintln!("pageserver-demo: {} said: {line}", self.name),
            }
        }
    }

    /// Reads an agent's `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`
    /// line (other lines before it are skipped); its later output is drained.
    pub async fn wait_listening(&mut self, deadline: Instant) -> Result<AgentAddrs, ProcessError> {
        loop {
            let line = self.next_json("the \"listening\" line", deadline).await?;
            if line["event"] != "listening" {
                continue;
            }
            let addr = |key: &str| {
                line[key].as_str().map(str::to_owned).ok_or_else(|| ProcessError::Protocol {
                    name: self.name.clone(),
                    line: line.to_string(),
                    reason: format!("no \"{key}\" address"),
                })
            };
            let addrs = AgentAddrs { grpc: addr("grpc")?, metrics: addr("metrics")? };
            self.drain_stdout();
            return Ok(addrs);
        }
    }

    /// Keeps reading (and dropping) stdout in the background, so that a
    /// chatty child never blocks on a full pipe once we stop listening.
    pub fn drain_stdout(&mut self) {
        if let Some(mut lines) = self.stdout.take() {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
    }

    /// Whether the child has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The error describing the child's exit (waits briefly for it).
    pub async fn exited(&mut self) -> ProcessError {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("status unknown: {e}"),
            Err(_) => "closed its output but still runs".to_owned(),
        };
        ProcessError::Exited { name: self.name.clone(), status, log_tail: self.log_tail() }
    }

    /// The last lines of the child's stderr.
    pub fn log_tail(&self) -> String {
        tail_of_file(&self.log_path, LOG_TAIL_LINES)
    }

    /// The child's pid, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` to the child (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<(), ProcessError> {
        let pid = self.child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        let pid = pid.ok_or_else(|| ProcessError::Io {
            name: self.name.clone(),
            context: "signalling",
            source: io::ErrorKind::NotFound.into(),
        })?;
        rustix::process::kill_process(pid, signal).map_err(|e| ProcessError::Io {
            name: self.name.clone(),
            context: "signalling",
            source: e.into(),
        })
    }

    /// SIGKILL, as a crash would, and waits for the child to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops an agent as an operator would: SIGTERM, then up to `grace` for
    /// it to finish, then SIGKILL. Returns its exit code (`None` if it had to
    /// be killed or died of a signal).
    pub async fn terminate(&mut self, grace: Duration) -> Option<i32> {
        if let Some(pid) = self.child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Asks the child to quit (closes stdin after `quit`), waits up to
    /// `grace`, then kills it.
    pub async fn shut_down(&mut self, quit_command: Option<&str>, grace: Duration) {
        if let (Some(command), Some(stdin)) = (quit_command, self.stdin.as_mut()) {
            let _ = stdin.write_all(format!("{command}\n").as_bytes()).await;
            let _ = stdin.flush().await;
        }
        self.stdin = None;
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// The last `lines` lines of a text file, indented, or why there are none.
pub fn tail_of_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            if tail.is_empty() {
                "    (empty)".to_owned()
            } else {
                tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
            }
        }
        Err(e) => format!("    (cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bin_dir_skips_deps() {
        assert_eq!(bin_dir_of(Path::new("/t/debug/deps/migration-123")), PathBuf::from("/t/debug"));
        assert_eq!(bin_dir_of(Path::new("/t/release/pageserver-demo")), PathBuf::from("/t/release"));
    }

    #[test]
    fn work_dir_is_removed_on_drop() {
        let dir = WorkDir::create().unwrap();
        let path = dir.path().to_owned();
        std::fs::write(path.join("x"), b"y").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = WorkDir::create().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail_of_file(&path, 2), "    b\n    c");
    }
}
