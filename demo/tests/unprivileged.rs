//! Both agents and both VMM stand-ins run as an unprivileged user
//! (`nobody`, uid and gid 65534) through a whole migration: the real
//! `pageserver-demo` binary, run as that user from copies of the binaries,
//! migrates a 4 KiB-page guest, and every byte of the target's memory is
//! compared with the source's at pause time.
//!
//! While it runs, each of its children's `/proc/PID/status` is read: every
//! one must run as that user (real, effective, saved and file-system uids
//! and gids) with no capability at all (`CapPrm` and `CapEff` 0). What the
//! agents cannot do as that user must degrade, not fail: the target agent's
//! fault loop keeps its normal priority and says why (CAP_SYS_NICE). The
//! stand-ins, refused a userfaultfd that reports kernel-mode faults where
//! `vm.unprivileged_userfaultfd` is 0, use a user-mode-only one.
//!
//! Needs root (to become `nobody`) and the workspace's binaries
//! (`scripts/test`).

mod common;
mod demo_process;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::assert_every_byte_verified;
use demo_process::DemoDir;

/// `nobody`.
const UNPRIVILEGED: u32 = 65534;
/// The demo's children, by the name the kernel gives them (`comm`).
const CHILDREN: [&str; 3] = ["source-agent", "target-agent", "vmm-standin"];
/// A hang guard only.
const PATIENCE: Duration = Duration::from_secs(120);

/// What is wrong with a process's credentials, from its
/// `/proc/PID/status`: not `uid`/`gid` throughout, or any capability.
fn privileges_beyond(status: &str, uid: u32) -> Vec<String> {
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
    let mut wrong = Vec::new();
    for (name, wanted) in [("Uid:", uid), ("Gid:", uid)] {
        let ids: Vec<u32> =
            field(name).unwrap_or_default().split_whitespace().filter_map(|id| id.parse().ok()).collect();
        if ids.len() != 4 || ids.iter().any(|&id| id != wanted) {
            wrong.push(format!("{name} {ids:?}, not {wanted} (real, effective, saved, file system)"));
        }
    }
    for name in ["CapPrm:", "CapEff:", "CapAmb:"] {
        let caps = field(name).and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if caps != Some(0) {
            wrong.push(format!("{name} {caps:x?}, not 0"));
        }
    }
    wrong
}

/// The demo's children now, by pid: (name, status).
fn children_of(parent: u32) -> Vec<(u32, String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let ppid: u32 = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()?;
            let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim().to_owned();
            (ppid == parent && CHILDREN.contains(&name.as_str())).then_some((pid, name, status))
        })
        .collect()
}

#[test]
fn the_check_catches_a_privileged_process() {
    // This test runs as root with capabilities: the check must say so.
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let wrong = privileges_beyond(&own, UNPRIVILEGED);
    assert!(wrong.iter().any(|w| w.starts_with("Uid:")), "{wrong:?}");
    assert!(wrong.iter().any(|w| w.starts_with("CapEff:")), "{wrong:?}");
}

#[test]
fn both_agents_and_both_vmms_migrate_a_guest_as_nobody_without_capabilities() {
    let dir = DemoDir::new("unprivileged", Some((UNPRIVILEGED, UNPRIVILEGED)));
    let mut child = dir
        .demo(&["--memory", "16M", "--run-ms", "1500", "--vcpus", "2", "--dirty-rate", "5000"])
        .uid(UNPRIVILEGED)
        .gid(UNPRIVILEGED)
        .spawn()
        .expect("starting the demo as nobody");
    let demo = child.id();
    // Every child seen while the demo runs, by pid (the last status read).
    let mut seen: BTreeMap<u32, (String, String)> = BTreeMap::new();
    let started = Instant::now();
    loop {
        for (pid, name, status) in children_of(demo) {
            seen.insert(pid, (name, status));
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the demo did not finish; logs:\n{}", dir.all_logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = demo_process::output_of(child);
    let report = dir.report(&output);
    assert!(output.status.success(), "{}\n{}", String::from_utf8_lossy(&output.stderr), dir.all_logs());
    assert_every_byte_verified(&report);

    let mut names: Vec<&str> = seen.values().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["source-agent", "target-agent", "vmm-standin", "vmm-standin"], "the demo's children");
    for (pid, (name, status)) in &seen {
        let wrong = privileges_beyond(status, UNPRIVILEGED);
        assert!(wrong.is_empty(), "{name} (pid {pid}) is privileged: {wrong:?}\n{status}");
    }
    let target_log = std::fs::read_to_string(dir.logs().join("target-agent.log")).expect("the target agent's log");
    assert!(
        target_log.contains("fault loop keeps its normal priority") && target_log.contains("CAP_SYS_NICE"),
        "the target agent says once why its fault loop kept its priority:\n{target_log}"
    );
    assert_eq!(target_log.matches("CAP_SYS_NICE").count(), 1, "said once:\n{target_log}");
}
