//! The slot layout, quantiles, snapshots and exact Prometheus buckets of
//! [`LatencyHistogram`].

use super::slots::{FINE, LAYOUT, SLOTS, fine_high, fine_of};
use super::*;

/// Values around every power of two, every bound and every slot edge, and
/// a dense run of small ones.
fn interesting_values() -> Vec<u64> {
    let mut values: Vec<u64> = (0..=5_000).collect();
    for shift in 0..64 {
        let p = 1u64 << shift;
        values.extend([p - 1, p, p + 1]);
    }
    for &b in LATENCY_BUCKETS_NS.iter().chain(&LAYOUT.upper) {
        values.extend([b.saturating_sub(1), b, b.saturating_add(1)]);
    }
    values.push(u64::MAX);
    values.sort_unstable();
    values.dedup();
    values
}

/// A deterministic spread of latencies from 0 to ~4 s (xorshift, then a
/// random magnitude).
fn spread(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) >> (x % 32)
        })
        .collect()
}

#[test]
fn fine_buckets_are_monotonic_contiguous_and_narrow() {
    assert_eq!(fine_of(0), 0);
    assert_eq!(fine_high(FINE - 1), u64::MAX);
    for i in 0..FINE - 1 {
        let high = fine_high(i);
        assert_eq!(fine_of(high), i, "bucket {i} ends at {high}");
        assert_eq!(fine_of(high + 1), i + 1, "bucket {} starts at {}", i + 1, high + 1);
        let low = if i == 0 { 0 } else { fine_high(i - 1) + 1 };
        // Width within 1/16 of the bucket's smallest value: the 6.25%.
        assert!(low < 16 || (high - low + 1) * 16 <= low, "bucket {i}: {low}..={high}");
    }
}

#[test]
fn slots_are_ascending_cover_every_value_and_end_at_every_bound() {
    assert!(LAYOUT.upper.windows(2).all(|w| w[0] < w[1]), "slot ends ascend");
    assert_eq!(LAYOUT.upper[SLOTS - 1], u64::MAX);
    for (&b, &slot) in LATENCY_BUCKETS_NS.iter().zip(&LAYOUT.bound_slot) {
        assert_eq!(LAYOUT.upper[usize::from(slot)], b, "bound {b} ends slot {slot}");
    }
    let mut previous = 0;
    for ns in interesting_values() {
        let slot = LAYOUT.slot_of(ns);
        assert!(slot >= previous, "{ns} in slot {slot}, below the previous value's {previous}");
        assert!(LAYOUT.upper[slot] >= ns, "{ns} above the end of its slot {slot}");
        assert!(slot == 0 || LAYOUT.upper[slot - 1] < ns, "{ns} belongs below slot {slot}");
        previous = slot;
    }
}

#[test]
fn quantiles_are_within_a_fine_bucket_above_the_truth() {
    let h = LatencyHistogram::new();
    let mut values = spread(20_000);
    for &v in &values {
        h.record(v);
    }
    values.sort_unstable();
    let snapshot = h.snapshot();
    for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        let truth = values[rank - 1];
        let reported = snapshot.quantile_ns(q);
        assert!(reported >= truth, "q {q}: {reported} below the true {truth}");
        assert!(reported <= truth + truth / 16, "q {q}: {reported} more than 6.25% above {truth}");
    }
    assert_eq!(snapshot.max_ns(), *values.last().expect("values"));
    assert_eq!(snapshot.sum_ns(), values.iter().sum::<u64>());
    assert_eq!(snapshot.count(), 20_000);
}

#[test]
fn summary_in_microseconds_with_an_exact_max() {
    let h = LatencyHistogram::default();
    assert_eq!(h.summary(), LatencySummary::default());
    assert_eq!(h.quantile_ns(0.5), 0);
    for us in 1..=100u64 {
        h.record(us * 1000);
    }
    let summary = h.summary();
    assert_eq!(summary.count, 100);
    assert!((50.0..=50.0 * 1.0625).contains(&summary.p50_us), "{summary:?}");
    assert!((99.0..=99.0 * 1.0625).contains(&summary.p99_us), "{summary:?}");
    assert_eq!(summary.max_us, 100.0);
    assert_eq!(h.count(), 100);
}

#[test]
fn a_quantile_never_exceeds_the_max() {
    let h = LatencyHistogram::new();
    h.record(5_001); // the slot ends at 5 119
    assert_eq!(h.quantile_ns(0.5), 5_001);
    assert_eq!(h.quantile_ns(1.0), 5_001);
}

#[test]
fn prometheus_buckets_are_exact_at_every_bound() {
    for (j, &b) in LATENCY_BUCKETS_NS.iter().enumerate() {
        let h = LatencyHistogram::new();
        for ns in [b - 1, b, b + 1] {
            h.record(ns);
        }
        let cumulative = h.snapshot().cumulative_at_bounds();
        assert_eq!(cumulative[j], 2, "{}, {b} ≤ le={b} ns", b - 1);
        if j > 0 {
            assert_eq!(cumulative[j - 1], 0, "nothing near {b} ≤ the bound below");
        }
        if let Some(&next) = cumulative.get(j + 1) {
            assert_eq!(next, 3, "{} ≤ the bound above {b}", b + 1);
        }
    }
}

#[test]
fn cumulative_counts_match_a_direct_count() {
    let h = LatencyHistogram::new();
    let values = spread(5_000);
    for &v in &values {
        h.record(v);
    }
    let cumulative = h.snapshot().cumulative_at_bounds();
    for (&b, &n) in LATENCY_BUCKETS_NS.iter().zip(&cumulative) {
        assert_eq!(n, values.iter().filter(|&&v| v <= b).count() as u64, "le={b} ns");
    }
}

#[test]
fn merged_snapshots_equal_one_histogram_of_everything() {
    let (a, b, both) = (LatencyHistogram::new(), LatencyHistogram::new(), LatencyHistogram::new());
    for (i, v) in spread(1_000).into_iter().enumerate() {
        if i % 3 == 0 { &a } else { &b }.record(v);
        both.record(v);
    }
    let mut merged = a.snapshot();
    merged.merge(&b.snapshot());
    assert_eq!(merged, both.snapshot());
    assert_eq!(merged.summary(), both.summary());
}

#[test]
fn concurrent_records_are_all_counted() {
    let h = LatencyHistogram::new();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let h = &h;
            s.spawn(move || {
                for i in 0..10_000u64 {
                    h.record(t * 1_000_000 + i);
                }
            });
        }
    });
    let snapshot = h.snapshot();
    assert_eq!(snapshot.count(), 40_000);
    assert_eq!(snapshot.max_ns(), 3_009_999);
    assert_eq!(snapshot.sum_ns(), (0..4u64).map(|t| t * 10_000_000_000 + 49_995_000).sum::<u64>());
}
