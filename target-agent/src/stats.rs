//! Counters, fault-latency histograms and the migration phase of a target
//! agent. Recording is lock- and allocation-free (a few relaxed atomics), so
//! the fault path can afford it. Each latency goes into two histograms: a
//! fine log-linear one for the percentiles of `GetStatus`, and one with the
//! fixed Prometheus buckets (1 µs to 1 s) that `/metrics` renders at scrape
//! time ([`crate::metrics`]).
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use pageserver_metrics::AtomicHistogram;

use crate::source::SourceError;

/// A log-linear latency histogram over nanoseconds: 16 sub-buckets per power
/// of two (≤ 6.25% relative error), from 1 ns to ~2^63 ns.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;

fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // ≥ SUB_BITS
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// Upper bound (inclusive) of a bucket's values.
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = i / SUB + SUB_BITS as u64 - 1;
    let sub = i % SUB;
    let low = (1u64 << exp) + (sub << (exp - SUB_BITS as u64));
    low + (1u64 << (exp - SUB_BITS as u64)) - 1
}

const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// p50 / p99 / max in microseconds, and the count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl LatencyHistogram {
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The value (ns) below which a fraction `q` of samples fall (bucket
    /// upper bound, capped at the max seen).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i).min(self.max_ns.load(Ordering::Relaxed));
            }
        }
        self.max_ns.load(Ordering::Relaxed)
    }

    pub fn merge_into(&self, into: &LatencyHistogram) {
        for (a, b) in self.buckets.iter().zip(&into.buckets) {
            b.fetch_add(a.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        into.count.fetch_add(self.count(), Ordering::Relaxed);
        into.sum_ns.fetch_add(self.sum_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        into.max_ns.fetch_max(self.max_ns.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50_us: self.quantile_ns(0.50) as f64 / 1e3,
            p99_us: self.quantile_ns(0.99) as f64 / 1e3,
            max_us: self.max_ns.load(Ordering::Relaxed) as f64 / 1e3,
        }
    }
}

/// How a fault was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Continued at once: the page was known fresh (or already installed).
    Fresh,
    /// Needed the source: stale or unknown, fetched (or joined a fetch).
    Fetched,
    /// A hole known fresh: zero-filled without the network.
    Missing,
}

impl FaultKind {
    pub const ALL: [FaultKind; 3] = [FaultKind::Fresh, FaultKind::Fetched, FaultKind::Missing];
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Fresh => "fresh",
            FaultKind::Fetched => "fetched",
            FaultKind::Missing => "missing",
        }
    }
}

/// Migration phase of the target agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    WaitingForHandoff = 0,
    Precopy = 1,
    PrecopyConverged = 2,
    Postcopy = 3,
    Complete = 4,
    Failed = 5,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::WaitingForHandoff,
        Phase::Precopy,
        Phase::PrecopyConverged,
        Phase::Postcopy,
        Phase::Complete,
        Phase::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::WaitingForHandoff => "waiting-for-handoff",
            Phase::Precopy => "precopy",
            Phase::PrecopyConverged => "precopy-converged",
            Phase::Postcopy => "postcopy",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::WaitingForHandoff,
            1 => Phase::Precopy,
            2 => Phase::PrecopyConverged,
            3 => Phase::Postcopy,
            4 => Phase::Complete,
            _ => Phase::Failed,
        }
    }
}

/// Everything the target agent counts.
#[derive(Debug, Default)]
pub struct TargetStats {
    phase: AtomicU8,
    pub error: Mutex<String>,
    pub precopy_rounds: AtomicU64,
    pub pages_sent_precopy: AtomicU64,
    pub dirty_pages_per_round: Mutex<Vec<u64>>,
    pub stale_pages_at_switchover: AtomicU64,
    pub pages_marked_stale: AtomicU64,
    pub final_bitmap_applied: std::sync::atomic::AtomicBool,
    pub faults_total: AtomicU64,
    pub faults_fresh: AtomicU64,
    pub faults_fetched: AtomicU64,
    pub faults_missing: AtomicU64,
    pub faults_missing_fetched: AtomicU64,
    pub faults_unknown: AtomicU64,
    pub pages_fetched_on_demand: AtomicU64,
    pub pages_fetched_background: AtomicU64,
    pub pages_fetched_unknown: AtomicU64,
    pub pages_fetched_twice: AtomicU64,
    pub pages_installed_bulk: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Fault latency by kind (index: FaultKind order).
    pub fault_latency: [LatencyHistogram; 3],
    /// Latency of demand GetPages round trips.
    pub fetch_latency: LatencyHistogram,
    /// Faults by kind and by whether the page's state was known (index:
    /// `[kind][known as usize]`).
    pub faults_by_kind_known: [[AtomicU64; 2]; 3],
    /// Fault latency in Prometheus buckets, by kind and known (as above).
    pub fault_latency_buckets: [[AtomicHistogram; 2]; 3],
    /// Demand GetPages round trips in Prometheus buckets.
    pub fetch_latency_buckets: AtomicHistogram,
    /// Whether the last call to the source reached it ([`TargetStats::note_source_call`]).
    pub source_up: AtomicBool,
}

impl TargetStats {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn fail(&self, error: String) {
        if let Ok(mut e) = self.error.lock() {
            *e = error;
        }
        self.set_phase(Phase::Failed);
    }

    /// Counts one fault of `kind` on a page whose state was `known` (not
    /// `unknown`, waiting for the final bitmap), and its latency if known yet.
    pub fn record_fault(&self, kind: FaultKind, known: bool, latency_ns: Option<u64>) {
        self.faults_total.fetch_add(1, Ordering::Relaxed);
        let counter = match kind {
            FaultKind::Fresh => &self.faults_fresh,
            FaultKind::Fetched => &self.faults_fetched,
            FaultKind::Missing => &self.faults_missing,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.faults_by_kind_known[kind as usize][usize::from(known)].fetch_add(1, Ordering::Relaxed);
        if let Some(ns) = latency_ns {
            self.record_fault_latency(kind, known, ns);
        }
    }

    /// Records how long a fault took to resolve.
    pub fn record_fault_latency(&self, kind: FaultKind, known: bool, ns: u64) {
        self.fault_latency[kind as usize].record(ns);
        self.fault_latency_buckets[kind as usize][usize::from(known)].record(ns);
    }

    /// Records one demand GetPages round trip.
    pub fn record_fetch_latency(&self, ns: u64) {
        self.fetch_latency.record(ns);
        self.fetch_latency_buckets.record(ns);
    }

    /// Notes how a call to the source went: it is up after a success, or
    /// after an error the source itself sent (a refusal is an answer); down
    /// after a connection or transport failure.
    pub fn note_source_call<T>(&self, result: &Result<T, SourceError>) {
        let up = match result {
            Ok(_) => true,
            Err(e) => e.source_answered(),
        };
        self.source_up.store(up, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_their_values() {
        for ns in [0u64, 1, 15, 16, 17, 31, 32, 1000, 7_000, 1_000_000, u64::MAX / 2] {
            let b = bucket_of(ns);
            assert!(bucket_high(b) >= ns, "{ns} above its bucket {b}");
            if b > 0 {
                assert!(bucket_high(b - 1) < ns, "{ns} belongs below bucket {b}");
            }
        }
    }

    #[test]
    fn quantiles_within_bucket_error() {
        let h = LatencyHistogram::default();
        for us in 1..=100u64 {
            h.record(us * 1000);
        }
        let p50 = h.quantile_ns(0.5) as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.07, "p50 {p50}");
        assert_eq!(h.summary().max_us, 100.0);
        assert_eq!(h.count(), 100);
    }
}
