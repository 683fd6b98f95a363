//! The source guest's hot working set, rewritten over and over: one more
//! vCPU that writes a word into every page of the hot set, then sleeps, until
//! the pause (`--hot-sweep-ms`). Every pre-copy round's scan that comes at
//! least one sweep after the previous one finds the whole hot set dirty, so
//! the source agent counts it hot, while a range written once (`write-range`)
//! stays cold: the hot/cold workload of the pull-order comparison.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::pattern::SplitMix64;
use crate::ram::GuestRam;

/// Rewrites every page of `hot` every `every`, until `stop`; counts the
/// page writes in `writes`.
pub fn sweep_until_stopped(
    ram: &GuestRam,
    hot: &[u64],
    mut rng: SplitMix64,
    every: Duration,
    stop: &AtomicBool,
    writes: &AtomicU64,
) {
    let words_per_page = ram.page_size / 8;
    while !stop.load(Ordering::Relaxed) {
        for &page in hot {
            let offset = ram.page_offset(page) + (rng.below(words_per_page) * 8) as usize;
            ram.map.write_u64(offset, rng.next_u64());
        }
        writes.fetch_add(hot.len() as u64, Ordering::Relaxed);
        std::thread::sleep(every);
    }
}
