//! End-to-end migrations: both agents and two VMM stand-ins as separate
//! processes, real userfaultfd (MINOR + MISSING on the target, WP_ASYNC +
//! PAGEMAP_SCAN on the source), real memfd / hugetlbfs, real gRPC over
//! 127.0.0.1. After every migration every byte of the target's memory is
//! compared with the source's memory at pause time (by the target stand-in,
//! against a snapshot the source stand-in took while paused).
//!
//! Needs root (userfaultfd, huge pages) and the workspace's binaries built in
//! the same profile (`scripts/test` does both).

mod common;

use common::{MIB, assert_every_byte_verified, assert_only_stale_pages_fetched, hold_bitmap, migrate, options};
use pageserver_demo::test_hooks::{AgentTestHooks, FaultLoopBreak};
use pageserver_demo::{MigrationOptions, Report};
use vmm_standin::pattern;

/// `count` pages, spread over the guest, that are holes (never written) in
/// the source's initial memory for `seed`.
fn holes(seed: u64, total_pages: u64, count: usize) -> Vec<u64> {
    spread((0..total_pages).filter(|&p| pattern::is_initial_hole(seed, p)).collect(), count)
}

fn non_holes(seed: u64, total_pages: u64, count: usize) -> Vec<u64> {
    spread((0..total_pages).filter(|&p| !pattern::is_initial_hole(seed, p)).collect(), count)
}

/// `count` of `pages`, evenly spread.
fn spread(pages: Vec<u64>, count: usize) -> Vec<u64> {
    assert!(pages.len() >= count, "only {} candidate pages", pages.len());
    (0..count).map(|i| pages[i * pages.len() / count]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shmem_migration_with_a_dirtying_guest_verifies_every_byte() {
    let r = migrate(MigrationOptions { dirty_rate: 20_000, ..options(128 * MIB) }).await;
    assert_eq!(r.page_size, 4096);
    assert_eq!(r.transport, "mutual TLS", "the demo's default");
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert!(r.precopy_rounds >= 2, "pre-copy stopped after round 0");
    // Round 0 sends the pages that hold data (and the holes the guest wrote
    // since the hand-off), not the initial holes.
    let data = (0..r.total_pages).filter(|&p| !pattern::is_initial_hole(r.seed, p)).count() as u64;
    let round0 = r.dirty_pages_per_round[0];
    assert!((data..r.total_pages).contains(&round0), "round 0 sent {round0} pages, {data} hold data");
    assert!(r.stale_pages_at_switchover > 0, "the guest dirtied nothing after the last round");
    assert!(r.pages_installed_bulk > 0, "no fresh page was installed in bulk");
    assert!(r.faults_total > 0, "the target guest never faulted");
    assert!(r.guest_pages_written > 0, "the target guest never wrote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_migration_when_asked_verifies_every_byte() {
    let r = migrate(MigrationOptions { plaintext: true, ..options(64 * MIB) }).await;
    assert_eq!(r.transport, "plaintext");
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_migration_with_a_dirtying_guest_verifies_every_byte() {
    let r = migrate(MigrationOptions { hugetlb: true, dirty_rate: 400, ..options(128 * MIB) }).await;
    assert_eq!(r.page_size, 2 * MIB);
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert!(r.faults_total > 0, "the target guest never faulted");
}

/// The trap: a page that was a hole when last copied (so it is a hole in
/// the target's file, and a guest access raises MISSING, not MINOR) and that
/// the source writes after the last pre-copy round. Touched on the target
/// before the final bitmap is in, it must come from the source.
async fn hole_written_after_last_copy(hugetlb: bool, memory_bytes: u64) {
    let opts = options(memory_bytes);
    let total_pages = memory_bytes / if hugetlb { 2 * MIB } else { 4096 };
    let trap = holes(opts.seed, total_pages, 2);
    assert_eq!(trap.len(), 2);
    let r = migrate(MigrationOptions {
        hugetlb,
        dirty_rate: 0,
        write_before_pause: trap.clone(),
        touch_after_resume: trap.clone(),
        hooks: hold_bitmap(1500),
        ..opts
    })
    .await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert_eq!(r.stale_pages_at_switchover, 2, "only the two written holes changed after the last round");
    let touch = r.status_after_touch.clone().expect("status after the touch");
    assert!(touch.faults_missing_fetched >= 2, "the holes did not fault as MISSING and get fetched: {touch:?}");
    assert_eq!(touch.pages_fetched_on_demand, 2, "{touch:?}");
    assert_eq!(touch.pages_fetched_unknown, 2, "{touch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shmem_hole_written_after_last_copy_is_fetched_not_zero_filled() {
    hole_written_after_last_copy(false, 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_hole_written_after_last_copy_is_fetched_not_zero_filled() {
    hole_written_after_last_copy(true, 64 * MIB).await;
}

/// The same trap with the final bitmap in first: the holes are known stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_written_after_last_copy_and_known_stale_is_fetched() {
    let opts = options(64 * MIB);
    let trap = holes(opts.seed, 64 * MIB / 4096, 3);
    let r =
        migrate(MigrationOptions { dirty_rate: 0, write_before_pause: trap.clone(), touch_after_resume: trap, ..opts })
            .await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert_eq!(r.stale_pages_at_switchover, 3);
}

/// The guest runs before the final bitmap arrives: its faults hit pages of
/// unknown state, which are fetched from the paused source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_unknown_pages_before_the_bitmap_are_served_from_the_source() {
    let r =
        migrate(MigrationOptions { dirty_rate: 20_000, hooks: hold_bitmap(2000), run_ms: 300, ..options(64 * MIB) })
            .await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert!(r.faults_unknown > 0, "no fault hit a page of unknown state");
    assert!(r.pages_fetched_unknown > 0, "no page of unknown state was fetched");
}

/// Every vCPU thread reads the same pages at once: each page is fetched
/// once, the other faults wait for that fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_threads_faulting_one_page_fetch_it_once() {
    let opts = options(64 * MIB);
    let pages = non_holes(opts.seed, 64 * MIB / 4096, 8);
    let r = migrate(MigrationOptions {
        vcpus: 4,
        dirty_rate: 0,
        touch_after_resume: pages.clone(),
        hooks: hold_bitmap(1500),
        ..opts
    })
    .await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    let touch = r.status_after_touch.clone().expect("status after the touch");
    assert_eq!(touch.pages_fetched_on_demand, pages.len() as u64, "{touch:?}");
    assert!(
        touch.faults_fetched > pages.len() as u64,
        "no second thread faulted on a page while it was being fetched: {touch:?}"
    );
}

/// The verification can fail: a target agent told to install stale pages as
/// if fresh (fault injection) must be caught, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pages_installed_as_fresh_are_caught() {
    let opts = options(64 * MIB);
    let written = non_holes(opts.seed, 64 * MIB / 4096, 3);
    let r = migrate(MigrationOptions {
        dirty_rate: 0,
        write_before_pause: written.clone(),
        hooks: AgentTestHooks { withhold_stale_pages: 3, ..AgentTestHooks::default() },
        ..opts
    })
    .await;
    assert!(!r.verification_passed());
    assert_eq!(r.mismatched_pages, 3, "every withheld page must show up: {:?}", r.first_mismatches);
    let mut caught = r.first_mismatches.clone();
    caught.sort_unstable();
    assert_eq!(caught, written);
}

/// A fault loop made to stop (test hook) after `after` faults, before the
/// final bitmap is in: the migration fails, never completes, and the frozen
/// guest has seen only the source's content at pause.
async fn fault_loop_stops(how: FaultLoopBreak, after: u64) -> Report {
    migrate(MigrationOptions {
        dirty_rate: 20_000,
        run_ms: 300,
        hooks: AgentTestHooks { break_fault_loop: Some((after, how)), ..hold_bitmap(20_000) },
        ..options(64 * MIB)
    })
    .await
}

/// What every stopped fault loop must leave behind.
fn assert_failed_and_frozen(r: &Report, reason: &str) {
    let failure = r.failure.as_deref().expect("the migration must fail");
    assert!(failure.contains(reason), "{failure:?} does not say {reason:?}");
    assert!(failure.contains("The guest is frozen"), "{failure:?} does not say the guest is frozen");
    assert_eq!(r.phase, "failed", "a migration whose fault loop stopped must never report complete");
    assert_eq!(r.target_health, "NOT_SERVING");
    assert_eq!(r.target_agent_exit_code, Some(1), "the target agent exits non-zero after a failed migration");
    assert!(
        r.faults_blocked["fault_loop_stopped"] >= 1,
        "the unresolved fault is not accounted: {:?}",
        r.faults_blocked
    );
    // The frozen guest saw only pages it may see.
    assert_eq!(
        r.mismatched_pages, 0,
        "pages the frozen guest can see differ from the source at pause: {:?}",
        r.first_mismatches
    );
    assert!(r.verified_pages > 0, "the guest saw no page before the loop stopped");
    assert!(r.verified_pages < r.total_pages, "the guest cannot have seen every page: it froze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_loop_that_fails_fails_the_migration_and_freezes_the_guest() {
    let r = fault_loop_stops(FaultLoopBreak::Error, 40).await;
    assert_failed_and_frozen(&r, "test hook: the fault loop was told to stop after 40 faults");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_loop_that_panics_fails_the_migration_and_freezes_the_guest() {
    let r = fault_loop_stops(FaultLoopBreak::Panic, 40).await;
    assert_failed_and_frozen(&r, "the fault loop panicked: test hook: the fault loop panics at fault 40");
}

/// A balloon on the target: right after switchover, before the final bitmap
/// is in, the target VMM punches out pages the source changed after the
/// last round (stale), pages it did not (fresh), and holes. Each must read
/// as zeros afterwards: the agent learns of the removal from the uffd and
/// never fills such a page with the source's content behind the VMM's back.
async fn discarded_pages_stay_discarded(hugetlb: bool) {
    let memory = if hugetlb { 64 * MIB } else { 32 * MIB };
    let opts = if hugetlb { MigrationOptions { hugetlb: true, ..options(memory) } } else { options(memory) };
    let total = memory / opts.page_size();
    let stale = non_holes(opts.seed, total, 3);
    let mut discarded = stale.clone();
    discarded.extend(non_holes(opts.seed + 1, total, 2).into_iter().filter(|p| !stale.contains(p)));
    discarded.extend(holes(opts.seed, total, 1));
    let r = migrate(MigrationOptions {
        dirty_rate: 0,
        write_before_pause: stale,
        discard_after_switchover: discarded,
        hooks: hold_bitmap(300),
        ..opts
    })
    .await;
    assert_every_byte_verified(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shmem_pages_the_target_vmm_discards_are_never_filled_from_the_source() {
    discarded_pages_stay_discarded(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_pages_the_target_vmm_discards_are_never_filled_from_the_source() {
    discarded_pages_stay_discarded(true).await;
}

/// A balloon on the source: after pre-copy converged and before the pause,
/// the source VMM punches out pages the target already holds (the dirtying
/// vCPUs are stopped, so nothing writes them again). Their content is now
/// zeros, with no write for write-protection to see: the source agent must
/// report them dirty (shmem: the file's holes; hugetlbfs, which has no
/// `SEEK_HOLE`: its own mapping of the file losing them), or the target
/// keeps the old content, which the byte-for-byte verification catches.
async fn source_discards_reach_the_target(hugetlb: bool) {
    let memory = if hugetlb { 64 * MIB } else { 32 * MIB };
    let opts = if hugetlb { MigrationOptions { hugetlb: true, ..options(memory) } } else { options(memory) };
    let total = memory / opts.page_size();
    let mut discarded = non_holes(opts.seed, total, 6);
    discarded.sort_unstable();
    discarded.dedup();
    let wanted = discarded.len() as u64;
    let r = migrate(MigrationOptions { dirty_rate: 0, discard_before_pause: discarded, ..opts }).await;
    assert_every_byte_verified(&r);
    assert!(r.stale_pages_at_switchover >= wanted, "the discarded pages were not all stale: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shmem_pages_the_source_vmm_discards_reach_the_target_as_zeros() {
    source_discards_reach_the_target(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_pages_the_source_vmm_discards_reach_the_target_as_zeros() {
    source_discards_reach_the_target(true).await;
}

/// A sparse guest: 64 GiB of which 64 MiB were ever written, in clusters,
/// the vCPUs dirtying inside them. Pre-copy sends what was written, not the
/// holes; the VMM gets no page tables for the holes; every page that holds
/// data on either side is compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_guest_moves_only_what_was_written() {
    let (memory, written) = (64 << 30, 64 * MIB);
    let r = migrate(MigrationOptions { written_bytes: Some(written), dirty_rate: 200, ..options(memory) }).await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert_eq!(r.written_bytes, written);
    let compared = r.verified_pages - r.verified_hole_pages;
    assert!(compared >= written / r.page_size, "only {compared} pages compared of {} written", written / r.page_size);
    assert!(
        r.precopy_bytes as f64 <= 1.05 * written as f64,
        "pre-copy moved {} bytes for {written} written (rounds {:?})",
        r.precopy_bytes,
        r.dirty_pages_per_round
    );
    let added = r.source_vmm_pte_kib_after_tracking.saturating_sub(r.source_vmm_pte_kib_before_tracking);
    assert!(added < 1024, "starting the tracking gave the VMM {added} KiB of page tables");
}
