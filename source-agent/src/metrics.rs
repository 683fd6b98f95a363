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
//! | `pageserver_grpc_*`, `pageserver_metrics_connections_refused_total` | | the limits' refusals and connections: see [`pageserver_agent_shell::limit_metrics`] |
//!
//! Latencies are recorded once, lock- and allocation-free, into
//! [`LatencyHistogram`]s: per RPC in the agent's [`RpcStats`] (by the
//! [`RpcMetricsLayer`](crate::rpc_metrics::RpcMetricsLayer) around each call,
//! and by the service for each request inside a `GetPages` stream), and per
//! dirty scan in the [`DirtyTracker`](crate::dirty::DirtyTracker).
//! [`SourceCollector`] renders them at scrape time
//! ([`write_histogram`]), every series present from the start, and copies
//! the agent's own counters ([`ServeCounters`](crate::agent::ServeCounters),
//! [`RpcStats`]) into the recorder. Only `pageserver_source_dirty_scan_pages`,
//! a page count with its own buckets, is a histogram of the recorder
//! ([`observe_scan_pages`]).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use pageserver_metrics::{
    Collector, HistogramSeries, LatencyHistogram, Matcher, MetricsError, MetricsHandle, PrometheusRecorder, VM_LABEL,
    write_histogram,
};
use pageserver_proto::v1::{migration_source_server, page_server_server};

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

const REQUEST_DURATION_HELP: &str =
    "Time to answer one request: a unary call, or one request inside a GetPages stream.";
const DIRTY_SCAN_DURATION_HELP: &str = "Duration of one dirty scan (PAGEMAP_SCAN over every region).";

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

    /// The `rpc` label, which is also the method's name in its service.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::GetLayout => "GetLayout",
            Rpc::GetPage => "GetPage",
            Rpc::GetPages => "GetPages",
            Rpc::GetDirtyBitmap => "GetDirtyBitmap",
            Rpc::SetPaused => "SetPaused",
        }
    }

    /// The full name of the service the method belongs to.
    pub fn service(self) -> &'static str {
        match self {
            Rpc::GetLayout | Rpc::GetPage | Rpc::GetPages | Rpc::GetDirtyBitmap => page_server_server::SERVICE_NAME,
            Rpc::SetPaused => migration_source_server::SERVICE_NAME,
        }
    }
}

/// Per RPC: how long requests took and how many were answered with an
/// error.
#[derive(Debug, Default)]
pub struct RpcStats {
    latency: [LatencyHistogram; Rpc::COUNT],
    rejected: [AtomicU64; Rpc::COUNT],
}

impl RpcStats {
    /// Records one request of `rpc` that took `elapsed`.
    pub fn observe(&self, rpc: Rpc, elapsed: Duration) {
        record_duration(&self.latency[rpc as usize], elapsed);
    }

    /// Counts one request of `rpc` answered with an error.
    pub fn reject(&self, rpc: Rpc) {
        self.rejected[rpc as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self, rpc: Rpc) -> &LatencyHistogram {
        &self.latency[rpc as usize]
    }

    pub fn rejected(&self, rpc: Rpc) -> u64 {
        self.rejected[rpc as usize].load(Ordering::Relaxed)
    }
}

/// Records `elapsed` into a latency histogram (which counts nanoseconds).
pub fn record_duration(histogram: &LatencyHistogram, elapsed: Duration) {
    histogram.record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
}

/// Records the dirty pages one scan found (a no-op until [`install`] ran).
pub fn observe_scan_pages(dirty_pages: u64) {
    histogram!(DIRTY_SCAN_PAGES).record(dirty_pages as f64);
}

/// The recorder: `vm` on every series, page-count buckets for the scan
/// sizes (its only histogram).
fn recorder(vm: &str) -> Result<PrometheusRecorder, MetricsError> {
    Ok(pageserver_metrics::builder(vm)?
        .set_buckets_for_metric(Matcher::Full(DIRTY_SCAN_PAGES.into()), &DIRTY_SCAN_PAGES_BUCKETS)?
        .build_recorder())
}

/// Builds the recorder for `agent`, registers every metric on it and
/// installs it as the process's global recorder. Once per process.
pub fn install(agent: Arc<SourceAgent>) -> Result<MetricsHandle, MetricsError> {
    let recorder = recorder(agent.vm())?;
    pageserver_metrics::install(recorder, || SourceCollector::register(agent))
}

/// Copies the agent's counters and state into the recorder at scrape time,
/// and renders its latency histograms.
#[derive(Debug)]
pub struct SourceCollector {
    agent: Arc<SourceAgent>,
    pages_served: Counter,
    zero_pages_served: Counter,
    bytes_served: Counter,
    rejected: [Counter; Rpc::COUNT],
    paused: Gauge,
    epoch: Gauge,
    /// Rendered as the scan latencies until memory (and its tracker) is
    /// attached.
    no_scans: LatencyHistogram,
}

impl SourceCollector {
    /// Describes every metric of the recorder and creates the handles, on
    /// the current recorder. The scan-size histogram is registered too, so
    /// that it is rendered (empty) before its first observation.
    fn register(agent: Arc<SourceAgent>) -> Self {
        describe_counter!(
            REQUESTS_REJECTED,
            "Requests answered with an error: unary calls, GetPages streams refused as a whole, and single \
             requests refused inside a GetPages stream."
        );
        describe_counter!(PAGES_SERVED, "Pages sent by GetPage and GetPages, zero pages included.");
        describe_counter!(ZERO_PAGES_SERVED, "Pages sent as a zero flag, without data.");
        describe_counter!(BYTES_SERVED, Unit::Bytes, "Page data bytes sent (zero pages count 0).");
        describe_histogram!(DIRTY_SCAN_PAGES, Unit::Count, "Dirty pages found by one scan.");
        describe_gauge!(PAUSED, "1 while the VM is paused (or its VMM is gone, or a memory file is served), else 0.");
        describe_gauge!(EPOCH, "The newest complete dirty epoch (0 before the memory is attached).");
        pageserver_metrics::register_build_info("source", env!("CARGO_PKG_VERSION"));
        pageserver_agent_shell::limit_metrics::register();
        let _ = histogram!(DIRTY_SCAN_PAGES);
        Self {
            agent,
            pages_served: counter!(PAGES_SERVED),
            zero_pages_served: counter!(ZERO_PAGES_SERVED),
            bytes_served: counter!(BYTES_SERVED),
            rejected: Rpc::ALL.map(|rpc| counter!(REQUESTS_REJECTED, "rpc" => rpc.name())),
            paused: gauge!(PAUSED),
            epoch: gauge!(EPOCH),
            no_scans: LatencyHistogram::new(),
        }
    }
}

impl Collector for SourceCollector {
    fn collect(&self) {
        let counters = &self.agent.counters;
        self.pages_served.absolute(counters.pages_served.load(Ordering::Relaxed));
        self.zero_pages_served.absolute(counters.zero_pages_served.load(Ordering::Relaxed));
        self.bytes_served.absolute(counters.bytes_served.load(Ordering::Relaxed));
        for (counter, rpc) in self.rejected.iter().zip(Rpc::ALL) {
            counter.absolute(self.agent.rpcs.rejected(rpc));
        }
        let (paused, epoch) =
            self.agent.memory().map_or((false, 0), |memory| (memory.dirty().is_paused(), memory.dirty().epoch()));
        self.paused.set(f64::from(u8::from(paused)));
        self.epoch.set(epoch as f64);
    }

    fn render_extra(&self, out: &mut String) {
        let vm = self.agent.vm();
        let labels = Rpc::ALL.map(|rpc| [(VM_LABEL, vm), ("rpc", rpc.name())]);
        let series: Vec<HistogramSeries<'_>> = Rpc::ALL
            .iter()
            .zip(&labels)
            .map(|(&rpc, labels)| HistogramSeries { labels, histogram: self.agent.rpcs.latency(rpc) })
            .collect();
        write_histogram(out, REQUEST_DURATION, REQUEST_DURATION_HELP, &series);
        let scans = self.agent.memory().map_or(&self.no_scans, |memory| memory.dirty().scan_latency());
        let series = [HistogramSeries { labels: &[(VM_LABEL, vm)], histogram: scans }];
        write_histogram(out, DIRTY_SCAN_DURATION, DIRTY_SCAN_DURATION_HELP, &series);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_and_labelled_before_any_traffic() {
        let agent = Arc::new(SourceAgent::waiting_for_handoff("src-vm", std::path::Path::new("/tmp/none.sock")));
        agent.counters.pages_served.store(5, Ordering::Relaxed);
        agent.rpcs.reject(Rpc::GetPage);
        agent.rpcs.observe(Rpc::GetPage, Duration::from_micros(3));
        let recorder = recorder(agent.vm()).expect("recorder");
        let text = pageserver_metrics::register(&recorder, || SourceCollector::register(agent)).render();
        for name in [REQUEST_DURATION, REQUESTS_REJECTED, PAGES_SERVED, DIRTY_SCAN_DURATION, DIRTY_SCAN_PAGES, PAUSED] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help:\n{text}");
        }
        let has = |line: &str| assert!(text.contains(line), "no {line:?} in\n{text}");
        has("pageserver_source_pages_served_total{vm=\"src-vm\"} 5\n");
        has("pageserver_source_requests_rejected_total{vm=\"src-vm\",rpc=\"GetPage\"} 1\n");
        has("pageserver_source_requests_rejected_total{vm=\"src-vm\",rpc=\"SetPaused\"} 0\n");
        has("pageserver_source_paused{vm=\"src-vm\"} 0\n");
        has("# TYPE pageserver_source_request_duration_seconds histogram\n");
        for rpc in Rpc::ALL {
            let observed = u8::from(rpc == Rpc::GetPage);
            let labels = format!("vm=\"src-vm\",rpc=\"{}\"", rpc.name());
            has(&format!("pageserver_source_request_duration_seconds_bucket{{{labels},le=\"0.000001\"}} 0\n"));
            has(&format!("pageserver_source_request_duration_seconds_bucket{{{labels},le=\"0.000005\"}} {observed}\n"));
            has(&format!("pageserver_source_request_duration_seconds_count{{{labels}}} {observed}\n"));
        }
        has("# TYPE pageserver_source_dirty_scan_duration_seconds histogram\n");
        has("pageserver_source_dirty_scan_duration_seconds_bucket{vm=\"src-vm\",le=\"1\"} 0\n");
        has("pageserver_source_dirty_scan_duration_seconds_count{vm=\"src-vm\"} 0\n");
        has("pageserver_source_dirty_scan_pages_bucket{vm=\"src-vm\",le=\"0\"} 0");
        has("agent=\"source\"");
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains("vm=\"src-vm\""), "unlabelled series: {line}");
        }
    }
}
