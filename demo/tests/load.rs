//! Load and leaks: many vCPU threads faulting at once on two cores, many
//! vCPUs on hugetlbfs, fifty source-agent restarts in one migration, and
//! twenty migrations back to back. Every byte is verified after each; the
//! restarts must leave the target agent's descriptors, threads and private
//! memory where they were, and the back-to-back runs nothing behind.
//!
//! Needs root and the workspace's binaries (`scripts/test`).

mod common;

use common::{MIB, assert_every_byte_verified, hold_bitmap, migrate, migrate_alone, one_at_a_time, options};
use pageserver_demo::MigrationOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_guest_threads_faulting_at_once_on_two_cores() {
    let r = migrate(MigrationOptions { vcpus: 64, dirty_rate: 20_000, ..options(64 * MIB) }).await;
    assert_eq!(r.vcpus, 64);
    assert_every_byte_verified(&r);
    assert!(r.faults_total > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_vcpus_on_hugetlbfs() {
    let r = migrate(MigrationOptions { vcpus: 16, hugetlb: true, dirty_rate: 400, ..options(128 * MIB) }).await;
    assert_eq!(r.page_size, 2 * MIB);
    assert_every_byte_verified(&r);
}

/// Fifty source-agent restarts while the guest runs on the target (the
/// final bitmap held back, so the target keeps needing the source): the
/// target agent reconnects through all of them and ends with what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_source_agent_restarts_leak_no_descriptor_thread_or_memory() {
    let events = vec!["kill-source-agent@postcopy"; 50].join(",");
    let r = migrate(MigrationOptions {
        chaos: events.split(',').map(|e| e.parse().expect("event")).collect(),
        run_ms: 8_000,
        hooks: hold_bitmap(6_000),
        ..options(64 * MIB)
    })
    .await;
    assert_every_byte_verified(&r);
    assert_eq!(r.handoffs["source"], 51);
    let [before, after] = r.target_agent_resources.expect("the target agent was sampled");
    println!("target agent before the first restart: {before:?}; at the end: {after:?}");
    // Flat: a leak of one descriptor or thread per restart would show 50.
    assert!(after.fds <= before.fds + 5, "descriptors grew: {before:?} -> {after:?}");
    assert!(after.threads <= before.threads + 2, "threads grew: {before:?} -> {after:?}");
    assert!(after.rss_anon_kib <= before.rss_anon_kib + 16 * 1024, "private memory grew: {before:?} -> {after:?}");
}

/// What a migration may leave behind: processes it started, work
/// directories, huge pages.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    children: Vec<u32>,
    work_dirs: usize,
    huge_pages: String,
}

fn leftovers() -> Leftovers {
    let me = std::process::id().to_string();
    let children = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent's pid.
            stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)) == Some(me.as_str())
        })
        .collect();
    let work_dirs = std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .filter(|entry| {
            entry.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with(&format!("pageserver-demo-{me}-")))
        })
        .count();
    let huge_pages = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").expect("nr_hugepages").trim().to_owned();
    Leftovers { children, work_dirs, huge_pages }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_migrations_back_to_back_leave_nothing_behind() {
    let alone = one_at_a_time().await;
    let before = leftovers();
    for run in 0..20u64 {
        let hugetlb = run % 4 == 3;
        let memory = if hugetlb { 32 * MIB } else { 16 * MIB };
        let r = migrate_alone(
            &alone,
            MigrationOptions {
                hugetlb,
                seed: run + 1,
                run_ms: 100,
                dirty_rate: if hugetlb { 100 } else { 5_000 },
                ..options(memory)
            },
        )
        .await;
        assert_every_byte_verified(&r);
    }
    assert_eq!(leftovers(), before, "processes, /dev/shm work directories or huge pages left behind");
}
