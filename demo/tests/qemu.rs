//! An unmodified QEMU 7.2 guest (TCG) migrated through the agents: the VMM
//! shim hands each QEMU's guest RAM to its agent, QEMU migrates device state
//! only (`x-ignore-shared`), and the guest's own memory checker (in its
//! initramfs) must keep reporting `bad=0` on the target's serial console.
//!
//! Needs root, `qemu-system-x86_64`, and the guest image from
//! `guest/build.sh` (`scripts/test` installs and builds both).

use pageserver_demo::qemu::{QemuError, QemuOptions, QemuReport, run_qemu_migration};
use pageserver_demo::test_hooks::AgentTestHooks;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn migrate(opts: QemuOptions) -> QemuReport {
    let _one = ONE_AT_A_TIME.lock().await;
    let report = run_qemu_migration(&QemuOptions { quiet: true, ..opts })
        .await
        .unwrap_or_else(|e| panic!("QEMU migration failed: {e}"));
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    report
}

fn assert_guest_saw_no_stale_page(r: &QemuReport) {
    assert!(r.guest.generations_after_switchover >= 3, "too few checked generations: {:?}", r.guest);
    assert_eq!(r.guest.bad_words, 0, "the guest read stale memory after the migration: {:?}", r.guest);
    let m = &r.migration;
    assert!(m.faults_total > 0, "the target agent served no fault");
    assert!(m.pages_fetched_on_demand > 0, "no stale page was fetched on demand");
    assert!(m.stale_pages_at_switchover > 0, "the guest dirtied nothing after pre-copy");
    assert_eq!(m.faults_blocked_total(), 0, "{:?}", m.faults_blocked);
    let fetched = m.pages_fetched_on_demand + m.pages_fetched_background;
    assert!(fetched <= m.stale_pages_at_switchover + m.pages_fetched_unknown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_on_shmem_keeps_its_memory() {
    let r = migrate(QemuOptions::default()).await;
    assert_eq!(r.migration.page_size, 4096);
    assert_guest_saw_no_stale_page(&r);
}

/// With the target held paused (`-S`) until the agent has installed every
/// page, its RAM equals the source's at pause, byte for byte; the guest
/// then runs on and checks itself too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_target_ram_equals_source_ram_at_pause() {
    let r = migrate(QemuOptions { verify_bytes: true, ..QemuOptions::default() }).await;
    assert_eq!(r.migration.mismatched_pages, 0, "pages differing: {:?}", r.migration.first_mismatches);
    assert_eq!(r.migration.verified_pages, 256 << 8, "every 4 KiB of 256 MiB compared");
    assert!(r.guest.generations_after_switchover >= 3);
    assert_eq!(r.guest.bad_words, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_on_hugetlbfs_keeps_its_memory() {
    let r = migrate(QemuOptions { hugetlb: true, ..QemuOptions::default() }).await;
    assert_eq!(r.migration.page_size, 2 << 20);
    assert_guest_saw_no_stale_page(&r);
}

/// The check can fail: a target agent that installs stale pages as if fresh
/// (fault injection) is caught by the guest itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_catches_withheld_stale_pages() {
    let hooks = AgentTestHooks { withhold_stale_pages: 100, ..AgentTestHooks::default() };
    let r = migrate(QemuOptions { hooks, ..QemuOptions::default() }).await;
    assert!(r.guest.bad_words > 0, "the guest did not notice 100 stale pages: {:?}", r.guest);
}

/// `kill-target-agent` at each phase with an unmodified QEMU: the shim in
/// the target QEMU hands the guest's memory, uffd and pagemap to a new
/// agent, which takes over; the target's RAM equals the source's at pause
/// byte for byte, and the guest's own checker sees no bad word. (Without the
/// shim's re-hand-off the new agent never gets the memory and the run fails
/// with `NotHandedOverAgain`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_survives_its_target_agent_killed() {
    let runs = [("precopy", false), ("switchover", false), ("postcopy", false), ("postcopy", true)];
    for (phase, hugetlb) in runs {
        let chaos = vec![format!("kill-target-agent@{phase}").parse().expect("a chaos event")];
        let r = migrate(QemuOptions { verify_bytes: true, chaos, hugetlb, ..QemuOptions::default() }).await;
        let phase = format!("{phase}{}", if hugetlb { " (hugetlbfs)" } else { "" });
        assert_eq!(r.migration.handoffs.get("target"), Some(&2), "{phase}: {:?}", r.migration.handoffs);
        assert_eq!(r.migration.chaos.len(), 1, "{phase}");
        assert_eq!(r.migration.mismatched_pages, 0, "{phase}: {:?}", r.migration.first_mismatches);
        assert_eq!(r.migration.verified_pages, 256 << 8, "{phase}");
        assert_eq!(r.guest.bad_words, 0, "{phase}");
        assert_eq!(r.migration.faults_blocked_total(), 0, "{phase}: {:?}", r.migration.faults_blocked);
    }
}

/// `pageserver-migrate` refused SetPaused (the source agent lets another
/// certificate name steer) after the source QEMU paused at pre-switchover:
/// it must cancel the migration, tell the source agent the VM runs again,
/// resume the source VM and say so; the source guest's own checker then
/// goes on, without a bad word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_refused_at_the_pause_is_cancelled_and_the_guest_runs_on_at_the_source() {
    let _one = ONE_AT_A_TIME.lock().await;
    let opts = QemuOptions { quiet: true, refuse_orchestrator_on_source: true, ..QemuOptions::default() };
    let error = run_qemu_migration(&opts).await.expect_err("SetPaused was refused: the migration cannot complete");
    let QemuError::RolledBack { vm_state, stderr, source_generations_after, source_bad_words } = error else {
        panic!("not cancelled and resumed on the source: {error}");
    };
    assert!(stderr.contains("Error: step pause-source failed: SetPaused on the source agent failed"), "{stderr}");
    assert!(stderr.contains("not-the-orchestrator.pageserver.demo"), "the refusal names the allowed name: {stderr}");
    assert!(stderr.contains("VM: the migration was cancelled and the VM runs on the source again"), "{stderr}");
    assert!(vm_state.contains("runs on the source again"), "{vm_state}");
    assert!(source_generations_after >= 2, "the source guest did not run on: {source_generations_after}");
    assert_eq!(source_bad_words, 0, "the source guest saw bad memory after the cancellation");
}
