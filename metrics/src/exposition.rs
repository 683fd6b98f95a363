//! The Prometheus text form of [`LatencyHistogram`]s, for families that an
//! agent renders itself (the recorder of `metrics-exporter-prometheus`
//! would queue every sample until the next render, which allocates on the
//! recording path).
//!
//! A family is written in seconds, with the bounds of
//! [`LATENCY_BUCKETS_SECONDS`]; every bucket is exact (see
//! [`crate::latency`]). Each series is rendered from one snapshot, so its
//! `_count` always equals its `+Inf` bucket; `_sum` is the exact sum.

#[cfg(test)]
mod tests;

use std::fmt::Write;

use crate::{LATENCY_BUCKETS_SECONDS, LatencyHistogram, LatencySnapshot};

/// One labelled series of a latency histogram family.
#[derive(Debug, Clone, Copy)]
pub struct HistogramSeries<'a> {
    /// Every label but `le`, global ones included.
    pub labels: &'a [(&'a str, &'a str)],
    pub histogram: &'a LatencyHistogram,
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

/// Appends one histogram family `name` (which should end in `_seconds`):
/// HELP, TYPE, then per series its cumulative buckets, `_sum` and `_count`,
/// then a blank line as the recorder does.
pub fn write_histogram(out: &mut String, name: &str, help: &str, series: &[HistogramSeries<'_>]) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
    let _ = writeln!(out, "# TYPE {name} histogram");
    let bounds = LATENCY_BUCKETS_SECONDS.map(|s| s.to_string());
    for s in series {
        write_series(out, name, s.labels, &bounds, &s.histogram.snapshot());
    }
    out.push('\n');
}

fn write_series(out: &mut String, name: &str, labels: &[(&str, &str)], bounds: &[String], snapshot: &LatencySnapshot) {
    let count = snapshot.count();
    let cumulative = snapshot.cumulative_at_bounds();
    let buckets = bounds.iter().map(String::as_str).zip(cumulative).chain([("+Inf", count)]);
    for (le, n) in buckets {
        let _ = write!(out, "{name}_bucket");
        write_labels(out, labels, Some(le));
        let _ = writeln!(out, " {n}");
    }
    let _ = write!(out, "{name}_sum");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {}", snapshot.sum_ns() as f64 / 1e9);
    let _ = write!(out, "{name}_count");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {count}");
}
