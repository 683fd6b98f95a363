//! What a QEMU migration measured: the agents' side (as for the stand-ins)
//! and the guest's own verdict.

use serde::{Deserialize, Serialize};

use super::guest::GuestVerdict;
use crate::report::Report;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QemuReport {
    #[serde(flatten)]
    pub migration: Report,
    pub guest: GuestVerdict,
    /// From the target's `migrate-incoming` (the agents' pre-copy starts) to
    /// the target agent's post-copy complete, s: what QEMU's own
    /// `total-time` measures of its migration.
    #[serde(default)]
    pub migration_seconds: f64,
}

impl std::fmt::Display for QemuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.migration;
        writeln!(f, "guest:      {} MiB, {} pages of {} bytes", m.guest_bytes >> 20, m.total_pages, m.page_size)?;
        writeln!(f, "pre-copy:   {} rounds, dirty pages per round {:?}", m.precopy_rounds, m.dirty_pages_per_round)?;
        writeln!(f, "downtime:   {:.1} ms (source paused → migration completed, target running)", m.downtime_ms)?;
        writeln!(
            f,
            "post-copy:  {} stale pages at switchover; faults {} (fresh {}, fetched {}, missing {}); fetched on demand {}, in the background {}; installed in bulk {}",
            m.stale_pages_at_switchover,
            m.faults_total,
            m.faults_fresh,
            m.faults_fetched,
            m.faults_missing,
            m.pages_fetched_on_demand,
            m.pages_fetched_background,
            m.pages_installed_bulk
        )?;
        for (kind, l) in &m.fault_latency_us {
            writeln!(f, "  fault latency {kind:>8}: p50 {:8.1} µs  p99 {:8.1} µs  max {:8.1} µs", l.p50, l.p99, l.max)?;
        }
        writeln!(
            f,
            "guest:      its own check: {} generations after switchover, {} bad words",
            self.guest.generations_after_switchover, self.guest.bad_words
        )?;
        for line in &self.guest.last_lines {
            writeln!(f, "  {line}")?;
        }
        write!(f, "total:      {:.2} s", m.total_seconds)
    }
}
