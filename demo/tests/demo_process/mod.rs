//! The `pageserver-demo` binary run as a process of its own, from copies of
//! the workspace's binaries, for the tests that look at a whole migration
//! from outside: its processes' credentials, its logs. Its report (JSON)
//! and its children's logs (`--log-dir`) are kept in the run's directory.
//!
//! The copies sit in a fresh directory under /tmp that every user may
//! enter: the checkout (and so the binaries cargo built) may be where
//! another user cannot go, e.g. under /root.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use pageserver_demo::Report;
use pageserver_demo::process::bin_dir_of;

const DEMO: &str = env!("CARGO_BIN_EXE_pageserver-demo");
/// The demo and every binary it runs.
const BINARIES: [&str; 5] =
    ["pageserver-demo", "source-agent", "target-agent", "vmm-standin", "libpageserver_vmm_shim.so"];

/// A run's directory: `bin/` (the copies, everyone may run them) and
/// `out/` (the report and the logs, writable by the run's user). Removed
/// when dropped.
#[derive(Debug)]
pub struct DemoDir {
    root: PathBuf,
}

impl DemoDir {
    /// A fresh directory whose `out/` belongs to `owner` (uid, gid).
    pub fn new(name: &str, owner: Option<(u32, u32)>) -> Self {
        let root = std::env::temp_dir().join(format!("pageserver-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = Self { root };
        for sub in ["", "bin", "out", "out/logs"] {
            let path = dir.root.join(sub);
            std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
            if let (Some((uid, gid)), true) = (owner, sub.starts_with("out")) {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown the output directory");
            }
        }
        let built = bin_dir_of(Path::new(DEMO));
        for binary in BINARIES {
            let (from, to) = (built.join(binary), dir.bin(binary));
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copying {} ({e}): build the workspace", from.display()));
        }
        dir
    }

    /// A copied binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.root.join("bin").join(name)
    }

    /// The children's logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("out/logs")
    }

    /// The copied demo with `args`, writing its report and its children's
    /// logs here, run from `out/`.
    pub fn demo(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.bin("pageserver-demo"));
        command
            .current_dir(self.root.join("out"))
            .arg("--report-json")
            .arg(self.root.join("out/report.json"))
            .arg("--log-dir")
            .arg(self.logs())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// The report the run wrote, or a panic with everything the run said.
    pub fn report(&self, output: &Output) -> Report {
        let text = std::fs::read_to_string(self.root.join("out/report.json"));
        let report = text.ok().and_then(|text| serde_json::from_str(&text).ok());
        report.unwrap_or_else(|| {
            panic!(
                "the demo wrote no report ({}); stdout:\n{}\nstderr:\n{}\nlogs:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.all_logs()
            )
        })
    }

    /// Every log file of the run, each headed by its name.
    pub fn all_logs(&self) -> String {
        let mut logs: Vec<(String, String)> = std::fs::read_dir(self.logs())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let text = std::fs::read(e.path()).unwrap_or_default();
                        (e.file_name().to_string_lossy().into_owned(), String::from_utf8_lossy(&text).into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.into_iter().map(|(name, text)| format!("--- {name} ---\n{text}")).collect()
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Waits for `child` and collects its output (its stdout and stderr piped).
pub fn output_of(child: Child) -> Output {
    child.wait_with_output().expect("waiting for the demo")
}
