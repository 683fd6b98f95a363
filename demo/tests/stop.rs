//! The demo leaves nothing behind, whatever stops it: the real
//! `pageserver-demo` binary with a small hugetlbfs guest, stopped mid-run.
//!
//! - SIGTERM (like SIGINT): its children are stopped, its work directory is
//!   removed and the huge pages it added are given back before it exits;
//! - SIGKILL: its children die with it (`PAGESERVER_DIE_WITH_PARENT`), and
//!   the next demo run removes its work directory and gives its huge pages
//!   back.
//!
//! A child is found by its command line, which names the run's work
//! directory (`/proc/PID/cmdline`); a zombie counts as gone. Needs root and
//! the workspace's binaries (`scripts/test`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use pageserver_demo::leftovers::{PARENT, PREFIX, is_running};

const DEMO: &str = env!("CARGO_BIN_EXE_pageserver-demo");
/// A hang guard only: no test measures time with it.
const PATIENCE: Duration = Duration::from_secs(180);

/// One run at a time: both touch the huge-page pool.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let field = |name: &str| -> u64 {
        meminfo.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"))
}

fn nr_hugepages() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages").expect("nr_hugepages").trim().parse().expect("a number")
}

/// A running demo: its stdout lines, its stderr in a file.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Demo {
    /// A hugetlbfs run whose guest runs for ten minutes after the switchover,
    /// large enough that the huge pages free now are too few: it adds some.
    fn start_long_hugetlbfs_run(name: &str) -> Self {
        let log = std::env::temp_dir().join(format!("pageserver-demo-test-{}-{name}.log", std::process::id()));
        // The run needs 2 × (its 2 MiB pages) + 8.
        let memory = format!("{}M", 2 * (free_huge_pages() / 2 + 1).max(16));
        let mut child = Command::new(DEMO)
            .args(["--hugetlb", "--memory", &memory, "--run-ms", "600000"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting pageserver-demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, log }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a progress line containing `needle`.
    fn wait_for_line(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no {needle:?} line; stderr:\n{}", self.stderr()),
                Err(RecvTimeoutError::Disconnected) => panic!("exited before {needle:?}; stderr:\n{}", self.stderr()),
            }
        }
    }

    /// Its work directory (the one directory carrying its pid).
    fn work_dir(&self) -> PathBuf {
        let dirs = owned_by(self.child.id(), |path| path.is_dir());
        assert_eq!(dirs.len(), 1, "one work directory: {dirs:?}");
        dirs[0].clone()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the demo did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    /// A demo still running (a failed test) gets to clean up after itself.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal("-TERM");
            let deadline = Instant::now() + PATIENCE;
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What in /dev/shm carries `pid` and passes `keep`.
fn owned_by(pid: u32, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let prefix = format!("{PREFIX}{pid}-");
    let entries = std::fs::read_dir(PARENT).expect("read /dev/shm");
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .filter(|path| keep(path))
        .collect()
}

/// The huge-page records of `pid`.
fn records_of(pid: u32) -> Vec<PathBuf> {
    owned_by(pid, |path| path.to_string_lossy().contains("-hugepages-"))
}

/// Running processes whose command line names `dir`.
fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && is_running(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits until no running process names `dir` (a hang guard).
fn wait_until_none_uses(dir: &Path) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = processes_using(dir);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A run at its switchover: its work directory, with its four children
/// (two agents, two VMM stand-ins) running, and its huge pages recorded.
fn mid_run(name: &str) -> (Demo, PathBuf) {
    let demo = Demo::start_long_hugetlbfs_run(name);
    demo.wait_for_line("switchover:");
    let work = demo.work_dir();
    let children = processes_using(&work);
    assert_eq!(children.len(), 4, "both agents and both stand-ins run: {children:?}");
    assert_eq!(records_of(demo.child.id()).len(), 1, "the huge pages it added are recorded");
    (demo, work)
}

#[test]
fn sigterm_stops_the_children_removes_the_work_dir_and_gives_the_huge_pages_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pool = nr_hugepages();
    let (mut demo, work) = mid_run("sigterm");
    assert!(nr_hugepages() > pool, "the run added huge pages");
    demo.signal("-TERM");
    let exit = demo.wait();
    let stderr = demo.stderr();
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert_eq!(processes_using(&work), Vec::new(), "children left running");
    assert!(!work.exists(), "the work directory is still there");
    assert_eq!(records_of(demo.child.id()), Vec::<PathBuf>::new());
    assert_eq!(nr_hugepages(), pool, "the huge pages it added were not given back");
}

#[test]
fn sigkill_takes_the_children_along_and_the_next_run_cleans_up() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pool = nr_hugepages();
    let (mut demo, work) = mid_run("sigkill");
    let pid = demo.child.id();
    demo.signal("-KILL");
    demo.wait();
    wait_until_none_uses(&work);
    assert!(work.exists(), "nothing could remove the work directory of a killed demo");
    assert_eq!(records_of(pid).len(), 1, "its huge pages are still recorded");
    assert!(nr_hugepages() > pool, "its huge pages are still in the pool");

    let next = Command::new(DEMO).args(["--memory", "16M", "--run-ms", "100"]).output().expect("the next run");
    let stderr = String::from_utf8_lossy(&next.stderr);
    assert!(next.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("left by a killed demo (pid {pid}): removed its work directory")), "{stderr}");
    assert!(stderr.contains(&format!("left by a killed demo (pid {pid}): gave back the")), "{stderr}");
    assert!(!work.exists(), "the next run left the work directory");
    assert_eq!(records_of(pid), Vec::<PathBuf>::new());
    assert_eq!(nr_hugepages(), pool, "the next run did not give the huge pages back");
}
