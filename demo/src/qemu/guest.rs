//! The QEMU test guest: its image (`guest/build.sh`: Debian's kernel, an
//! initramfs with busybox and `guest/memcheck.c`) and the verdict of its
//! memory checker, which prints `memcheck gen=N bad=B` on the serial console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::QemuError;

/// Overrides where the guest image is.
pub const GUEST_DIR_ENV: &str = "PAGESERVER_GUEST_DIR";
/// How often the serial log is read while waiting for generations.
const SERIAL_POLL: Duration = Duration::from_millis(100);
/// Checker lines kept in the verdict.
const LAST_LINES_KEPT: usize = 5;

/// Where `guest/build.sh` puts the image: `target/guest` of the workspace,
/// unless [`GUEST_DIR_ENV`] says otherwise.
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// The guest's kernel and initramfs, known to exist.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// Finds the image in [`guest_dir`]; a missing piece is an error that
    /// names the command that builds it.
    pub fn locate() -> Result<Self, QemuError> {
        let dir = guest_dir();
        let initramfs = dir.join("initramfs.cpio.gz");
        if !initramfs.is_file() {
            return Err(QemuError::GuestImageMissing { path: initramfs });
        }
        // The uncompressed kernel boots (PVH) seconds faster under TCG.
        let kernel = [dir.join("vmlinux"), dir.join("vmlinuz")]
            .into_iter()
            .find(|kernel| kernel.is_file())
            .ok_or_else(|| QemuError::GuestImageMissing { path: dir.join("vmlinuz") })?;
        Ok(Self { kernel, initramfs })
    }
}

/// Whether `qemu-system-x86_64` is on PATH.
pub fn qemu_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("qemu-system-x86_64").is_file()))
}

/// The guest's own verdict, from the target's serial console.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVerdict {
    /// `memcheck gen=N bad=B` lines the target printed after switchover.
    pub generations_after_switchover: u64,
    /// Sum of B over those lines.
    pub bad_words: u64,
    pub last_lines: Vec<String>,
}

impl GuestVerdict {
    /// The verdict of `lines` (as [`checker_lines`] returns them).
    pub fn of(lines: &[CheckerLine]) -> Self {
        Self {
            generations_after_switchover: lines.len() as u64,
            bad_words: lines.iter().map(|line| line.bad).sum(),
            last_lines: lines.iter().rev().take(LAST_LINES_KEPT).rev().map(|line| line.text.clone()).collect(),
        }
    }
}

/// One `memcheck gen=N bad=B` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckerLine {
    pub generation: u64,
    pub bad: u64,
    pub text: String,
}

/// The `memcheck gen=N bad=B` lines of a serial log.
pub fn checker_lines(log: &str) -> Vec<CheckerLine> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("memcheck gen=")? + "memcheck gen=".len()..];
            let (generation, bad) = rest.split_once(" bad=")?;
            Some(CheckerLine {
                generation: generation.trim().parse().ok()?,
                bad: bad.trim().parse().ok()?,
                text: l.trim().to_owned(),
            })
        })
        .collect()
}

/// The serial log at `path` so far (empty if QEMU has not created it yet).
pub fn read_log(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// Waits until the serial log `log` of the `qemu` ("source" or "target")
/// guest holds `count` checker lines; returns early on a bad one.
pub async fn wait_generations(
    qemu: &'static str,
    log: &Path,
    count: u64,
    timeout: Duration,
) -> Result<Vec<CheckerLine>, QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = checker_lines(&read_log(log));
        if lines.len() as u64 >= count || lines.iter().any(|line| line.bad > 0) {
            return Ok(lines);
        }
        if Instant::now() >= deadline {
            let (log, seen) = (log.to_owned(), lines.len() as u64);
            return Err(QemuError::CheckerTimeout { qemu, log, seen, want: count, after: timeout });
        }
        tokio::time::sleep(SERIAL_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_lines_and_verdict() {
        let log = "boot\nmemcheck gen=1 bad=0\nnoise memcheck gen=2 bad=3 \nmemcheck gen=x bad=0\n";
        let lines = checker_lines(log);
        assert_eq!(lines.iter().map(|l| (l.generation, l.bad)).collect::<Vec<_>>(), [(1, 0), (2, 3)]);
        let verdict = GuestVerdict::of(&lines);
        assert_eq!((verdict.generations_after_switchover, verdict.bad_words), (2, 3));
        assert_eq!(verdict.last_lines, ["memcheck gen=1 bad=0", "noise memcheck gen=2 bad=3"]);
    }
}
