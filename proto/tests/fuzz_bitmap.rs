//! Fuzzing the dirty-bitmap encoding (`pageserver_proto::bitmap`) with
//! proptest:
//!
//! - the decoder (`BitmapDecoder::push`/`finish`, then `global_runs` and
//!   `global_pages`) fed arbitrary chunk sequences, and streams from the
//!   encoder with one field damaged: it never panics, and what it accepts
//!   is sorted, merged, adds up to the total it claims, and, checked
//!   against a layout, is either refused or entirely inside it;
//! - the round trip: `encode_chunks` then decoding gives back the input
//!   runs (merged where they touch); the encoder refuses, never panics on,
//!   runs that are unsorted or end past `u64::MAX`.
//!
//! `cargo test` runs a short smoke (1000 cases per property); a long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p pageserver-proto --test
//! fuzz_bitmap -- --nocapture` (each property prints its count and time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use guest_memory::{GuestLayout, RegionLayout};
use pageserver_proto::bitmap::{BitmapDecoder, BitmapError, DirtyBitmap, DirtyRun, encode_chunks};
use pageserver_proto::v1::DirtyBitmapChunk;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// 1000 cases, or `PROPTEST_CASES`.
fn config() -> Config {
    let config = Config { failure_persistence: None, ..Config::default() };
    if std::env::var_os("PROPTEST_CASES").is_some() { config } else { Config { cases: 1000, ..config } }
}

/// Runs `property` on `strategy`'s values; reports how many ran, and how long.
fn fuzz<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(config());
    let cases = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        cases.fetch_add(1, Ordering::Relaxed);
        property(value)
    });
    eprintln!("{name}: {} cases in {:.1?}", cases.into_inner(), started.elapsed());
    if let Err(error) = result {
        panic!("{name}: {error}");
    }
}

fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(1), Just(u64::MAX), Just(u64::MAX - 1), Just(1 << 63), 0u64..16, any::<u64>(),]
}

fn region() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(2), Just(u32::MAX), any::<u32>()]
}

fn chunk() -> impl Strategy<Value = DirtyBitmapChunk> {
    (
        prop_oneof![Just(1u64), Just(2), Just(u64::MAX)],
        any::<bool>(),
        region(),
        proptest::collection::vec(extreme_u64(), 0..10),
        extreme_u64(),
        extreme_u64(),
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(epoch, paused, region, runs, base_index, total_dirty_pages, last)| DirtyBitmapChunk {
            epoch,
            paused,
            region,
            runs,
            base_index,
            total_dirty_pages,
            last,
            pause_epoch: epoch / 2,
            hot: Vec::new(),
        })
}

/// Sorted, non-overlapping runs (some touching), in up to four regions.
fn sorted_runs() -> impl Strategy<Value = Vec<DirtyRun>> {
    let region_runs = (0u32..3, proptest::collection::vec((0u64..4, 1u64..6), 0..12));
    proptest::collection::vec(region_runs, 0..4).prop_map(|regions| {
        let mut runs = Vec::new();
        let mut region = 0u32;
        for (skip, pairs) in regions {
            region += skip;
            let mut cursor = 0u64;
            for (gap, len) in pairs {
                runs.push(DirtyRun { region, first_index: cursor + gap, len });
                cursor += gap + len;
            }
            region += 1;
        }
        runs
    })
}

/// Runs merged where they touch, empty ones dropped: what a decoder returns.
fn merged(runs: &[DirtyRun]) -> Vec<DirtyRun> {
    let mut out: Vec<DirtyRun> = Vec::new();
    for run in runs.iter().filter(|run| run.len > 0) {
        match out.last_mut() {
            Some(last) if last.region == run.region && last.end_index() == run.first_index => last.len += run.len,
            _ => out.push(*run),
        }
    }
    out
}

/// A layout of `pages.len()` regions of that many 4 KiB pages.
fn layout(pages: &[u64]) -> GuestLayout {
    let mut offset = 0;
    let regions = pages
        .iter()
        .map(|&pages| {
            let region =
                RegionLayout { base_host_virt_addr: (1 << 40) + offset, size: pages * 4096, offset, page_size: 4096 };
            offset += pages * 4096;
            region
        })
        .collect();
    GuestLayout::new(regions).unwrap_or_else(|e| panic!("a valid layout: {e}"))
}

/// Feeds `chunks` to a decoder, as the target agent does.
fn decode(chunks: &[DirtyBitmapChunk]) -> Result<DirtyBitmap, BitmapError> {
    let mut decoder = BitmapDecoder::new();
    for chunk in chunks {
        if decoder.push(chunk)? {
            break;
        }
    }
    decoder.finish()
}

/// What every accepted bitmap must be, and what the layout check makes of it.
fn check_decoded(chunks: &[DirtyBitmapChunk], pages: &[u64]) -> Result<(), TestCaseError> {
    let Ok(bitmap) = decode(chunks) else { return Ok(()) };
    let mut total = 0u64;
    for (i, run) in bitmap.runs.iter().enumerate() {
        prop_assert!(run.len > 0);
        prop_assert!(run.first_index.checked_add(run.len).is_some(), "{:?} ends past u64::MAX", run);
        if let Some(previous) = i.checked_sub(1).map(|p| bitmap.runs[p]) {
            let apart = run.region > previous.region || run.first_index > previous.end_index();
            prop_assert!(apart, "{:?} then {:?}: unsorted, overlapping or unmerged", previous, run);
        }
        total = total.checked_add(run.len).ok_or_else(|| TestCaseError::fail("the runs add up past u64::MAX"))?;
    }
    prop_assert_eq!(Some(total), chunks.first().map(|c| c.total_dirty_pages));
    prop_assert_eq!(bitmap.page_count(), total);
    let layout = layout(pages);
    if let Ok(runs) = bitmap.global_runs(&layout) {
        prop_assert_eq!(runs.len(), bitmap.runs.len());
        let pages = bitmap.global_pages(&layout).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(pages.len() as u64, total);
        prop_assert!(pages.windows(2).all(|w| w[0] < w[1]), "global pages not increasing");
        prop_assert!(pages.iter().all(|&page| page < layout.total_pages()));
    }
    Ok(())
}

fn pages() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(1u64..64, 1..4)
}

#[test]
fn decoder_on_arbitrary_chunks() {
    let strategy = (proptest::collection::vec(chunk(), 0..6), pages());
    fuzz("decoder on arbitrary chunks", strategy, |(chunks, pages)| check_decoded(&chunks, &pages));
}

/// One field of one chunk of a well-formed stream set to `value`.
fn damage(chunks: &mut [DirtyBitmapChunk], which: usize, field: u8, value: u64) {
    let len = chunks.len();
    let Some(chunk) = chunks.get_mut(which % len.max(1)) else { return };
    match field {
        0 => chunk.epoch = value,
        1 => chunk.paused = !chunk.paused,
        2 => chunk.region = value as u32,
        3 => chunk.base_index = value,
        4 => chunk.total_dirty_pages = value,
        5 => chunk.last = !chunk.last,
        6 => chunk.runs.push(value),
        _ => {
            let at = value as usize % chunk.runs.len().max(1);
            if let Some(run) = chunk.runs.get_mut(at) {
                *run = value;
            }
        }
    }
}

#[test]
fn decoder_on_damaged_streams() {
    let strategy = (sorted_runs(), any::<usize>(), 0u8..9, extreme_u64(), any::<bool>(), pages());
    fuzz("decoder on damaged streams", strategy, |(runs, which, field, value, drop_one, pages)| {
        let mut chunks = encode_chunks(7, false, &runs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        damage(&mut chunks, which, field, value);
        if drop_one && chunks.len() > 1 {
            chunks.remove(which % chunks.len());
        }
        check_decoded(&chunks, &pages)
    });
}

#[test]
fn round_trip() {
    let strategy = (sorted_runs(), any::<u64>(), any::<bool>());
    fuzz("encode then decode", strategy, |(runs, epoch, paused)| {
        let chunks = encode_chunks(epoch, paused, &runs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
        prop_assert!(chunks.last().is_some_and(|c| c.last));
        let bitmap = decode(&chunks).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((bitmap.epoch, bitmap.paused), (epoch, paused));
        prop_assert_eq!(&bitmap.runs, &merged(&runs));
        // Inside a layout just large enough, every page comes back once.
        let mut sizes = vec![1u64; runs.iter().map(|r| r.region as usize + 1).max().unwrap_or(1)];
        for run in &runs {
            sizes[run.region as usize] = sizes[run.region as usize].max(run.end_index());
        }
        let layout = layout(&sizes);
        let pages = bitmap.global_pages(&layout).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected: Vec<u64> = runs
            .iter()
            .flat_map(|run| {
                let first = layout.region_first_page(run.region).unwrap_or(0) + run.first_index;
                first..first + run.len
            })
            .collect();
        prop_assert_eq!(pages, expected);
        Ok(())
    });
}

#[test]
fn encoder_on_arbitrary_runs() {
    let run = (region(), extreme_u64(), extreme_u64()).prop_map(|(region, first_index, len)| DirtyRun {
        region,
        first_index,
        len,
    });
    fuzz("encoder on arbitrary runs", proptest::collection::vec(run, 0..8), |runs| {
        let Ok(chunks) = encode_chunks(3, true, &runs) else { return Ok(()) };
        // Whatever the encoder accepts decodes back to the same runs.
        let bitmap = decode(&chunks).map_err(|e| TestCaseError::fail(format!("{e} decoding {chunks:?}")))?;
        prop_assert_eq!(bitmap.runs, merged(&runs));
        Ok(())
    });
}
