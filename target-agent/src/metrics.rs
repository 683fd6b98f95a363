//! The target agent's Prometheus metrics, served on `--metrics-listen`
//! (`GET /metrics`). Every series carries `vm` (the agent's `--vm`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pageserver_target_fault_latency_seconds` | histogram | `resolution` (`fresh`, `fetched`, `missing`), `state_known` |
//! | `pageserver_target_faults_total` | counter | `resolution`, `state_known` |
//! | `pageserver_target_fetch_latency_seconds` | histogram | (demand `GetPages` round trip) |
//! | `pageserver_target_pages_fetched_total` | counter | `origin` (`demand`, `background`) |
//! | `pageserver_target_pages_fetched_unknown_total` | counter | |
//! | `pageserver_target_pages_installed_bulk_total` | counter | |
//! | `pageserver_target_bytes_received_total` | counter | |
//! | `pageserver_target_precopy_rounds_total` | counter | |
//! | `pageserver_target_precopy_pages_total` | counter | |
//! | `pageserver_target_precopy_dirty_pages` | gauge | (dirty set of the latest pre-copy round) |
//! | `pageserver_target_stale_pages_at_switchover` | gauge | |
//! | `pageserver_target_pages` | gauge | `state` (`unknown`, `fresh`, `stale`, `fetching_unknown`, `fetching_stale`, `installed`) |
//! | `pageserver_target_phase` | gauge | `phase` (1 for the current one, 0 for the others) |
//! | `pageserver_target_source_up` | gauge | (1 while the last call to the source reached it) |
//! | `pageserver_target_faults_waiting` | gauge | (pages with a fault waiting for their fetch) |
//! | `pageserver_target_source_reconnects_total` | counter | (connections to the source after the first) |
//! | `pageserver_target_source_restarts_total` | counter | (new source-agent incarnations after the first) |
//! | `pageserver_target_source_replies_refused_total` | counter | (replies refused by the fence: wrong memory, not paused) |
//! | `pageserver_target_stalled_seconds` | gauge | (seconds without progress in pre-copy or post-copy) |
//! | `pageserver_target_faults_blocked` | gauge | `reason` (`outside_regions`, `install_failed`, `source_refused`, `source_unreachable`, `fault_loop_stopped`, `migration_failed`): faults that will never be resolved; each fails the migration |
//! | `pageserver_build_info` | gauge | `version`, `agent="target"` |
//! | `pageserver_grpc_*`, `pageserver_metrics_connections_refused_total` | | the limits' refusals and connections: see [`pageserver_agent_shell::limit_metrics`] |
//!
//! `state_known="false"`: the fault hit a page whose state was still
//! `unknown` (before the final bitmap) and was fetched from the paused
//! source. Fresh and missing (zero-filled hole) faults are always on known
//! pages, so their series exist with `state_known="true"` only.
//!
//! # Nothing on the fault path
//!
//! The fault loop records into [`TargetStats`](crate::stats::TargetStats):
//! relaxed atomic adds and one [`LatencyHistogram`](pageserver_metrics::LatencyHistogram)
//! record per fault, no allocation, no lock. At scrape time
//! [`TargetCollector`] copies the counters into the recorder
//! (`Counter::absolute`, `Gauge::set`), counts page states, and renders the
//! latency histograms itself. Recording into the recorder's own histograms
//! would queue every sample until the next render, allocating a block every
//! few dozen faults, and grow without bound when nobody scrapes.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, gauge};
use pageserver_metrics::{
    Collector, HistogramSeries, MetricsError, MetricsHandle, PrometheusRecorder, VM_LABEL, write_histogram,
};

use crate::agent::TargetAgent;
use crate::page_state::PageState;
use crate::phase::Phase;
use crate::stats::{BlockReason, FaultKind};

pub const FAULT_LATENCY: &str = "pageserver_target_fault_latency_seconds";
pub const FAULTS: &str = "pageserver_target_faults_total";
pub const FETCH_LATENCY: &str = "pageserver_target_fetch_latency_seconds";
pub const PAGES_FETCHED: &str = "pageserver_target_pages_fetched_total";
pub const PAGES_FETCHED_UNKNOWN: &str = "pageserver_target_pages_fetched_unknown_total";
pub const PAGES_INSTALLED_BULK: &str = "pageserver_target_pages_installed_bulk_total";
pub const BYTES_RECEIVED: &str = "pageserver_target_bytes_received_total";
pub const PRECOPY_ROUNDS: &str = "pageserver_target_precopy_rounds_total";
pub const PRECOPY_PAGES: &str = "pageserver_target_precopy_pages_total";
pub const PRECOPY_DIRTY_PAGES: &str = "pageserver_target_precopy_dirty_pages";
pub const STALE_PAGES_AT_SWITCHOVER: &str = "pageserver_target_stale_pages_at_switchover";
pub const PAGES: &str = "pageserver_target_pages";
pub const PHASE: &str = "pageserver_target_phase";
pub const SOURCE_UP: &str = "pageserver_target_source_up";
pub const SOURCE_RECONNECTS: &str = "pageserver_target_source_reconnects_total";
pub const SOURCE_RESTARTS: &str = "pageserver_target_source_restarts_total";
pub const SOURCE_REPLIES_REFUSED: &str = "pageserver_target_source_replies_refused_total";
pub const STALLED_SECONDS: &str = "pageserver_target_stalled_seconds";
pub const FAULTS_WAITING: &str = "pageserver_target_faults_waiting";
pub const FAULTS_BLOCKED: &str = "pageserver_target_faults_blocked";

/// The (resolution, state known) pairs that can happen.
pub const FAULT_SERIES: [(FaultKind, bool); 4] =
    [(FaultKind::Fresh, true), (FaultKind::Fetched, true), (FaultKind::Fetched, false), (FaultKind::Missing, true)];

fn known_label(known: bool) -> &'static str {
    if known { "true" } else { "false" }
}

/// The recorder: `vm` on every series.
pub fn recorder(vm: &str) -> Result<PrometheusRecorder, MetricsError> {
    Ok(pageserver_metrics::builder(vm)?.build_recorder())
}

/// Builds the recorder for `agent`, registers every metric on it and
/// installs it as the process's global recorder. Once per process.
pub fn install(agent: Arc<TargetAgent>) -> Result<MetricsHandle, MetricsError> {
    let recorder = recorder(&agent.config.vm)?;
    pageserver_metrics::install(recorder, || TargetCollector::register(agent))
}

/// Registers every metric on `recorder` without installing it globally.
pub fn local_handle(recorder: &PrometheusRecorder, agent: Arc<TargetAgent>) -> MetricsHandle {
    pageserver_metrics::register(recorder, || TargetCollector::register(agent))
}

/// Copies the agent's counters and state into the recorder at scrape time,
/// and renders its latency histograms.
#[derive(Debug)]
pub struct TargetCollector {
    agent: Arc<TargetAgent>,
    faults: [Counter; FAULT_SERIES.len()],
    pages_fetched_demand: Counter,
    pages_fetched_background: Counter,
    pages_fetched_unknown: Counter,
    pages_installed_bulk: Counter,
    bytes_received: Counter,
    precopy_rounds: Counter,
    precopy_pages: Counter,
    precopy_dirty_pages: Gauge,
    stale_pages_at_switchover: Gauge,
    pages: [Gauge; PageState::ALL.len()],
    phase: [Gauge; Phase::ALL.len()],
    source_up: Gauge,
    source_reconnects: Counter,
    source_restarts: Counter,
    source_replies_refused: Counter,
    stalled: Gauge,
    faults_waiting: Gauge,
    faults_blocked: [Gauge; BlockReason::ALL.len()],
}

impl TargetCollector {
    /// Describes every metric and creates the handles, on the current recorder.
    fn register(agent: Arc<TargetAgent>) -> Self {
        describe_counter!(
            FAULTS,
            "Guest page faults after switchover, by how they were resolved (fresh: mapped at once; fetched: \
             needed the source; missing: a hole known fresh, zero-filled) and whether the page's state was known \
             (false: unknown, before the final bitmap)."
        );
        describe_counter!(PAGES_FETCHED, "Pages fetched from the source after switchover, by who asked.");
        describe_counter!(PAGES_FETCHED_UNKNOWN, "Pages fetched after switchover while their state was unknown.");
        describe_counter!(PAGES_INSTALLED_BULK, "Fresh pages mapped by the bulk install after the final bitmap.");
        describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Page data bytes received after switchover.");
        describe_counter!(PRECOPY_ROUNDS, "Pre-copy rounds completed.");
        describe_counter!(PRECOPY_PAGES, "Pages transferred during pre-copy.");
        describe_gauge!(PRECOPY_DIRTY_PAGES, "Dirty pages of the latest pre-copy round.");
        describe_gauge!(
            STALE_PAGES_AT_SWITCHOVER,
            "Pages the final bitmap reported dirty since the last pre-copy round."
        );
        describe_gauge!(PAGES, "Guest pages per state (all 0 before the hand-off).");
        describe_gauge!(PHASE, "The migration phase: 1 for the current one, 0 for the others.");
        describe_gauge!(SOURCE_UP, "1 while the last call to the source agent reached it, 0 after it failed to.");
        describe_counter!(SOURCE_RECONNECTS, "Connections to the source agent opened after the first.");
        describe_counter!(
            SOURCE_RESTARTS,
            "New source-agent incarnations seen after the first (each makes every page not known fresh stale)."
        );
        describe_counter!(
            SOURCE_REPLIES_REFUSED,
            "Replies refused by the fence: from another memory than the migration's, or read while the source VM \
             was not paused. Nothing of them is installed."
        );
        describe_gauge!(
            STALLED_SECONDS,
            Unit::Seconds,
            "Seconds since the migration last made progress, in pre-copy and post-copy (0 otherwise)."
        );
        describe_gauge!(FAULTS_WAITING, "Pages with a guest fault waiting until their fetch completes.");
        describe_gauge!(
            FAULTS_BLOCKED,
            "Guest page faults the agent read and will never resolve (the vCPU waits rather than see a wrong \
             page), by reason; any of them fails the migration."
        );
        pageserver_metrics::register_build_info("target", env!("CARGO_PKG_VERSION"));
        pageserver_agent_shell::limit_metrics::register();
        Self {
            faults: FAULT_SERIES.map(
                |(kind, known)| counter!(FAULTS, "resolution" => kind.name(), "state_known" => known_label(known)),
            ),
            pages_fetched_demand: counter!(PAGES_FETCHED, "origin" => "demand"),
            pages_fetched_background: counter!(PAGES_FETCHED, "origin" => "background"),
            pages_fetched_unknown: counter!(PAGES_FETCHED_UNKNOWN),
            pages_installed_bulk: counter!(PAGES_INSTALLED_BULK),
            bytes_received: counter!(BYTES_RECEIVED),
            precopy_rounds: counter!(PRECOPY_ROUNDS),
            precopy_pages: counter!(PRECOPY_PAGES),
            precopy_dirty_pages: gauge!(PRECOPY_DIRTY_PAGES),
            stale_pages_at_switchover: gauge!(STALE_PAGES_AT_SWITCHOVER),
            pages: PageState::ALL.map(|state| gauge!(PAGES, "state" => state.name())),
            phase: Phase::ALL.map(|phase| gauge!(PHASE, "phase" => phase.name())),
            source_up: gauge!(SOURCE_UP),
            source_reconnects: counter!(SOURCE_RECONNECTS),
            source_restarts: counter!(SOURCE_RESTARTS),
            source_replies_refused: counter!(SOURCE_REPLIES_REFUSED),
            stalled: gauge!(STALLED_SECONDS),
            faults_waiting: gauge!(FAULTS_WAITING),
            faults_blocked: BlockReason::ALL.map(|reason| gauge!(FAULTS_BLOCKED, "reason" => reason.name())),
            agent,
        }
    }
}

impl Collector for TargetCollector {
    fn collect(&self) {
        let s = &self.agent.stats;
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (counter, (kind, known)) in self.faults.iter().zip(FAULT_SERIES) {
            counter.absolute(s.faults(kind, known));
        }
        self.pages_fetched_demand.absolute(ld(&s.pages_fetched_on_demand));
        self.pages_fetched_background.absolute(ld(&s.pages_fetched_background));
        self.pages_fetched_unknown.absolute(ld(&s.pages_fetched_unknown));
        self.pages_installed_bulk.absolute(ld(&s.pages_installed_bulk));
        self.bytes_received.absolute(ld(&s.bytes_received));
        self.precopy_rounds.absolute(ld(&s.precopy_rounds));
        self.precopy_pages.absolute(ld(&s.pages_sent_precopy));
        let latest_round = s.dirty_pages_per_round.lock().map(|rounds| rounds.last().copied()).unwrap_or_default();
        self.precopy_dirty_pages.set(latest_round.unwrap_or(0) as f64);
        self.stale_pages_at_switchover.set(ld(&s.stale_pages_at_switchover) as f64);
        let guest = self.agent.guest.get();
        let counts = guest.map(|g| g.states.counts()).unwrap_or_default();
        for (gauge, count) in self.pages.iter().zip(counts) {
            gauge.set(count as f64);
        }
        let current = self.agent.phase.get();
        for (gauge, phase) in self.phase.iter().zip(Phase::ALL) {
            gauge.set(if phase == current { 1.0 } else { 0.0 });
        }
        self.source_up.set(if s.source_up() { 1.0 } else { 0.0 });
        self.source_reconnects.absolute(ld(&s.source_reconnects));
        self.source_restarts.absolute(ld(&s.source_restarts));
        self.source_replies_refused.absolute(ld(&s.source_replies_refused));
        self.stalled.set(self.agent.stalled_for().as_secs_f64());
        self.faults_waiting.set(guest.map_or(0, |g| g.faults_waiting()) as f64);
        for (gauge, reason) in self.faults_blocked.iter().zip(BlockReason::ALL) {
            gauge.set(s.faults_blocked(reason) as f64);
        }
    }

    fn render_extra(&self, out: &mut String) {
        let s = &self.agent.stats;
        let vm = self.agent.config.vm.as_str();
        let labels = FAULT_SERIES
            .map(|(kind, known)| [(VM_LABEL, vm), ("resolution", kind.name()), ("state_known", known_label(known))]);
        let series: Vec<HistogramSeries<'_>> = FAULT_SERIES
            .iter()
            .zip(&labels)
            .map(|(&(kind, known), labels)| HistogramSeries { labels, histogram: s.fault_latency(kind, known) })
            .collect();
        write_histogram(
            out,
            FAULT_LATENCY,
            "Time from reading a guest page fault to resolving it (UFFDIO_CONTINUE, or the zero page), by \
             resolution and whether the page's state was known.",
            &series,
        );
        write_histogram(
            out,
            FETCH_LATENCY,
            "Round trip of one demand fetch (a GetPages request of the fault loop) to the source.",
            &[HistogramSeries { labels: &[(VM_LABEL, vm)], histogram: &s.fetch_latency }],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::TargetConfig;

    #[test]
    fn renders_every_family_with_the_vm_label() {
        let agent = TargetAgent::new(TargetConfig::new("http://127.0.0.1:1", "/tmp/none.sock", "t-vm"));
        agent.stats.record_fault(FaultKind::Fresh, true);
        agent.stats.record_fault_latency(FaultKind::Fresh, true, 4_000);
        agent.stats.record_fault(FaultKind::Fetched, false);
        agent.stats.record_fault_latency(FaultKind::Fetched, false, 150_000);
        agent.stats.fetch_latency.record(90_000);
        agent.stats.block_faults(BlockReason::SourceRefused, 2);
        let recorder = recorder("t-vm").expect("recorder");
        let text = local_handle(&recorder, agent).render();
        for name in [FAULTS, PAGES, PHASE, SOURCE_UP, FAULTS_WAITING, FAULTS_BLOCKED, FAULT_LATENCY, FETCH_LATENCY] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help:\n{text}");
        }
        let has = |line: &str| assert!(text.contains(line), "no {line:?} in\n{text}");
        has("pageserver_target_phase{vm=\"t-vm\",phase=\"waiting-for-handoff\"} 1\n");
        has("pageserver_target_phase{vm=\"t-vm\",phase=\"complete\"} 0\n");
        has("pageserver_target_faults_total{vm=\"t-vm\",resolution=\"fetched\",state_known=\"false\"} 1\n");
        has("pageserver_target_pages{vm=\"t-vm\",state=\"fetching_unknown\"} 0\n");
        has("pageserver_target_source_up{vm=\"t-vm\"} 0\n");
        has("pageserver_target_faults_blocked{vm=\"t-vm\",reason=\"source_refused\"} 2\n");
        has("pageserver_target_faults_blocked{vm=\"t-vm\",reason=\"install_failed\"} 0\n");
        has(
            "pageserver_target_fault_latency_seconds_bucket{vm=\"t-vm\",resolution=\"fresh\",state_known=\"true\",le=\"0.000005\"} 1\n",
        );
        has(
            "pageserver_target_fault_latency_seconds_count{vm=\"t-vm\",resolution=\"fetched\",state_known=\"false\"} 1\n",
        );
        has("pageserver_target_fetch_latency_seconds_bucket{vm=\"t-vm\",le=\"0.0001\"} 1\n");
        has("agent=\"target\"");
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains("vm=\"t-vm\""), "unlabelled series: {line}");
        }
    }
}
