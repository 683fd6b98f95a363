//! Test support: the built shim, a QEMU-like test program compiled from
//! `fake_vmm.c`, a hand-off listener, scratch files and huge pages.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use guest_memory::sys::{ftruncate, memfd_create};

/// Longest wait for anything the test program or the shim should do.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `libpageserver_vmm_shim.so`, fresh: target/<profile>/, next to the deps/
/// directory we run from.
///
/// Cargo does not build a cdylib for its crate's integration tests (they
/// cannot link it), so the first call runs `cargo build` for it, in the same
/// target directory and profile as this test. That is quick when the
/// library is up to date.
pub fn shim_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current_exe");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
            let target_dir = profile_dir.parent().expect("target dir");
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => "dev",
                Some(other) => other,
                None => panic!("odd test path {}", exe.display()),
            };
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "pageserver-vmm-shim", "--profile", profile, "--target-dir"])
                .arg(target_dir)
                .arg("--manifest-path")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .status()
                .expect("running cargo build for the shim");
            assert!(status.success(), "building the shim library");
            let library = profile_dir.join("libpageserver_vmm_shim.so");
            assert!(library.exists(), "no {}", library.display());
            library
        })
        .clone()
}

/// The test program, compiled once per test run with the system C compiler.
pub fn fake_vmm() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_vmm.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake_vmm-{}", std::process::id()));
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("running cc (the tests need a C compiler)");
        assert!(status.success(), "compiling {}", source.display());
        out
    })
}

/// A unique name for this test's files.
pub fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("pageserver-shim-test-{}-{}-{what}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Guest memory for the test program: a tmpfs file in /dev/shm (4 KiB
/// pages) or a hugetlb memfd (2 MiB pages) named by `/proc/PID/fd/N`.
pub struct MemoryFile {
    pub path: PathBuf,
    pub size: u64,
    pub page_size: u64,
    memfd: Option<OwnedFd>,
    _huge: Option<HugePages>,
}

impl MemoryFile {
    pub fn shmem(pages: u64) -> Self {
        let path = PathBuf::from("/dev/shm").join(unique("guest.ram"));
        Self { path, size: pages * 4096, page_size: 4096, memfd: None, _huge: None }
    }

    /// A hugetlb memfd; holds the huge-page lock (one such test at a time).
    pub fn hugetlb(pages: u64) -> Self {
        let huge = HugePages::reserve(pages);
        let page_size = 2u64 << 20;
        let memfd = memfd_create(&unique("guest-huge"), true).expect("memfd_create(MFD_HUGETLB)");
        ftruncate(memfd.as_fd(), pages * page_size).expect("ftruncate");
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), memfd.as_raw_fd()));
        Self { path, size: pages * page_size, page_size, memfd: Some(memfd), _huge: Some(huge) }
    }
}

impl Drop for MemoryFile {
    fn drop(&mut self) {
        if self.memfd.is_none() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Free 2 MiB huge pages for one test at a time (grown as root and given
/// back by [`guest_memory::hugepages`]).
pub struct HugePages {
    _reservation: guest_memory::hugepages::HugePageReservation,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl HugePages {
    fn reserve(need: u64) -> Self {
        static LOCK: Mutex<()> = Mutex::new(());
        let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let reservation = guest_memory::hugepages::reserve(need).unwrap_or_else(|e| panic!("huge pages: {e}"));
        Self { _reservation: reservation, _one_at_a_time: guard }
    }
}

/// The agent's end of the hand-off socket.
pub struct Listener {
    pub path: PathBuf,
    listener: UnixListener,
}

impl Listener {
    pub fn bind() -> Self {
        let path = std::env::temp_dir().join(unique("handoff.sock"));
        let listener = UnixListener::bind(&path).expect("binding the hand-off socket");
        listener.set_nonblocking(true).expect("non-blocking listener");
        Self { path, listener }
    }

    /// The next connection from `vm` (blocking), within [`PATIENCE`]; fails
    /// with the program's stderr if it exits first.
    pub fn accept(&self, vm: &mut FakeVmm) -> UnixStream {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    return stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    if let Some(status) = vm.child.try_wait().expect("waiting for the test program") {
                        let mut stderr = String::new();
                        let _ = vm.child.stderr.take().map(|mut s| s.read_to_string(&mut stderr));
                        panic!("the test program exited ({status}) without handing off; stderr: {stderr}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("no hand-off connection: {e}"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The test program running with the shim preloaded.
pub struct FakeVmm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

/// How a run of the test program ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl FakeVmm {
    /// Starts the test program on `memory` with the shim and `env` (the
    /// PAGESERVER_SHIM_* variables; any inherited ones are removed).
    pub fn spawn(memory: &MemoryFile, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(fake_vmm());
        command
            .arg(&memory.path)
            .arg(memory.size.to_string())
            .arg(memory.page_size.to_string())
            .args(extra_args)
            .env("LD_PRELOAD", shim_library())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PAGESERVER_SHIM_")) {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("starting the test program");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines }
    }

    /// The next stdout line; `None` at EOF.
    pub fn line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("the test program said nothing for {PATIENCE:?}"),
        }
    }

    /// The "mapped ADDR SIZE" line: where guest memory is.
    pub fn mapped(&mut self) -> (u64, u64) {
        let line = self.line().expect("a mapped line");
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("mapped"), "{line}");
        let addr = words.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        let size = words.next().and_then(|s| s.parse().ok());
        (addr.expect("address"), size.expect("size"))
    }

    /// Sends one command without waiting for an answer.
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("writing a command");
    }

    /// Sends one command; returns the answer line.
    pub fn request(&mut self, command: &str) -> String {
        self.send(command);
        self.line().unwrap_or_else(|| panic!("no answer to {command:?}"))
    }

    /// Closes stdin and waits for the end (the program prints "done" and
    /// exits 0 at EOF, unless the shim ended it first).
    pub fn finish(mut self) -> Finished {
        drop(self.stdin.take());
        let mut stdout = Vec::new();
        while let Some(line) = self.line() {
            stdout.push(line);
        }
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the test program") {
                break status;
            }
            assert!(Instant::now() < deadline, "the test program did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        self.child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("reading stderr");
        Finished { status, stdout, stderr }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
