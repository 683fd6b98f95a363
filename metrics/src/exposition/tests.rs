//! The text form of latency histograms.

use super::*;

fn render(labels: &[(&str, &str)], histogram: &LatencyHistogram) -> String {
    let mut out = String::new();
    write_histogram(&mut out, "x_seconds", "Test.", &[HistogramSeries { labels, histogram }]);
    out
}

/// The value of the sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad sample {line}"))
}

#[test]
fn renders_seconds_cumulative_with_escaped_labels() {
    let h = LatencyHistogram::new();
    h.record(700); // 0.7 µs
    h.record(7_000); // 7 µs
    h.record(3_000_000_000); // 3 s: only +Inf
    let out = render(&[("vm", "a\"b\\c\nd"), ("resolution", "fresh")], &h);
    let series = r#"{vm="a\"b\\c\nd",resolution="fresh""#;
    assert!(out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"), "{out}");
    assert!(out.contains(&format!("x_seconds_bucket{series},le=\"0.000001\"}} 1\n")), "{out}");
    assert!(out.contains("le=\"0.000005\"} 1\n"), "{out}");
    assert!(out.contains("le=\"0.00001\"} 2\n"), "{out}");
    assert!(out.contains("le=\"1\"} 2\n"), "{out}");
    assert!(out.contains("le=\"+Inf\"} 3\n"), "{out}");
    assert!(out.contains(&format!("x_seconds_count{series}}} 3\n")), "{out}");
    assert!(out.contains(&format!("x_seconds_sum{series}}} 3.0000077\n")), "{out}");
    assert_eq!(out.lines().count(), 2 + 20 + 2 + 1);
    assert!(out.ends_with("} 3\n\n"), "{out}");
}

#[test]
fn a_value_at_a_bound_counts_in_that_bucket() {
    let h = LatencyHistogram::new();
    h.record(5_000);
    let out = render(&[], &h);
    assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.000002\"}"), 0.0, "{out}");
    assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.000005\"}"), 1.0, "{out}");
    h.record(5_001);
    let out = render(&[], &h);
    assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.000005\"}"), 1.0, "{out}");
    assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.00001\"}"), 2.0, "{out}");
}

#[test]
fn buckets_ascend_to_a_count_equal_to_inf_and_an_exact_sum() {
    let h = LatencyHistogram::new();
    let mut sum = 0;
    for i in 0..3_000u64 {
        let ns = (i * i * 7_919) % 2_000_000_000;
        h.record(ns);
        sum += ns;
    }
    let out = render(&[("vm", "v")], &h);
    let buckets: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("x_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number"))
        .collect();
    assert_eq!(buckets.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{out}");
    assert_eq!(buckets.last().copied(), Some(3_000.0));
    assert_eq!(sample(&out, "x_seconds_count"), 3_000.0);
    assert!((sample(&out, "x_seconds_sum") - sum as f64 / 1e9).abs() < 1e-9, "{out}");
}

#[test]
fn help_is_escaped_and_series_follow_each_other() {
    let (a, b) = (LatencyHistogram::new(), LatencyHistogram::new());
    b.record(1);
    let mut out = String::new();
    let series = [
        HistogramSeries { labels: &[("kind", "a")], histogram: &a },
        HistogramSeries { labels: &[("kind", "b")], histogram: &b },
    ];
    write_histogram(&mut out, "y_seconds", "Two\nlines \\ here.", &series);
    assert!(out.starts_with("# HELP y_seconds Two\\nlines \\\\ here.\n"), "{out}");
    assert!(out.contains("y_seconds_count{kind=\"a\"} 0\n"), "{out}");
    assert!(out.contains("y_seconds_count{kind=\"b\"} 1\n"), "{out}");
    assert!(out.contains("y_seconds_bucket{kind=\"b\",le=\"0.000001\"} 1\n"), "{out}");
    assert_eq!(out.matches("# TYPE").count(), 1);
}
