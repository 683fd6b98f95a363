//! The background pull's order on a hot/cold workload: how many pages the
//! guest had to wait for (fetched on demand) when the pull goes nearest to
//! the guest's latest fault first, and when it goes hottest first.
//!
//! The workload, the same for both orders: during pre-copy the source guest
//! rewrites its hot set (2% of its pages, spread over the guest) every
//! [`HOT_SWEEP_MS`]; just before the pause it writes a cold range (half of
//! its memory) once. After the switchover, once the final bitmap is in (the
//! pull starts then), the 4 target vCPUs read the whole hot set, shuffled,
//! then stay idle until the migration is complete; only then is every byte
//! verified (so the verification's reads fetch nothing). The pull is not
//! held back.
#![forbid(unsafe_code)]

use pageserver_demo::PullOrder;
use pageserver_demo::migration::MigrationOptions;
use vmm_standin::pattern::{self, SplitMix64};

use crate::BenchOptions;
use crate::migrations::{Samples, migrate, shmem};

/// How often the source guest rewrites its hot set during pre-copy.
const HOT_SWEEP_MS: u64 = 5;
const PAGE: u64 = 4096;

/// Both rows, one migration each.
pub(crate) async fn measure(opts: &BenchOptions, samples: &mut Samples, guest: u64, seed: u64) -> anyhow::Result<()> {
    let pages = guest / PAGE;
    for (order, key) in
        [(PullOrder::Nearest, "demand_fetches_nearest_first"), (PullOrder::Hot, "demand_fetches_hot_first")]
    {
        let run = MigrationOptions {
            seed,
            dirty_rate: 0,
            hot_sweep_ms: Some(HOT_SWEEP_MS),
            write_range_before_pause: Some((pages / 4, pages / 2)),
            touch_after_final_bitmap: true,
            touch_shared_after_resume: shuffled_hot_set(seed, pages),
            idle_until_complete: true,
            pull_order: Some(order),
            run_ms: 1,
            ..shmem(guest, 4)
        };
        let run = migrate(opts, key, run).await?;
        samples.add(key, run.pages_fetched_on_demand as f64);
    }
    Ok(())
}

/// The stand-in's hot set for `seed`, in a seeded random order (a working
/// set is not read in address order).
fn shuffled_hot_set(seed: u64, pages: u64) -> Vec<u64> {
    let mut hot = pattern::hot_set(seed, pages);
    let mut rng = SplitMix64::new(seed);
    for i in (1..hot.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        hot.swap(i, j);
    }
    hot
}
