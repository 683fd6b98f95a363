//! Prometheus plumbing that both agents share.
//!
//! Each agent builds a `metrics-exporter-prometheus` recorder with
//! [`builder`] (its VM's name as the global label `vm` on every series, real
//! histograms with buckets from 1 µs to 1 s), registers its metrics on it and
//! serves them with [`serve_metrics`] on its own port (`GET /metrics`).
//!
//! Hot paths keep counting into their own atomics, as before metrics
//! existed; a [`Collector`] copies those into the recorder's counters and
//! gauges right before each render (`Counter::absolute`, `Gauge::set`), so a
//! scrape costs the hot path nothing. Latencies recorded where a lock or an
//! allocation is not acceptable (the target's fault path) go into a
//! [`LatencyHistogram`], once: it gives the percentiles of a status report
//! and, rendered by the collector with [`write_histogram`], a Prometheus
//! histogram with the [`LATENCY_BUCKETS_NS`] bounds in the same exposition
//! text.
//!
//! - [`latency`]: [`LatencyHistogram`], its snapshots and summaries;
//! - [`exposition`]: latency histograms in the Prometheus text format;
//! - [`http`]: the `/metrics` server (axum's routing on hyper's HTTP/1
//!   connections);
//! - [`scrape`](mod@scrape): a client for it (the demo and the tests).
#![forbid(unsafe_code)]

pub mod exposition;
pub mod http;
pub mod latency;
pub mod scrape;

use std::fmt;
use std::sync::Arc;

pub use exposition::{HistogramSeries, write_histogram};
pub use http::serve_metrics;
pub use latency::{LatencyHistogram, LatencySnapshot, LatencySummary};
pub use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
pub use scrape::{ScrapeError, scrape, scrape_over};

/// Upper bounds of the Prometheus latency buckets, in nanoseconds: 1 µs to
/// 1 s in 1-2-5 steps, which spans both a fault resolved at once (a few µs)
/// and one waiting on a slow network (ms). [`LatencyHistogram`] builds its
/// slot table from them at compile time, so that each counts exactly.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];

/// The same bounds in seconds: the recorder's histogram buckets, and the
/// `le` labels [`write_histogram`] writes.
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] =
    [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0];

/// `pageserver_build_info{version, agent}`: always 1.
pub const BUILD_INFO: &str = "pageserver_build_info";

/// The global label every series carries.
pub const VM_LABEL: &str = "vm";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("configuring the Prometheus recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

/// A recorder builder for one agent: `vm` on every series, and every
/// histogram a real histogram with [`LATENCY_BUCKETS_SECONDS`] unless the
/// caller sets other buckets for it (`set_buckets_for_metric`).
pub fn builder(vm: &str) -> Result<PrometheusBuilder, MetricsError> {
    Ok(PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS_SECONDS)?.add_global_label(VM_LABEL, vm))
}

/// Describes and sets `pageserver_build_info{version, agent} 1` on the
/// current recorder.
pub fn register_build_info(agent: &'static str, version: &'static str) {
    metrics::describe_gauge!(BUILD_INFO, "Always 1: the agent's kind and its version.");
    metrics::gauge!(BUILD_INFO, "version" => version, "agent" => agent).set(1.0);
}

/// Brings an agent's exported values up to date right before a render.
pub trait Collector: Send + Sync + fmt::Debug + 'static {
    /// Copies the agent's own counters and state into the recorder's
    /// counters and gauges.
    fn collect(&self);

    /// Appends families the recorder does not hold (complete exposition
    /// text: HELP, TYPE and samples).
    fn render_extra(&self, _out: &mut String) {}
}

/// What `/metrics` renders: the recorder's metrics, brought up to date by the
/// agent's collector first.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    collector: Option<Arc<dyn Collector>>,
}

impl fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsHandle").field("collector", &self.collector).finish_non_exhaustive()
    }
}

impl MetricsHandle {
    pub fn new(prometheus: PrometheusHandle, collector: Option<Arc<dyn Collector>>) -> Self {
        Self { prometheus, collector }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        if let Some(collector) = &self.collector {
            collector.collect();
        }
        let mut text = self.prometheus.render();
        if let Some(collector) = &self.collector {
            collector.render_extra(&mut text);
        }
        text
    }

    /// Folds the recorder's pending histogram samples into its buckets, so
    /// they do not pile up between scrapes.
    pub fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

/// Registers an agent's metrics on `recorder` (`register` runs with it as
/// the current recorder: its `describe_*!` and handle macros go there) and
/// returns the handle that renders them. The recorder is not installed
/// globally: tests can hold several.
pub fn register<C: Collector>(recorder: &PrometheusRecorder, register: impl FnOnce() -> C) -> MetricsHandle {
    let collector = metrics::with_local_recorder(recorder, register);
    MetricsHandle::new(recorder.handle(), Some(Arc::new(collector)))
}

/// [`register`], then installs `recorder` as the process's global recorder,
/// so that `metrics::histogram!` and friends anywhere in the agent record
/// to it.
pub fn install<C: Collector>(
    recorder: PrometheusRecorder,
    register_metrics: impl FnOnce() -> C,
) -> Result<MetricsHandle, MetricsError> {
    let handle = register(&recorder, register_metrics);
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(metrics::Counter);

    impl Collector for Fixed {
        fn collect(&self) {
            self.0.absolute(42);
        }
        fn render_extra(&self, out: &mut String) {
            out.push_str("# TYPE extra gauge\nextra 1\n");
        }
    }

    #[test]
    fn render_collects_first_and_carries_the_vm_label() {
        let recorder = builder("vm-a").expect("builder").build_recorder();
        let handle = register(&recorder, || {
            register_build_info("source", "9.9.9");
            metrics::describe_counter!("t_total", "A test counter.");
            Fixed(metrics::counter!("t_total"))
        });
        let text = handle.render();
        assert!(text.contains("# HELP t_total A test counter."), "{text}");
        assert!(text.contains("t_total{vm=\"vm-a\"} 42"), "{text}");
        assert!(text.contains("pageserver_build_info{vm=\"vm-a\",version=\"9.9.9\",agent=\"source\"} 1"), "{text}");
        assert!(text.ends_with("extra 1\n"), "{text}");
    }

    #[test]
    fn latency_bounds_agree() {
        for (ns, s) in LATENCY_BUCKETS_NS.iter().zip(LATENCY_BUCKETS_SECONDS) {
            assert!((*ns as f64 / 1e9 - s).abs() < s * 1e-9, "{ns} ns vs {s} s");
        }
        assert!(LATENCY_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }
}
