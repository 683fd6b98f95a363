//! The source agent's Prometheus metrics, served on `--metrics-listen`
//! (`GET /metrics`). Every series carries `vm` (the agent's `--vm`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pageserver_source_request_duration_seconds` | histogram | `rpc` (one observation per unary call; per request inside a `GetPages` stream) |
//! | `pageserver_source_requests_rejected_total` | counter | `rpc` (calls, or `GetPages` requests, answered with an error) |
//! | `pageserver_source_pages_served_total` | counter | |
//! | `pageserver_source_zero_pages_served_total` | counter | |
//! | `pageserver_source_bytes_served_total` | counter | |
//! | `pageserver_source_dirty_scan_duration_seconds` | histogram | |
//! | `pageserver_source_dirty_scan_pages` | histogram | (dirty pages found per scan) |
//! | `pageserver_source_paused` | gauge | (1 while the VM is paused, or gone, or a memory file) |
//! | `pageserver_source_epoch` | gauge | (the newest complete dirty epoch) |
//! | `pageserver_build_info` | gauge | `version`, `agent="source"` |
//!
//! Histograms are recorded where things happen ([`observe_request`],
//! [`observe_scan`]) on the global recorder that [`install`] sets up; the
//! counters are the agent's own atomics ([`ServeCounters`](crate::ServeCounters)),
//! copied into the recorder right before each render by [`SourceCollector`].
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use pageserver_metrics::{
    Collector, LATENCY_BUCKETS_SECONDS, Matcher, MetricsError, MetricsHandle, PrometheusRecorder,
};

use crate::agent::SourceAgent;

pub const REQUEST_DURATION: &str = "pageserver_source_request_duration_seconds";
pub const REQUESTS_REJECTED: &str = "pageserver_source_requests_rejected_total";
pub const PAGES_SERVED: &str = "pageserver_source_pages_served_total";
pub const ZERO_PAGES_SERVED: &str = "pageserver_source_zero_pages_served_total";
pub const BYTES_SERVED: &str = "pageserver_source_bytes_served_total";
pub const DIRTY_SCAN_DURATION: &str = "pageserver_source_dirty_scan_duration_seconds";
pub const DIRTY_SCAN_PAGES: &str = "pageserver_source_dirty_scan_pages";
pub const PAUSED: &str = "pageserver_source_paused";
pub const EPOCH: &str = "pageserver_source_epoch";

/// Buckets of `pageserver_source_dirty_scan_pages`.
pub const DIRTY_SCAN_PAGES_BUCKETS: [f64; 8] = [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

/// The RPCs the source serves, as the `rpc` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    GetLayout = 0,
    GetPage = 1,
    GetPages = 2,
    GetDirtyBitmap = 3,
    SetPaused = 4,
}

impl Rpc {
    pub const COUNT: usize = 5;
    pub const ALL: [Rpc; Rpc::COUNT] =
        [Rpc::GetLayout, Rpc::GetPage, Rpc::GetPages, Rpc::GetDirtyBitmap, Rpc::SetPaused];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::GetLayout => "GetLayout",
            Rpc::GetPage => "GetPage",
            Rpc::GetPages => "GetPages",
            Rpc::GetDirtyBitmap => "GetDirtyBitmap",
            Rpc::SetPaused => "SetPaused",
        }
    }
}

/// Records one request's duration (a no-op until [`install`] ran).
pub fn observe_request(rpc: Rpc, elapsed: Duration) {
    histogram!(REQUEST_DURATION, "rpc" => rpc.name()).record(elapsed.as_secs_f64());
}

/// Records one dirty scan (a no-op until [`install`] ran).
pub fn observe_scan(elapsed: Duration, dirty_pages: u64) {
    histogram!(DIRTY_SCAN_DURATION).record(elapsed.as_secs_f64());
    histogram!(DIRTY_SCAN_PAGES).record(dirty_pages as f64);
}

/// The recorder: `vm` on every series, latency buckets from 1 µs to 1 s,
/// page-count buckets for the scan sizes.
pub fn recorder(vm: &str) -> Result<PrometheusRecorder, MetricsError> {
    Ok(pageserver_metrics::builder(vm)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &LATENCY_BUCKETS_SECONDS)?
        .set_buckets_for_metric(Matcher::Full(DIRTY_SCAN_DURATION.into()), &LATENCY_BUCKETS_SECONDS)?
        .set_buckets_for_metric(Matcher::Full(DIRTY_SCAN_PAGES.into()), &DIRTY_SCAN_PAGES_BUCKETS)?
        .build_recorder())
}

/// Builds the recorder for `agent`, registers every metric on it and
/// installs it as the process's global recorder. Once per process.
pub fn install(agent: Arc<SourceAgent>) -> Result<MetricsHandle, MetricsError> {
    let recorder = recorder(agent.vm())?;
    pageserver_metrics::install(recorder, || SourceCollector::register(agent))
}

/// Registers every metric on `recorder` without installing it globally
/// (the histograms then stay empty: they record to the global recorder).
pub fn local_handle(recorder: &PrometheusRecorder, agent: Arc<SourceAgent>) -> MetricsHandle {
    pageserver_metrics::register(recorder, || SourceCollector::register(agent))
}

/// Copies the agent's counters and state into the recorder at scrape time.
#[derive(Debug)]
pub struct SourceCollector {
    agent: Arc<SourceAgent>,
    pages_served: Counter,
    zero_pages_served: Counter,
    bytes_served: Counter,
    rejected: [Counter; Rpc::COUNT],
    paused: Gauge,
    epoch: Gauge,
}

impl SourceCollector {
    /// Describes every metric and creates the handles, on the current
    /// recorder. Histograms are registered too, so that they are rendered
    /// (empty) before their first observation.
    fn register(agent: Arc<SourceAgent>) -> Self {
        describe_histogram!(
            REQUEST_DURATION,
            Unit::Seconds,
            "Time to answer one request: a unary call, or one request inside a GetPages stream."
        );
        describe_counter!(
            REQUESTS_REJECTED,
            "Requests answered with an error: unary calls, GetPages streams refused as a whole, and single \
             requests refused inside a GetPages stream."
        );
        describe_counter!(PAGES_SERVED, "Pages sent by GetPage and GetPages, zero pages included.");
        describe_counter!(ZERO_PAGES_SERVED, "Pages sent as a zero flag, without data.");
        describe_counter!(BYTES_SERVED, Unit::Bytes, "Page data bytes sent (zero pages count 0).");
        describe_histogram!(
            DIRTY_SCAN_DURATION,
            Unit::Seconds,
            "Duration of one dirty scan (PAGEMAP_SCAN over every region)."
        );
        describe_histogram!(DIRTY_SCAN_PAGES, Unit::Count, "Dirty pages found by one scan.");
        describe_gauge!(PAUSED, "1 while the VM is paused (or its VMM is gone, or a memory file is served), else 0.");
        describe_gauge!(EPOCH, "The newest complete dirty epoch (0 before the memory is attached).");
        pageserver_metrics::register_build_info("source", env!("CARGO_PKG_VERSION"));
        for rpc in Rpc::ALL {
            let _ = histogram!(REQUEST_DURATION, "rpc" => rpc.name());
        }
        let _ = histogram!(DIRTY_SCAN_DURATION);
        let _ = histogram!(DIRTY_SCAN_PAGES);
        Self {
            agent,
            pages_served: counter!(PAGES_SERVED),
            zero_pages_served: counter!(ZERO_PAGES_SERVED),
            bytes_served: counter!(BYTES_SERVED),
            rejected: Rpc::ALL.map(|rpc| counter!(REQUESTS_REJECTED, "rpc" => rpc.name())),
            paused: gauge!(PAUSED),
            epoch: gauge!(EPOCH),
        }
    }
}

impl Collector for SourceCollector {
    fn collect(&self) {
        let counters = &self.agent.counters;
        self.pages_served.absolute(counters.pages_served.load(Ordering::Relaxed));
        self.zero_pages_served.absolute(counters.zero_pages_served.load(Ordering::Relaxed));
        self.bytes_served.absolute(counters.bytes_served.load(Ordering::Relaxed));
        for (counter, rejected) in self.rejected.iter().zip(&counters.requests_rejected) {
            counter.absolute(rejected.load(Ordering::Relaxed));
        }
        let (paused, epoch) =
            self.agent.memory().map_or((false, 0), |memory| (memory.dirty().is_paused(), memory.dirty().epoch()));
        self.paused.set(f64::from(u8::from(paused)));
        self.epoch.set(epoch as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_and_labelled_before_any_traffic() {
        let agent = Arc::new(SourceAgent::waiting_for_handoff("src-vm", std::path::Path::new("/tmp/none.sock")));
        agent.counters.pages_served.store(5, Ordering::Relaxed);
        agent.counters.reject(Rpc::GetPage);
        let recorder = recorder(agent.vm()).expect("recorder");
        let text = local_handle(&recorder, agent).render();
        for name in [REQUEST_DURATION, REQUESTS_REJECTED, PAGES_SERVED, DIRTY_SCAN_DURATION, DIRTY_SCAN_PAGES, PAUSED] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help:\n{text}");
        }
        assert!(text.contains("pageserver_source_pages_served_total{vm=\"src-vm\"} 5\n"), "{text}");
        assert!(
            text.contains("pageserver_source_requests_rejected_total{vm=\"src-vm\",rpc=\"GetPage\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("pageserver_source_paused{vm=\"src-vm\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE pageserver_source_request_duration_seconds histogram"), "{text}");
        assert!(
            text.contains(
                "pageserver_source_request_duration_seconds_bucket{vm=\"src-vm\",rpc=\"GetPages\",le=\"0.000001\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains("pageserver_source_dirty_scan_pages_bucket{vm=\"src-vm\",le=\"0\"} 0"), "{text}");
        assert!(text.contains("agent=\"source\""), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains("vm=\"src-vm\""), "unlabelled series: {line}");
        }
    }
}
