//! Fixed-bucket histograms over atomics, for paths that may not allocate or
//! lock (the target's fault path), and their Prometheus text form.
//!
//! Recording is a binary search over a handful of bounds and two relaxed
//! atomic adds. The recorder of `metrics-exporter-prometheus` keeps every
//! sample in a growing queue until the next render, which allocates now and
//! then; these do not. They are rendered at scrape time by an agent's
//! [`Collector`](crate::Collector) with [`write_histogram`].

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (Prometheus `le` semantics: a value
/// lands in the first bucket whose bound is ≥ it).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [u64],
    /// Per bucket (not cumulative); the last one holds values above every bound.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A consistent-enough copy of a histogram: cumulative counts per bound, then
/// the total (the `+Inf` bucket), and the sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Samples recorded (the `+Inf` bucket).
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Latency buckets over nanoseconds ([`LATENCY_BUCKETS_NS`](crate::LATENCY_BUCKETS_NS): 1 µs to 1 s).
impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new(&crate::LATENCY_BUCKETS_NS)
    }
}

impl AtomicHistogram {
    /// `bounds` must be ascending.
    pub fn new(bounds: &'static [u64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// Records one value: no allocation, no lock.
    pub fn record(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Cumulative counts; the total is their last element, so `_count`
    /// always equals the `+Inf` bucket even while others record.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot { cumulative, sum: self.sum.load(Ordering::Relaxed) }
    }
}

/// One labelled series of a histogram family.
#[derive(Debug, Clone, Copy)]
pub struct HistogramSeries<'a> {
    /// Every label but `le`, global ones included.
    pub labels: &'a [(&'a str, &'a str)],
    pub histogram: &'a AtomicHistogram,
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    out.push('{');
    let le = le.map(|le| ("le", le));
    for (i, (key, value)) in labels.iter().copied().chain(le).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{key}=\"{}\"", escape_label_value(value));
    }
    out.push('}');
}

/// Appends one histogram family (HELP, TYPE, then per series its
/// cumulative buckets, `_sum` and `_count`, then a blank line as the
/// recorder does). Recorded values are divided by `divisor` (1e9 turns
/// nanoseconds into seconds).
pub fn write_histogram(out: &mut String, name: &str, help: &str, divisor: f64, series: &[HistogramSeries<'_>]) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
    let _ = writeln!(out, "# TYPE {name} histogram");
    for s in series {
        let snapshot = s.histogram.snapshot();
        let bounds = s.histogram.bounds().iter().map(|&b| (b as f64 / divisor).to_string());
        for (le, cumulative) in bounds.chain(["+Inf".to_owned()]).zip(&snapshot.cumulative) {
            let _ = write!(out, "{name}_bucket");
            write_labels(out, s.labels, Some(&le));
            let _ = writeln!(out, " {cumulative}");
        }
        let _ = write!(out, "{name}_sum");
        write_labels(out, s.labels, None);
        let _ = writeln!(out, " {}", snapshot.sum as f64 / divisor);
        let _ = write!(out, "{name}_count");
        write_labels(out, s.labels, None);
        let _ = writeln!(out, " {}", snapshot.count());
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LATENCY_BUCKETS_NS;

    #[test]
    fn values_land_in_the_first_bucket_at_or_above_them() {
        static BOUNDS: [u64; 3] = [10, 20, 50];
        let h = AtomicHistogram::new(&BOUNDS);
        for v in [0, 10, 11, 20, 50, 51, u64::MAX / 4] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 4, 5, 7]);
        assert_eq!(s.count(), 7);
    }

    #[test]
    fn renders_seconds_with_escaped_labels() {
        let h = AtomicHistogram::new(&LATENCY_BUCKETS_NS);
        h.record(700); // 0.7 µs
        h.record(7_000); // 7 µs
        h.record(3_000_000_000); // 3 s: only +Inf
        let mut out = String::new();
        let labels = [("vm", "a\"b"), ("resolution", "fresh")];
        write_histogram(&mut out, "x_seconds", "Test.", 1e9, &[HistogramSeries { labels: &labels, histogram: &h }]);
        assert!(out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{vm=\"a\\\"b\",resolution=\"fresh\",le=\"0.000001\"} 1\n"), "{out}");
        assert!(out.contains("le=\"0.00001\"} 2\n"), "{out}");
        assert!(out.contains("le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count{vm=\"a\\\"b\",resolution=\"fresh\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum{vm=\"a\\\"b\",resolution=\"fresh\"} 3.0000077\n"), "{out}");
        assert_eq!(out.lines().count(), 2 + 20 + 2 + 1);
        assert!(out.ends_with("} 3\n\n"), "{out}");
    }
}
