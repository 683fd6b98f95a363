//! What a migration measured: the target agent's final status, the guest's
//! view (downtime, verification) and the orchestrator's phase timings.

use std::collections::BTreeMap;
use std::fmt;

use pageserver_proto::v1::MigrationStatus;
use serde::{Deserialize, Serialize};

/// The fault-resolution kinds the report always lists.
pub const FAULT_KINDS: [&str; 3] = ["fresh", "fetched", "missing"];

/// Fault latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyPercentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Pages the target vCPUs shared and read at once, and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TouchSpread {
    pub pages: u64,
    pub seconds: f64,
}

/// The result of one migration. Serialised as the `--report-json` file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub guest_bytes: u64,
    /// Bytes of the guest ever written: all of it, or a sparse guest's
    /// clusters (`MigrationOptions::written_bytes`).
    pub written_bytes: u64,
    pub page_size: u64,
    pub total_pages: u64,
    pub hugetlb: bool,
    pub vcpus: u64,
    pub seed: u64,
    /// Holes of the source memory when it became ready (up to 16).
    pub zero_pages: Vec<u64>,
    /// The target agent's counters right after the `touch` hook, before the
    /// guest's run (for tests of concurrent faults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_after_touch: Option<StatusAfterTouch>,

    pub precopy_rounds: u64,
    /// Pages the pre-copy rounds asked for, zero pages included (each
    /// counted at a full page, although a zero page travels as a flag).
    pub pages_sent_precopy: u64,
    /// `pages_sent_precopy` in bytes: an upper bound of what pre-copy moved.
    pub precopy_bytes: u64,
    pub dirty_pages_per_round: Vec<u64>,
    /// Seconds each pre-copy round took.
    #[serde(default)]
    pub precopy_round_seconds: Vec<f64>,
    /// Seconds the target's bulk install and background pull took.
    #[serde(default)]
    pub bulk_install_seconds: f64,
    #[serde(default)]
    pub background_pull_seconds: f64,
    /// Seconds from the switchover to the target's final bitmap applied:
    /// faults in this window fetch pages of unknown state.
    #[serde(default)]
    pub final_bitmap_seconds: f64,
    /// `touch_spread_after_resume`: the pages the target vCPUs read, and how
    /// long that took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub touch_spread: Option<TouchSpread>,
    pub stale_pages_at_switchover: u64,

    /// From the source's pause to the end of the target guest's first access.
    pub downtime_ms: f64,
    pub paused_at_ns: u64,
    pub first_access_done_ns: u64,

    pub faults_total: u64,
    pub faults_fresh: u64,
    pub faults_fetched: u64,
    pub faults_missing: u64,
    /// MISSING faults (holes on the target) whose page had to come from the
    /// source: zero at its last copy, written since.
    pub faults_missing_fetched: u64,
    /// Faults on pages whose state was unknown (before the final bitmap).
    pub faults_unknown: u64,
    /// Pages the final bitmap turned from unknown to stale.
    pub pages_marked_stale: u64,
    pub final_bitmap_applied: bool,
    pub pages_fetched_on_demand: u64,
    pub pages_fetched_background: u64,
    pub pages_fetched_unknown: u64,
    pub pages_installed_bulk: u64,
    pub bytes_received: u64,
    /// The target agent's background pull order ("nearest" or "hot").
    #[serde(default)]
    pub pull_order: String,
    /// Stale pages the source's heat hint named.
    #[serde(default)]
    pub hot_pages_hinted: u64,
    /// Pages the background pull asked for before its first unhinted one.
    #[serde(default)]
    pub hot_pages_pulled_first: u64,
    /// Keyed by "fresh", "fetched", "missing" (and any other kind the agent
    /// reports).
    pub fault_latency_us: BTreeMap<String, LatencyPercentiles>,
    /// The time faults waited on the target agent, summed over every fault
    /// (the event read to the page resolved), ms: QEMU's "blocktime".
    #[serde(default)]
    pub fault_wait_ms_total: f64,
    pub pages_by_state: BTreeMap<String, u64>,
    /// Faults the target agent will never resolve, by reason (all 0 unless
    /// the migration failed).
    pub faults_blocked: BTreeMap<String, u64>,

    /// Why the target agent's migration failed after the switchover; the
    /// guest is then frozen, and only the pages it can see were verified
    /// (`verified_pages` counts them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The target agent's phase at the end ("complete", "failed", …).
    pub phase: String,
    /// The target agent's gRPC health at the end (`SERVING`, `NOT_SERVING`).
    pub target_health: String,
    /// The target agent's exit code after SIGTERM at the end (non-zero when
    /// its migration failed; absent if it had to be killed).
    pub target_agent_exit_code: Option<i32>,

    pub guest_accesses: u64,
    pub guest_pages_written: u64,
    /// Distinct pages the target guest's vCPUs accessed after the
    /// switchover: what a MISSING-mode target holding none of the guest's
    /// memory (CRIU lazy pages style) would have fetched for the same run.
    pub guest_pages_touched: u64,
    pub verified_pages: u64,
    /// Of `verified_pages`, those that are holes both in the source's
    /// snapshot and in the target's file: zeros on both sides, verified
    /// without being read (a sparse guest is not faulted in whole); every
    /// other page was compared byte for byte.
    pub verified_hole_pages: u64,
    pub mismatched_pages: u64,
    pub first_mismatches: Vec<u64>,

    /// Until both VMs were ready.
    pub setup_seconds: f64,
    /// Starting dirty tracking on the source, as its VMM stand-in timed
    /// it: from connecting to the source agent's hand-off socket to the
    /// agent's acceptance, which it sends after mapping its watch of removed
    /// pages over every data page and its first PAGEMAP_SCAN that
    /// write-protects every page the VMM maps (`vmm_standin::TrackingSetup`).
    pub tracking_setup_ms: f64,
    /// The source VMM stand-in's page tables (`VmPTE`, KiB) right before
    /// that hand-off (memory written, registered for write-protection)…
    pub source_vmm_pte_kib_before_tracking: u64,
    /// …and right after it, before its vCPUs run: the difference is what
    /// starting the tracking added to the VMM.
    pub source_vmm_pte_kib_after_tracking: u64,
    /// From the target VM's hand-off to pre-copy convergence.
    pub precopy_seconds: f64,
    /// The Switchover call, as the orchestrator saw it.
    pub switchover_rpc_ms: f64,
    /// From the source's pause to the target agent's "complete".
    pub postcopy_seconds: f64,
    pub verify_seconds: f64,
    pub total_seconds: f64,

    /// The chaos events fired (the demo's `--chaos`), in order.
    #[serde(default)]
    pub chaos: Vec<ChaosRecord>,
    /// The target agent's connections to the source after its first.
    #[serde(default)]
    pub source_reconnects: u64,
    /// New source-agent incarnations the target agent followed.
    #[serde(default)]
    pub source_restarts: u64,
    /// Replies the target agent's fence refused (another memory, or read
    /// while the source VM ran).
    #[serde(default)]
    pub source_replies_refused: u64,
    /// The target agent's descriptors, threads and private memory before the
    /// first chaos event, and at the end of the migration (the same agent
    /// process only: absent if a chaos event replaced it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_agent_resources: Option<[crate::resources::ProcessResources; 2]>,
    /// Each agent's resources at the end of the migration, by side
    /// ("source", "target"), for the agents still running then.
    #[serde(default)]
    pub agent_resources: BTreeMap<String, crate::resources::ProcessResources>,
    /// Hand-offs of guest memory to agents, by side ("source", "target"): 1
    /// each unless an agent died and the VMM handed its memory to a new one.
    #[serde(default)]
    pub handoffs: BTreeMap<String, u64>,

    /// Where the agents served Prometheus metrics (`http://ADDR/metrics`)
    /// while the migration ran (with two hosts: inside each agent's
    /// namespace).
    #[serde(default)]
    pub source_metrics_addr: String,
    #[serde(default)]
    pub target_metrics_addr: String,
    /// The two hosts, when the migration had them (`--two-hosts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkReport>,
    /// How the agents and the demo spoke gRPC: "mutual TLS", or
    /// "plaintext" (`--plaintext`).
    #[serde(default)]
    pub transport: String,
}

/// What `pageserver-migrate --report-json` writes: the migration's
/// [`Report`] (the fields only a demo knows, its guest's accesses and the
/// byte-for-byte verification, stay zero), and where the VM is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateReport {
    #[serde(flatten)]
    pub migration: Report,
    /// From the target's `migrate-incoming` to the target agent's post-copy
    /// complete, s.
    pub migration_seconds: f64,
    /// The target QEMU's run state at the end (`running`; `paused` for a
    /// QEMU started with `-S`); empty if the migration failed before.
    pub target_run_state: String,
    /// The step that failed, if one did (`failure` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Where the VM is: after a failure, the state it was left in.
    pub vm_state: String,
}

/// The two hosts of a `--two-hosts` migration: their namespaces, their
/// addresses on the link, and the link's queueing (as `tc` showed it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkReport {
    pub source_namespace: String,
    pub target_namespace: String,
    pub source_addr: String,
    pub target_addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_rate_gbit: Option<f64>,
    pub source_qdisc: String,
    pub target_qdisc: String,
}

/// What one chaos event (the demo's `--chaos KIND@PHASE`) did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChaosRecord {
    /// The event as given (`kill-source-agent@postcopy`).
    pub event: String,
    /// Seconds since the migration started.
    pub fired_at_s: f64,
    /// The target agent's phase when it fired.
    pub target_phase: String,
    /// What was done and what recovered from it.
    pub outcome: String,
    /// For an outage of the link (`link-down`): whether a status poll
    /// during the outage saw the target agent report its source down
    /// (`source_up` false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_down_seen: Option<bool>,
}

impl Report {
    /// Copies the target agent's counters into the report.
    pub fn apply_status(&mut self, status: &MigrationStatus) {
        self.page_size = status.page_size;
        self.total_pages = status.total_pages;
        self.precopy_rounds = u64::from(status.precopy_rounds);
        self.pages_sent_precopy = status.pages_sent_precopy;
        self.precopy_bytes = status.pages_sent_precopy * status.page_size;
        self.dirty_pages_per_round = status.dirty_pages_per_round.clone();
        self.precopy_round_seconds = status.precopy_round_seconds.clone();
        self.bulk_install_seconds = status.bulk_install_seconds;
        self.background_pull_seconds = status.background_pull_seconds;
        self.final_bitmap_seconds = status.final_bitmap_seconds;
        self.stale_pages_at_switchover = status.stale_pages_at_switchover;
        self.faults_total = status.faults_total;
        self.faults_fresh = status.faults_fresh;
        self.faults_fetched = status.faults_fetched;
        self.faults_missing = status.faults_missing;
        self.faults_missing_fetched = status.faults_missing_fetched;
        self.faults_unknown = status.faults_unknown;
        self.pages_marked_stale = status.pages_marked_stale;
        self.final_bitmap_applied = status.final_bitmap_applied;
        self.pages_fetched_on_demand = status.pages_fetched_on_demand;
        self.pages_fetched_background = status.pages_fetched_background;
        self.pages_fetched_unknown = status.pages_fetched_unknown;
        self.pages_installed_bulk = status.pages_installed_bulk;
        self.bytes_received = status.bytes_received;
        self.pull_order = status.pull_order.clone();
        self.hot_pages_hinted = status.hot_pages_hinted;
        self.hot_pages_pulled_first = status.hot_pages_pulled_first;
        self.source_reconnects = status.source_reconnects;
        self.source_restarts = status.source_restarts;
        self.source_replies_refused = status.source_replies_refused;
        self.phase = status.phase().label().to_owned();
        let named = |counts: &[(&str, u64)]| counts.iter().map(|&(name, n)| (name.to_owned(), n)).collect();
        self.pages_by_state = named(&status.pages_by_state.unwrap_or_default().by_state());
        self.faults_blocked = named(&status.faults_blocked.unwrap_or_default().by_reason());
        self.fault_latency_us =
            FAULT_KINDS.iter().map(|kind| (kind.to_string(), LatencyPercentiles::default())).collect();
        for (kind, summary) in &status.fault_latency {
            self.fault_latency_us.insert(
                kind.clone(),
                LatencyPercentiles { p50: summary.p50_us, p99: summary.p99_us, max: summary.max_us },
            );
        }
        self.fault_wait_ms_total = status.fault_latency.values().map(|summary| summary.sum_us).sum::<f64>() / 1e3;
    }

    /// Every page was compared and none differed.
    pub fn verification_passed(&self) -> bool {
        self.mismatched_pages == 0 && self.total_pages > 0 && self.verified_pages == self.total_pages
    }

    /// Faults the target agent will never resolve, whatever the reason.
    pub fn faults_blocked_total(&self) -> u64 {
        self.faults_blocked.values().sum()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest:      {:.0} MiB, {} pages of {} bytes{}, {} vCPUs, seed {}",
            mib(self.guest_bytes),
            self.total_pages,
            self.page_size,
            if self.hugetlb { " (hugetlbfs)" } else { "" },
            self.vcpus,
            self.seed
        )?;
        if self.written_bytes < self.guest_bytes {
            writeln!(f, "sparse:     {:.0} MiB written", mib(self.written_bytes))?;
        }
        writeln!(
            f,
            "tracking:   started in {:.1} ms; the source VMM's page tables {} -> {} KiB",
            self.tracking_setup_ms, self.source_vmm_pte_kib_before_tracking, self.source_vmm_pte_kib_after_tracking
        )?;
        writeln!(
            f,
            "pre-copy:   {} rounds in {:.2} s, {} pages sent ({:.1} MiB), dirty pages per round {:?}",
            self.precopy_rounds,
            self.precopy_seconds,
            self.pages_sent_precopy,
            mib(self.precopy_bytes),
            self.dirty_pages_per_round
        )?;
        writeln!(
            f,
            "switchover: {} stale pages ({} of them still unfetched when the final bitmap came), \
             Switchover RPC {:.2} ms, downtime {:.3} ms",
            self.stale_pages_at_switchover, self.pages_marked_stale, self.switchover_rpc_ms, self.downtime_ms
        )?;
        writeln!(
            f,
            "post-copy:  {:.2} s; faults {} (fresh {}, fetched {}, missing {} of which {} fetched; {} on unknown \
             pages); pages fetched on demand {}, in the background {}, of unknown state {}; installed in bulk {}; \
             {:.1} MiB received",
            self.postcopy_seconds,
            self.faults_total,
            self.faults_fresh,
            self.faults_fetched,
            self.faults_missing,
            self.faults_missing_fetched,
            self.faults_unknown,
            self.pages_fetched_on_demand,
            self.pages_fetched_background,
            self.pages_fetched_unknown,
            self.pages_installed_bulk,
            mib(self.bytes_received)
        )?;
        for (kind, l) in &self.fault_latency_us {
            writeln!(f, "  fault latency {kind:>8}: p50 {:8.1} µs  p99 {:8.1} µs  max {:8.1} µs", l.p50, l.p99, l.max)?;
        }
        writeln!(
            f,
            "guest:      {} accesses, {} pages written, {} pages touched",
            self.guest_accesses, self.guest_pages_written, self.guest_pages_touched
        )?;
        writeln!(f, "transport:  {}", self.transport)?;
        if let Some(net) = &self.network {
            writeln!(
                f,
                "network:    two hosts, source {} ({}) and target {} ({}) over a veth link{}",
                net.source_namespace,
                net.source_addr,
                net.target_namespace,
                net.target_addr,
                net.link_rate_gbit.map(|rate| format!(" of {rate} Gbit/s each way")).unwrap_or_default()
            )?;
        }
        for record in &self.chaos {
            writeln!(
                f,
                "chaos:      {} at {:.2} s ({}): {}",
                record.event, record.fired_at_s, record.target_phase, record.outcome
            )?;
        }
        if !self.chaos.is_empty() || self.source_reconnects > 0 {
            writeln!(
                f,
                "source:     {} reconnects, {} agent restarts followed, {} replies refused; hand-offs {:?}",
                self.source_reconnects, self.source_restarts, self.source_replies_refused, self.handoffs
            )?;
        }
        if let Some([before, after]) = &self.target_agent_resources {
            writeln!(
                f,
                "target agent: fds {} -> {}, threads {} -> {}, private memory {} -> {} KiB (first chaos event -> end)",
                before.fds, after.fds, before.threads, after.threads, before.rss_anon_kib, after.rss_anon_kib
            )?;
        }
        if let Some(failure) = &self.failure {
            writeln!(f, "FAILED:     {failure}")?;
            writeln!(
                f,
                "            target agent health {}; faults blocked for ever: {:?}",
                self.target_health, self.faults_blocked
            )?;
        }
        let scope = if self.failure.is_some() { "pages the frozen guest can see" } else { "pages" };
        writeln!(
            f,
            "verify:     {} of {} {scope} compared in {:.2} s, {} mismatched{}",
            self.verified_pages,
            self.total_pages,
            self.verify_seconds,
            self.mismatched_pages,
            if self.first_mismatches.is_empty() { String::new() } else { format!(" {:?}", self.first_mismatches) }
        )?;
        let verdict = match (&self.failure, self.mismatched_pages) {
            (None, _) if self.verification_passed() => "target memory equals source memory at pause",
            (Some(_), 0) => "MIGRATION FAILED; no page the guest can see is wrong",
            _ => "VERIFICATION FAILED",
        };
        write!(f, "total:      {:.2} s ({verdict})", self.total_seconds)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pageserver_proto::v1::LatencySummary;

    #[test]
    fn status_fills_counters_and_latency_keys() {
        let status = MigrationStatus {
            page_size: 4096,
            total_pages: 10,
            precopy_rounds: 2,
            dirty_pages_per_round: vec![10, 3],
            faults_fetched: 4,
            fault_latency: [(
                "fetched".to_owned(),
                LatencySummary { count: 4, p50_us: 50.0, p99_us: 90.0, max_us: 99.0, sum_us: 300.0 },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let mut report = Report::default();
        report.apply_status(&status);
        assert_eq!(report.precopy_rounds, 2);
        assert_eq!(report.fault_latency_us["fetched"], LatencyPercentiles { p50: 50.0, p99: 90.0, max: 99.0 });
        assert_eq!(report.fault_latency_us["fresh"], LatencyPercentiles::default());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["fault_latency_us"]["fetched"]["p99"], 90.0);
        assert_eq!(json["dirty_pages_per_round"], serde_json::json!([10, 3]));
        assert!(!report.verification_passed());
        report.verified_pages = 10;
        assert!(report.verification_passed());
        assert!(report.to_string().contains("10 of 10 pages"));
    }
}

/// Fault counters of the target agent at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAfterTouch {
    pub faults_total: u64,
    pub faults_fetched: u64,
    pub faults_unknown: u64,
    pub faults_missing_fetched: u64,
    pub pages_fetched_on_demand: u64,
    pub pages_fetched_unknown: u64,
}

impl From<&pageserver_proto::v1::MigrationStatus> for StatusAfterTouch {
    fn from(s: &pageserver_proto::v1::MigrationStatus) -> Self {
        Self {
            faults_total: s.faults_total,
            faults_fetched: s.faults_fetched,
            faults_unknown: s.faults_unknown,
            faults_missing_fetched: s.faults_missing_fetched,
            pages_fetched_on_demand: s.pages_fetched_on_demand,
            pages_fetched_unknown: s.pages_fetched_unknown,
        }
    }
}
