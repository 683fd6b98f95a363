//! What the target agent counts. Recording is lock- and allocation-free (a
//! few relaxed atomics), so the fault path can afford it; the gRPC status
//! ([`crate::service`]) and `/metrics` ([`crate::metrics`]) read the same
//! values.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use guest_memory::memfile::monotonic_ns;

use pageserver_metrics::{LatencyHistogram, LatencySnapshot};

use crate::source::SourceError;

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

/// Why a fault the agent read will never be resolved (its vCPU waits for
/// ever: never a wrong page). Each of these fails the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// The fault address is outside every region of the hand-off.
    OutsideRegions,
    /// Writing or mapping the page failed.
    InstallFailed,
    /// The source refused the page's request more often than we retry.
    SourceRefused,
    /// The fault loop stopped with the fault unresolved.
    FaultLoopStopped,
    /// The migration had already failed: nothing is installed any more.
    MigrationFailed,
    /// The source stayed unreachable past the deadline.
    SourceUnreachable,
}

impl BlockReason {
    pub const ALL: [BlockReason; 6] = [
        BlockReason::OutsideRegions,
        BlockReason::InstallFailed,
        BlockReason::SourceRefused,
        BlockReason::FaultLoopStopped,
        BlockReason::MigrationFailed,
        BlockReason::SourceUnreachable,
    ];

    /// The `reason` label of `pageserver_target_faults_blocked`.
    pub fn name(self) -> &'static str {
        match self {
            BlockReason::OutsideRegions => "outside_regions",
            BlockReason::InstallFailed => "install_failed",
            BlockReason::SourceRefused => "source_refused",
            BlockReason::FaultLoopStopped => "fault_loop_stopped",
            BlockReason::MigrationFailed => "migration_failed",
            BlockReason::SourceUnreachable => "source_unreachable",
        }
    }
}

/// Everything the target agent counts.
#[derive(Debug, Default)]
pub struct TargetStats {
    pub precopy_rounds: AtomicU64,
    pub pages_sent_precopy: AtomicU64,
    pub dirty_pages_per_round: Mutex<Vec<u64>>,
    /// Seconds each pre-copy round took, in the same order.
    pub precopy_round_seconds: Mutex<Vec<f64>>,
    /// Seconds the bulk install and the background pull took (0 until done).
    pub bulk_install_seconds: Mutex<f64>,
    pub background_pull_seconds: Mutex<f64>,
    /// Seconds from the switchover to the final bitmap applied (0 until then).
    pub final_bitmap_seconds: Mutex<f64>,
    pub stale_pages_at_switchover: AtomicU64,
    pub pages_marked_stale: AtomicU64,
    pub final_bitmap_applied: AtomicBool,
    pub faults_missing_fetched: AtomicU64,
    pub faults_unknown: AtomicU64,
    pub pages_fetched_on_demand: AtomicU64,
    pub pages_fetched_background: AtomicU64,
    pub pages_fetched_unknown: AtomicU64,
    pub pages_installed_bulk: AtomicU64,
    /// Stale pages the source's heat hint named ([`crate::pull_order`]).
    pub hot_pages_hinted: AtomicU64,
    /// Pages the background pull asked for, from its start, before its
    /// first page the hint did not name.
    pub hot_pages_pulled_first: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Faults by kind and by whether the page's state was known (index:
    /// `[kind][known as usize]`).
    faults: [[AtomicU64; 2]; 3],
    /// Fault latency by kind and known (as above).
    fault_latency: [[LatencyHistogram; 2]; 3],
    /// Demand GetPages round trips.
    pub fetch_latency: LatencyHistogram,
    /// Faults that will never be resolved, by [`BlockReason`].
    faults_blocked: [AtomicU64; 6],
    /// Whether the last call to the source reached it ([`TargetStats::note_source_call`]).
    source_up: AtomicBool,
    /// When the source was last found down after being up (monotonic ns;
    /// 0 while it is up).
    source_down_since_ns: AtomicU64,
    /// Connections to the source opened after the first.
    pub source_reconnects: AtomicU64,
    /// New source incarnations seen after the first.
    pub source_restarts: AtomicU64,
    /// Replies refused by the fence (wrong memory, not paused).
    pub source_replies_refused: AtomicU64,
    /// When the migration last moved forward (monotonic ns).
    last_progress_ns: AtomicU64,
}

impl TargetStats {
    /// Counts one fault of `kind` on a page whose state was `known` (not
    /// `unknown`, waiting for the final bitmap).
    pub fn record_fault(&self, kind: FaultKind, known: bool) {
        self.faults[kind as usize][usize::from(known)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a fault took to resolve.
    pub fn record_fault_latency(&self, kind: FaultKind, known: bool, ns: u64) {
        self.fault_latency[kind as usize][usize::from(known)].record(ns);
    }

    /// Faults of `kind` on pages whose state was `known`.
    pub fn faults(&self, kind: FaultKind, known: bool) -> u64 {
        self.faults[kind as usize][usize::from(known)].load(Ordering::Relaxed)
    }

    /// Every fault resolved or waiting for a fetch (not the blocked ones).
    pub fn faults_total(&self) -> u64 {
        FaultKind::ALL.iter().map(|&kind| self.faults_of(kind)).sum()
    }

    /// Faults of `kind`, known or not.
    pub fn faults_of(&self, kind: FaultKind) -> u64 {
        self.faults(kind, false) + self.faults(kind, true)
    }

    /// The latency histogram of faults of `kind` on `known` pages.
    pub fn fault_latency(&self, kind: FaultKind, known: bool) -> &LatencyHistogram {
        &self.fault_latency[kind as usize][usize::from(known)]
    }

    /// The latency of every fault of `kind`, known or not.
    pub fn fault_latency_of(&self, kind: FaultKind) -> LatencySnapshot {
        let mut all = self.fault_latency(kind, false).snapshot();
        all.merge(&self.fault_latency(kind, true).snapshot());
        all
    }

    /// Counts `faults` that will never be resolved.
    pub fn block_faults(&self, reason: BlockReason, faults: u64) {
        self.faults_blocked[reason as usize].fetch_add(faults, Ordering::Relaxed);
    }

    /// Faults blocked for `reason`.
    pub fn faults_blocked(&self, reason: BlockReason) -> u64 {
        self.faults_blocked[reason as usize].load(Ordering::Relaxed)
    }

    /// Notes how a call to the source went: it is up after a success, or
    /// after an error the source itself sent (a refusal is an answer); down
    /// after a connection or transport failure.
    pub fn note_source_call<T>(&self, result: &Result<T, SourceError>) {
        let up = match result {
            Ok(_) => true,
            Err(e) => e.source_answered(),
        };
        self.set_source_up(up);
    }

    /// Records whether the source is reachable now.
    pub fn set_source_up(&self, up: bool) {
        self.source_up.store(up, Ordering::Relaxed);
        if up {
            self.source_down_since_ns.store(0, Ordering::Relaxed);
        } else {
            let _ = self.source_down_since_ns.compare_exchange(0, monotonic_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    pub fn source_up(&self) -> bool {
        self.source_up.load(Ordering::Relaxed)
    }

    /// How long the source has been unreachable (`None` while it is up).
    pub fn source_outage(&self) -> Option<Duration> {
        match self.source_down_since_ns.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_nanos(monotonic_ns().saturating_sub(since))),
        }
    }

    /// Notes that the migration moved forward (a page, a bitmap, a phase).
    pub fn note_progress(&self) {
        self.last_progress_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Time since the migration last moved forward.
    pub fn since_progress(&self) -> Duration {
        match self.last_progress_ns.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_nanos(monotonic_ns().saturating_sub(at)),
        }
    }
}
