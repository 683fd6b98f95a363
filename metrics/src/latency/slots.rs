//! Where a latency lands: the slots of a [`LatencyHistogram`](super::LatencyHistogram).
//!
//! Two bucketings meet here. Quantiles want log-linear buckets: 16 per
//! power of two, so that a bucket's width is at most 1/16 (6.25%) of the
//! values in it, from 1 ns to `u64::MAX` in 976 buckets, and a value's
//! bucket is a shift and a mask. Prometheus wants the fixed
//! [`LATENCY_BUCKETS_NS`] (1 µs to 1 s, 1-2-5), which are not powers of two:
//! 5 000 ns sits inside the fine bucket 4 864..=5 119. Counting that whole
//! bucket as `le="0.000005"` would put values above 5 µs there; leaving it
//! out would push 5 000 ns itself into `le="0.00001"`.
//!
//! So every fine bucket that straddles a Prometheus bound is cut in two at
//! the bound. The result is one ascending list of slots, each with an
//! inclusive upper value, every Prometheus bound being exactly one slot's
//! upper value: the Prometheus buckets are exact (`le` semantics, a value
//! equal to a bound counts in it), and quantiles keep the fine buckets'
//! error. Finding a value's slot costs two loads from static tables and a
//! comparison, on top of the shift and mask.
//!
//! The tables are computed at compile time; a bound sharing a fine bucket
//! with another (impossible for bounds 2× apart) fails the build.

use crate::LATENCY_BUCKETS_NS;

/// log2 of the fine buckets per power of two: 16 keeps a bucket's width
/// within 6.25% of its values, in 976 buckets (8 KiB of counters).
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;

/// Fine buckets: values below [`SUB`] one each, then [`SUB`] per power of
/// two from `2^SUB_BITS` to `2^63`.
pub(super) const FINE: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

/// The fine bucket of `ns`.
pub(super) const fn fine_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // ≥ SUB_BITS
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The largest value of fine bucket `fine`.
pub(super) const fn fine_high(fine: usize) -> u64 {
    let i = fine as u64;
    if i < SUB {
        return i;
    }
    let exp = i / SUB + SUB_BITS as u64 - 1;
    let width = 1u64 << (exp - SUB_BITS as u64);
    let low = (1u64 << exp) + (i % SUB) * width;
    low + (width - 1) // in this order: the last bucket ends at u64::MAX
}

/// Whether bound `b` falls strictly inside its fine bucket, which then
/// becomes two slots.
const fn splits(b: u64) -> bool {
    b < fine_high(fine_of(b))
}

const SPLITS: usize = {
    let mut n = 0;
    let mut j = 0;
    while j < LATENCY_BUCKETS_NS.len() {
        if splits(LATENCY_BUCKETS_NS[j]) {
            n += 1;
        }
        j += 1;
    }
    n
};

/// Counters in a histogram: one per fine bucket, one more per cut.
pub(super) const SLOTS: usize = FINE + SPLITS;

/// The slot tables.
pub(super) struct Layout {
    /// Inclusive upper value of each slot, ascending.
    pub(super) upper: [u64; SLOTS],
    /// The first slot of each fine bucket.
    first: [u16; FINE],
    /// The slot whose upper value is `LATENCY_BUCKETS_NS[j]`.
    pub(super) bound_slot: [u16; LATENCY_BUCKETS_NS.len()],
}

pub(super) static LAYOUT: Layout = Layout::build();

impl Layout {
    const fn build() -> Self {
        assert!(SLOTS <= u16::MAX as usize, "slot indices are u16");
        let mut upper = [0; SLOTS];
        let mut first = [0; FINE];
        let mut bound_slot = [0; LATENCY_BUCKETS_NS.len()];
        let (mut fine, mut slot, mut j) = (0, 0, 0);
        while fine < FINE {
            first[fine] = slot as u16;
            let high = fine_high(fine);
            let mut bounds_here = 0;
            while j < LATENCY_BUCKETS_NS.len() && LATENCY_BUCKETS_NS[j] <= high {
                let b = LATENCY_BUCKETS_NS[j];
                assert!(j == 0 || LATENCY_BUCKETS_NS[j - 1] < b, "bounds must ascend");
                bounds_here += 1;
                assert!(bounds_here == 1, "two bounds in one fine bucket");
                // A bound inside the bucket ends a slot of its own; one at
                // the bucket's end shares the bucket's slot (the next one).
                bound_slot[j] = slot as u16;
                if b < high {
                    upper[slot] = b;
                    slot += 1;
                }
                j += 1;
            }
            upper[slot] = high;
            slot += 1;
            fine += 1;
        }
        assert!(slot == SLOTS && j == LATENCY_BUCKETS_NS.len());
        Self { upper, first, bound_slot }
    }

    /// The slot of `ns`: the first slot of its fine bucket, or the second
    /// if a bound cuts that bucket below `ns`.
    #[inline]
    pub(super) fn slot_of(&self, ns: u64) -> usize {
        let first = usize::from(self.first[fine_of(ns)]);
        first + usize::from(ns > self.upper[first])
    }
}
