//! The fault-latency distributions of a run, drawn as an SVG (cumulative
//! fractions over a logarithmic latency axis): the agent's fresh and stale
//! faults and its stale 2 MiB faults, against the floor's 4 KiB and 2 MiB
//! round trips and the minimal handler. Written by hand (a few lines of
//! SVG), so that the figure needs no plotting library.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

/// One curve: its label and points (latency in µs, fraction of samples at
/// or below it), ascending.
#[derive(Debug, Clone, Default)]
pub struct Distribution {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

impl Distribution {
    /// The empirical distribution of `samples_us`.
    pub fn of_samples(label: &str, samples_us: &[f64]) -> Self {
        let mut sorted: Vec<f64> = samples_us.iter().copied().filter(|s| s.is_finite() && *s > 0.0).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        // At most MAX_POINTS steps: enough for the eye, and a figure of a
        // few kilobytes rather than one point per sample.
        let steps = n.min(MAX_POINTS);
        let points = (1..=steps)
            .map(|k| {
                let rank = (k * n).div_ceil(steps);
                (sorted[rank - 1], rank as f64 / n as f64)
            })
            .collect();
        Self { label: label.to_owned(), points }
    }

    /// The distribution of a Prometheus histogram's cumulative buckets
    /// (upper bound in seconds, count at or below it), `+Inf` left out.
    pub fn of_buckets(label: &str, buckets: &[(f64, f64)]) -> Self {
        let total = buckets.iter().map(|&(_, count)| count).fold(0.0, f64::max);
        let points = if total > 0.0 {
            buckets.iter().filter(|(le, _)| le.is_finite()).map(|&(le, count)| (le * 1e6, count / total)).collect()
        } else {
            Vec::new()
        };
        Self { label: label.to_owned(), points }
    }
}

/// The cumulative buckets of `metric` in Prometheus text `exposition`, over
/// every series whose labels contain each of `labels` (`name="value"`),
/// summed by `le`.
pub fn buckets(exposition: &str, metric: &str, labels: &[&str]) -> Vec<(f64, f64)> {
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    let prefix = format!("{metric}_bucket{{");
    for line in exposition.lines().filter(|line| line.starts_with(&prefix)) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        if !labels.iter().all(|label| series.contains(label)) {
            continue;
        }
        let le = series.split("le=\"").nth(1).and_then(|rest| rest.split('"').next());
        let (Some(le), Ok(count)) = (le, value.parse::<f64>()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        match by_le.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, sum)) => *sum += count,
            None => by_le.push((le, count)),
        }
    }
    by_le.retain(|(le, _)| !le.is_nan());
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// The most points a curve of samples is drawn with.
const MAX_POINTS: usize = 400;
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 50.0;
/// The latency axis: 1 µs to 100 ms.
const DECADES: (i32, i32) = (0, 5);
const COLOURS: [&str; 7] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f"];

/// The SVG of `curves` (those without points are left out).
pub fn svg(title: &str, curves: &[Distribution]) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let (low, high) = (f64::from(DECADES.0), f64::from(DECADES.1));
    let x = |us: f64| LEFT + (us.max(1e-3).log10().clamp(low, high) - low) / (high - low) * plot_w;
    let y = |fraction: f64| TOP + (1.0 - fraction.clamp(0.0, 1.0)) * plot_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="14">{}</text>"#, escape(title));
    for decade in DECADES.0..=DECADES.1 {
        let gx = x(10f64.powi(decade));
        let label = ["1 µs", "10 µs", "100 µs", "1 ms", "10 ms", "100 ms"][(decade - DECADES.0) as usize];
        let _ = writeln!(
            out,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0
        );
    }
    for tenth in 0..=10 {
        let fraction = f64::from(tenth) / 10.0;
        let gy = y(fraction);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{fraction:.1}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            gy + 4.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">fraction at or below</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (index, curve) in curves.iter().filter(|c| !c.points.is_empty()).enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let mut path = String::new();
        let mut previous = 0.0;
        for (i, &(us, fraction)) in curve.points.iter().enumerate() {
            // A step curve: up at each point, from the previous fraction.
            let (px, py0, py1) = (x(us), y(previous), y(fraction));
            let _ = write!(path, "{}{px:.1},{py0:.1} L{px:.1},{py1:.1} ", if i == 0 { "M" } else { "L" });
            previous = fraction;
        }
        let _ = writeln!(out, r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#, path.trim_end());
        let ly = TOP + 10.0 + index as f64 * 18.0;
        let lx = LEFT + plot_w + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&curve.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_summed_over_the_matching_series() {
        let text = "\
m_bucket{resolution=\"fresh\",state_known=\"true\",le=\"0.00001\"} 3
m_bucket{resolution=\"fresh\",state_known=\"false\",le=\"0.00001\"} 1
m_bucket{resolution=\"fresh\",state_known=\"true\",le=\"+Inf\"} 5
m_bucket{resolution=\"fresh\",state_known=\"false\",le=\"+Inf\"} 1
m_bucket{resolution=\"fetched\",state_known=\"true\",le=\"0.00001\"} 9
";
        let b = buckets(text, "m", &["resolution=\"fresh\""]);
        assert_eq!(b, [(0.00001, 4.0), (f64::INFINITY, 6.0)]);
        let d = Distribution::of_buckets("fresh", &b);
        assert_eq!(d.points.len(), 1);
        assert!((d.points[0].0 - 10.0).abs() < 1e-9 && (d.points[0].1 - 4.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn the_svg_has_one_path_per_curve_with_points() {
        let curves = [
            Distribution::of_samples("a", &[1.0, 2.0, 3.0]),
            Distribution::of_samples("empty", &[]),
            Distribution::of_samples("b <2 MiB>", &[100.0]),
        ];
        let svg = svg("t", &curves);
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.contains("b &lt;2 MiB&gt;") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn many_samples_make_a_bounded_curve_that_ends_at_the_maximum() {
        let samples: Vec<f64> = (1..=20_000).map(f64::from).collect();
        let d = Distribution::of_samples("many", &samples);
        assert_eq!(d.points.len(), MAX_POINTS);
        assert_eq!(d.points.last(), Some(&(20_000.0, 1.0)));
        assert!(d.points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }
}
