//! Test support of the shim: the built library, a QEMU-like test program
//! compiled from `fake_vmm.c` running with it preloaded, and its guest
//! memory. The agent's side (hand-off listener, fault server) and the
//! process plumbing are `pageserver_test_support`'s.

#![allow(dead_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::SystemTime;

use guest_memory::memfile::{ftruncate, memfd_create};
use pageserver_test_support::{HugePages, PATIENCE, TempDir, TestChild};

/// The file name cargo gives the shim library.
const LIBRARY: &str = "libpageserver_vmm_shim.so";
/// What the library is built from (relative to this crate): a Rust source
/// newer than the library means that cargo would build it again.
const LIBRARY_SOURCES: [&str; 2] = ["src", "../guest-memory/src"];

/// `libpageserver_vmm_shim.so` in target/<profile>/, next to the deps/
/// directory this test runs from.
///
/// Cargo builds no cdylib for its own crate's integration tests (they
/// cannot link it), and a test does not run cargo: the library must have
/// been built before, in the same profile (`scripts/test` builds the whole
/// workspace). A missing or stale library fails the test with the command
/// that builds it.
pub fn shim_library() -> &'static Path {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
        let build = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "cargo build -p pageserver-vmm-shim".to_owned(),
            Some("release") => "cargo build --release -p pageserver-vmm-shim".to_owned(),
            Some(profile) => format!("cargo build --profile {profile} -p pageserver-vmm-shim"),
            None => panic!("odd test path {}", exe.display()),
        };
        let library = profile_dir.join(LIBRARY);
        let built = std::fs::metadata(&library).and_then(|m| m.modified()).unwrap_or_else(|e| {
            panic!("{}: {e}; cargo does not build it for these tests: run `{build}` first", library.display())
        });
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        for source in LIBRARY_SOURCES.map(|s| manifest_dir.join(s)) {
            if let Some((newer, _)) = newest_file(&source).filter(|(_, modified)| *modified > built) {
                panic!("{} is older than {}: run `{build}` first", library.display(), newer.display());
            }
        }
        library
    })
}

/// The most recently modified `.rs` file at or below `path`, and when.
fn newest_file(path: &Path) -> Option<(PathBuf, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        return std::fs::read_dir(path).ok()?.filter_map(|e| newest_file(&e.ok()?.path())).max_by_key(|(_, t)| *t);
    }
    let rust = path.extension().is_some_and(|extension| extension == "rs");
    rust.then_some((path.to_owned(), meta.modified().ok()?))
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

/// Guest memory for the test program: a tmpfs file (4 KiB pages) or a
/// hugetlb memfd (2 MiB pages) named by `/proc/PID/fd/N`.
pub struct MemoryFile {
    pub path: PathBuf,
    pub size: u64,
    pub page_size: u64,
    _backing: Backing,
}

enum Backing {
    Shmem(TempDir),
    Hugetlb { _memfd: OwnedFd, _huge_pages: HugePages },
}

impl MemoryFile {
    pub fn shmem(pages: u64) -> Self {
        let dir = TempDir::new("shim-memory");
        Self { path: dir.join("guest.ram"), size: pages * 4096, page_size: 4096, _backing: Backing::Shmem(dir) }
    }

    /// A hugetlb memfd; holds the huge pages (one such test at a time).
    pub fn hugetlb(pages: u64) -> Self {
        let huge_pages = HugePages::reserve(pages);
        let page_size = 2u64 << 20;
        let memfd = memfd_create("shim-test-guest", true).expect("memfd_create(MFD_HUGETLB)");
        ftruncate(memfd.as_fd(), pages * page_size).expect("ftruncate");
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), memfd.as_raw_fd()));
        Self {
            path,
            size: pages * page_size,
            page_size,
            _backing: Backing::Hugetlb { _memfd: memfd, _huge_pages: huge_pages },
        }
    }
}

/// The test program running with the shim preloaded.
pub struct FakeVmm {
    process: TestChild,
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
            .env("LD_PRELOAD", shim_library());
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PAGESERVER_SHIM_")) {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        Self { process: TestChild::spawn("fake_vmm", command) }
    }

    /// The process, for the hand-off listener and its id.
    pub fn process(&mut self) -> &mut TestChild {
        &mut self.process
    }

    /// The next stdout line; `None` at EOF.
    pub fn line(&mut self) -> Option<String> {
        self.process.line()
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
        self.process.send(command);
    }

    /// Sends one command; returns the answer line.
    pub fn request(&mut self, command: &str) -> String {
        self.send(command);
        self.line().unwrap_or_else(|| panic!("no answer to {command:?}"))
    }

    /// Closes stdin and waits for the end (the program prints "done" and
    /// exits 0 at EOF, unless the shim ended it first).
    pub fn finish(mut self) -> Finished {
        self.process.close_stdin();
        let mut stdout = Vec::new();
        while let Some(line) = self.line() {
            stdout.push(line);
        }
        let status = self.process.wait(PATIENCE);
        Finished { status, stdout, stderr: self.process.stderr() }
    }
}
