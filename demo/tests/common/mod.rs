//! What every end-to-end migration test shares: running one migration at a
//! time, and the checks every completed migration must pass.
#![allow(dead_code)]

use pageserver_demo::test_hooks::AgentTestHooks;
use pageserver_demo::{MigrationOptions, Report, run_migration};

/// One migration at a time: each already runs five busy processes on two
/// cores, and hugetlbfs guests share one huge-page pool.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const MIB: u64 = 1 << 20;

pub fn options(memory_bytes: u64) -> MigrationOptions {
    MigrationOptions { memory_bytes, quiet: true, run_ms: 300, ..MigrationOptions::default() }
}

pub async fn migrate(opts: MigrationOptions) -> Report {
    migrate_then(opts, || ()).await
}

/// Like [`migrate`], then `after` before the next migration may start (a
/// check of what the migration left on the machine).
pub async fn migrate_then(opts: MigrationOptions, after: impl FnOnce()) -> Report {
    let one = one_at_a_time().await;
    let report = migrate_alone(&one, opts).await;
    after();
    report
}

/// The right to run migrations alone, for a test that runs several and
/// looks at the machine in between.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// A migration, while holding [`one_at_a_time`].
pub async fn migrate_alone(_one: &tokio::sync::MutexGuard<'static, ()>, opts: MigrationOptions) -> Report {
    let report = run_migration(&opts).await.unwrap_or_else(|e| panic!("migration failed: {e}"));
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    report
}

/// The target agent holds the final bitmap back for `ms` (test hook), so
/// that faults hit pages of unknown state.
pub fn hold_bitmap(ms: u64) -> AgentTestHooks {
    AgentTestHooks { hold_bitmap_until_faults: u64::MAX, hold_bitmap_ms: ms, ..AgentTestHooks::default() }
}

/// Every byte of every page equals the source's memory at pause time, and
/// the migration completed: nothing blocked, healthy, a clean exit.
pub fn assert_every_byte_verified(r: &Report) {
    assert_eq!(r.failure, None);
    assert_eq!(r.phase, "complete");
    assert_eq!(r.faults_blocked_total(), 0, "{:?}", r.faults_blocked);
    assert_eq!(r.target_health, "SERVING");
    assert_eq!(r.target_agent_exit_code, Some(0), "the target agent exits cleanly after a migration");
    assert_eq!(r.mismatched_pages, 0, "pages differing from the source at pause time: {:?}", r.first_mismatches);
    assert_eq!(r.verified_pages, r.total_pages, "not every page was compared");
    assert_eq!(r.total_pages * r.page_size, r.guest_bytes);
}

/// Only stale pages cross the network after switchover, each exactly once.
pub fn assert_only_stale_pages_fetched(r: &Report) {
    let fetched = r.pages_fetched_on_demand + r.pages_fetched_background;
    assert!(r.final_bitmap_applied, "the final bitmap never arrived");
    assert!(
        fetched <= r.stale_pages_at_switchover + r.pages_fetched_unknown,
        "{fetched} pages fetched after switchover, but only {} were stale and {} unknown",
        r.stale_pages_at_switchover,
        r.pages_fetched_unknown
    );
    // Pages fetched after switchover are exactly those fetched while unknown
    // plus every page the bitmap marked stale: each stale page once.
    assert_eq!(fetched, r.pages_marked_stale + r.pages_fetched_unknown, "a stale page was not fetched exactly once");
    assert_eq!(r.pages_by_state.get("stale").copied().unwrap_or(0), 0, "stale pages left behind");
    assert_eq!(r.faults_total, r.faults_fresh + r.faults_fetched + r.faults_missing);
}
