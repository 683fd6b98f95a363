//! The background pull's order (`--pull-order`) on a hot/cold workload:
//! during pre-copy the source guest rewrites its hot set (2% of its pages,
//! spread over the guest) again and again, then writes a cold range (half
//! of its memory) once just before the pause. The source agent counts the
//! hot pages hot; with `--pull-order hot` the target's pull fetches them
//! before any other stale page. The target guest stays idle until the
//! migration is complete, so the pull alone decides what comes first.
//!
//! Needs root and the workspace's binaries (see `migration.rs`).

mod common;

use common::{MIB, assert_every_byte_verified, assert_only_stale_pages_fetched, migrate, options};
use pageserver_demo::{MigrationOptions, PullOrder, Report};
use vmm_standin::pattern;

const MEMORY: u64 = 128 * MIB;
const PAGES: u64 = MEMORY / 4096;

async fn hot_cold(order: PullOrder) -> Report {
    migrate(MigrationOptions {
        dirty_rate: 0,
        hot_sweep_ms: Some(2),
        write_range_before_pause: Some((0, PAGES / 2)),
        pull_order: Some(order),
        idle_until_complete: true,
        ..options(MEMORY)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_order_pulls_the_hot_set_first_and_verifies_every_byte() {
    let r = hot_cold(PullOrder::Hot).await;
    assert_every_byte_verified(&r);
    assert_only_stale_pages_fetched(&r);
    assert_eq!(r.pull_order, "hot");
    // The hint names the hot pages still stale when the final bitmap came
    // (the verification's reads may fetch a few before it): most of the
    // hot set, and nothing else (the cold range was written once).
    let hot = pattern::hot_set(r.seed, PAGES).len() as u64;
    assert!(
        r.hot_pages_hinted <= hot && r.hot_pages_hinted > hot / 2,
        "{} of {hot} hot pages hinted",
        r.hot_pages_hinted
    );
    assert!(r.stale_pages_at_switchover >= PAGES / 2, "the cold range is stale too");
    assert_eq!(r.hot_pages_pulled_first, r.hot_pages_hinted, "the pull asked for every hot page before any cold one");
}
