//! One latency histogram for hot paths: recorded once, read two ways.
//!
//! The target's fault path records every fault's latency. Recording must
//! neither lock nor allocate (a guest vCPU waits on it), so a
//! [`LatencyHistogram`] is a fixed array of relaxed atomic counters,
//! allocated when the histogram is made: [`LatencyHistogram::record`] is a
//! table lookup and three relaxed atomic operations (slot, sum, max).
//!
//! The same counters answer both readers:
//!
//! - the percentiles of the target's `GetStatus` ([`LatencySummary`]), within
//!   the 6.25% of a log-linear bucket (16 per power of two), the max exact;
//! - the Prometheus histogram of `/metrics` with the fixed
//!   [`LATENCY_BUCKETS_NS`] bounds, exact: each bound is the end of a slot
//!   (`latency/slots.rs` says how), so a value counts in `le="b"` if and
//!   only if it is ≤ b. Rendered by [`write_histogram`](crate::write_histogram).
//!
//! Readers take a [`LatencySnapshot`] (a plain copy, off the hot path), so
//! a summary's count, its quantiles and a rendered `_count` and `+Inf`
//! bucket agree with each other even while faults keep recording. A sample
//! recorded during the copy may be in the sum and max but not yet in a
//! slot, or the other way round.

mod slots;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use slots::{LAYOUT, SLOTS};

use crate::LATENCY_BUCKETS_NS;

/// Latencies in nanoseconds, lock- and allocation-free to record.
pub struct LatencyHistogram {
    /// Samples per slot (not cumulative), in slot order.
    slots: Box<[AtomicU64; SLOTS]>,
    /// Exact, wrapping (after 584 years of latency).
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// A copy of a [`LatencyHistogram`]'s counters, to read, merge and render.
#[derive(Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    slots: Box<[u64; SLOTS]>,
    sum_ns: u64,
    max_ns: u64,
}

/// Sample count, p50 and p99 (within a fine bucket: reported values are at
/// most 6.25% above the true ones, never below), and the exact max, in
/// microseconds. All 0 without samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The exact sum of the samples.
    pub sum_us: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

impl LatencyHistogram {
    /// An empty histogram (8 KiB of counters, allocated now rather than
    /// when recording).
    pub fn new() -> Self {
        Self {
            slots: Box::new([const { AtomicU64::new(0) }; SLOTS]),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }

    /// Records one latency: three relaxed atomic operations, no lock, no
    /// allocation.
    #[inline]
    pub fn record(&self, ns: u64) {
        self.slots[LAYOUT.slot_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Samples recorded so far (a sum over every slot: for readers, not
    /// for the hot path).
    pub fn count(&self) -> u64 {
        self.slots.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// A copy of the counters (relaxed loads: a sample recorded meanwhile may
    /// be in some of them and not yet in the others).
    pub fn snapshot(&self) -> LatencySnapshot {
        let slots = Box::new(std::array::from_fn(|s| self.slots[s].load(Ordering::Relaxed)));
        LatencySnapshot {
            slots,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }

    /// [`LatencySnapshot::quantile_ns`] of a snapshot taken now.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        self.snapshot().quantile_ns(q)
    }

    /// [`LatencySnapshot::summary`] of a snapshot taken now.
    pub fn summary(&self) -> LatencySummary {
        self.snapshot().summary()
    }
}

impl fmt::Debug for LatencySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 995 counters say less than this.
        f.debug_struct("LatencySnapshot")
            .field("count", &self.count())
            .field("sum_ns", &self.sum_ns)
            .field("max_ns", &self.max_ns)
            .finish_non_exhaustive()
    }
}

impl LatencySnapshot {
    /// Samples in the snapshot.
    pub fn count(&self) -> u64 {
        self.slots.iter().sum()
    }

    /// The exact sum of the samples, in nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// The largest sample, exact, in nanoseconds (0 without samples).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The value below or at which a fraction `q` (0..=1) of the samples
    /// fall: the upper end of the slot holding the sample of rank
    /// ⌈q·count⌉, capped at the max. At most 6.25% above the true value
    /// (exact below 16 ns), never below it; 0 without samples.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        // `as` saturates: q ≤ 0 or NaN gives rank 1, the minimum.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (slot, &n) in self.slots.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return LAYOUT.upper[slot].min(self.max_ns);
            }
        }
        self.max_ns
    }

    /// Count, p50, p99 and max.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50_us: self.quantile_ns(0.50) as f64 / 1e3,
            p99_us: self.quantile_ns(0.99) as f64 / 1e3,
            max_us: self.max_ns as f64 / 1e3,
            sum_us: self.sum_ns as f64 / 1e3,
        }
    }

    /// Adds `other`'s samples to these (e.g. one fault kind's series for
    /// known and unknown pages, for one summary of the kind).
    pub fn merge(&mut self, other: &LatencySnapshot) {
        for (mine, theirs) in self.slots.iter_mut().zip(other.slots.iter()) {
            *mine += theirs;
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Samples ≤ each of [`LATENCY_BUCKETS_NS`], exactly (Prometheus `le`
    /// semantics); samples above the last bound are `count()` minus the
    /// last of these.
    pub(crate) fn cumulative_at_bounds(&self) -> [u64; LATENCY_BUCKETS_NS.len()] {
        let mut out = [0; LATENCY_BUCKETS_NS.len()];
        let (mut seen, mut from) = (0, 0);
        for (cumulative, &slot) in out.iter_mut().zip(&LAYOUT.bound_slot) {
            let through = usize::from(slot) + 1;
            seen += self.slots[from..through].iter().sum::<u64>();
            from = through;
            *cumulative = seen;
        }
        out
    }
}
