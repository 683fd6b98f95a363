//! What a demo killed with SIGKILL leaves behind, and the next run cleaning
//! it up.
//!
//! A demo that ends any other way (success, failure, SIGINT, SIGTERM) cleans
//! up after itself: its children are stopped, its work directory removed,
//! the huge pages it added to the pool given back. SIGKILL allows none of
//! that. Its children die with it (they are started with
//! `PAGESERVER_DIE_WITH_PARENT`, see [`crate::process`]), but two things
//! stay:
//!
//! - its work directory, `/dev/shm/pageserver-demo-PID-…` (sockets, logs,
//!   the snapshot, with `--vmm qemu --hugetlb` a hugetlbfs mount);
//! - the huge pages it added to `/proc/sys/vm/nr_hugepages`. Before it adds
//!   any, a demo records them in `/dev/shm/pageserver-demo-PID-hugepages-N.json`
//!   (the pool's size before, and how many it added), and removes the record
//!   once it gave them back.
//!
//! Every run calls [`clean_up`] first: whatever carries the pid of a process
//! that no longer runs (or is a zombie) is removed, a mount inside unmounted
//! first, and each record's pages are taken out of the pool again (exactly
//! those: pages someone else added meanwhile stay), which puts the pool back
//! to its size before the dead run. A record is claimed by renaming it
//! before its pages are given back, so two runs starting at once give them
//! back once. A pid reused by a live process only delays the clean-up to a
//! later run.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::hugepages::{self, HugePageError, HugePageReservation};
use serde::{Deserialize, Serialize};

/// Where work directories and records live.
pub const PARENT: &str = "/dev/shm";
/// The prefix of everything a demo leaves there: `PREFIX` + pid + `-`.
pub const PREFIX: &str = "pageserver-demo-";

/// A record of huge pages added to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePageRecord {
    pub owner_pid: u32,
    /// `nr_hugepages` before the pages were added.
    pub pool_before: u64,
    /// Pages added (what giving them back takes away).
    pub added: u64,
}

/// Huge pages reserved for one run, recorded for the next run should this
/// one be killed. Dropping it removes the record, then gives the pages back.
#[derive(Debug)]
pub struct RecordedHugePages {
    record: Option<PathBuf>,
    _reservation: HugePageReservation,
}

impl Drop for RecordedHugePages {
    fn drop(&mut self) {
        // The record goes first: killed in between, the pool stays larger,
        // and it is never shrunk twice.
        if let Some(record) = &self.record {
            let _ = std::fs::remove_file(record);
        }
    }
}

/// [`hugepages::reserve`], recorded (see the module docs).
pub fn reserve_huge_pages(need: u64) -> Result<RecordedHugePages, HugePageError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pool_before = hugepages::pool_pages()?;
    let reservation = hugepages::reserve(need)?;
    let added = reservation.added();
    let mut record = None;
    if added > 0 {
        let pid = std::process::id();
        let path =
            Path::new(PARENT).join(format!("{PREFIX}{pid}-hugepages-{}.json", NEXT.fetch_add(1, Ordering::Relaxed)));
        let text = serde_json::to_string(&HugePageRecord { owner_pid: pid, pool_before, added }).unwrap_or_default();
        match std::fs::write(&path, text + "\n") {
            Ok(()) => record = Some(path),
            Err(error) => eprintln!(
                "pageserver-demo: cannot record the {added} huge pages added in {} ({error}); if this run is \
                 killed, give them back by hand",
                path.display()
            ),
        }
    }
    Ok(RecordedHugePages { record, _reservation: reservation })
}

/// The pid in a name `PREFIX` + pid + `-…`.
fn owner_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether `pid` runs (a zombie does not).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X")),
        Err(_) => false,
    }
}

/// Removes what dead demos left in [`PARENT`]; returns one line per thing
/// removed (also printed on stderr).
pub fn clean_up() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(PARENT) else { return Vec::new() };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_of(&name) else { continue };
        if owner == std::process::id() || is_running(owner) {
            continue;
        }
        let path = entry.path();
        let outcome = if name.ends_with(".json") && name.contains("-hugepages-") {
            give_back_recorded(&path)
        } else if path.is_dir() {
            remove_work_dir(&path)
        } else {
            continue;
        };
        let line = format!("left by a killed demo (pid {owner}): {outcome}");
        eprintln!("pageserver-demo: {line}");
        done.push(line);
    }
    done
}

/// Gives back the pages of a dead run's record, once.
fn give_back_recorded(path: &Path) -> String {
    let claimed = path.with_extension(format!("cleaning-{}", std::process::id()));
    if std::fs::rename(path, &claimed).is_err() {
        return format!("{}: claimed by another run", path.display());
    }
    let record: Option<HugePageRecord> =
        std::fs::read_to_string(&claimed).ok().and_then(|text| serde_json::from_str(&text).ok());
    let outcome = match record {
        Some(record) => match hugepages::give_back(record.added) {
            Ok(()) => format!(
                "gave back the {} huge pages it added (the pool had {} before it)",
                record.added, record.pool_before
            ),
            Err(error) => format!("giving back its {} huge pages failed: {error}", record.added),
        },
        None => format!("{}: unreadable huge-page record, removed", path.display()),
    };
    let _ = std::fs::remove_file(&claimed);
    outcome
}

/// Unmounts whatever is mounted inside `dir` (a QEMU run's hugetlbfs), then
/// removes it.
fn remove_work_dir(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for mount_point in mounts.lines().filter_map(|line| line.split_whitespace().nth(1)) {
        if Path::new(mount_point).starts_with(dir) {
            let _ = std::process::Command::new("umount").arg(mount_point).status();
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => format!("removed its work directory {}", dir.display()),
        Err(error) => format!("cannot remove its work directory {}: {error}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_read_from_names() {
        assert_eq!(owner_of("pageserver-demo-123-0-456"), Some(123));
        assert_eq!(owner_of("pageserver-demo-123-hugepages-0.json"), Some(123));
        assert_eq!(owner_of("pageserver-test-log-123-0"), None);
        assert_eq!(owner_of("pageserver-demo-x-0"), None);
    }

    #[test]
    fn this_process_runs_and_a_dead_child_does_not() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        // A zombie until reaped: not running either.
        while !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z")) {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::yield_now();
        }
        assert!(!is_running(pid));
        let _ = child.wait();
        assert!(!is_running(pid));
    }
}
