//! The bench's rows: what each key means, the report that holds the
//! figures of one run, its table and its JSON.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Which part of the bench measures a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Floor,
    Kernel,
    Migrations,
    /// The QEMU guest, by QEMU's own post-copy and through the agents.
    Qemu,
}

impl Section {
    /// The sections a run measures, in order.
    pub const MEASURED: [Section; 4] = [Section::Floor, Section::Kernel, Section::Migrations, Section::Qemu];

    /// Its name for `--only`.
    pub fn name(self) -> &'static str {
        match self {
            Section::Floor => "floor",
            Section::Kernel => "kernel",
            Section::Migrations => "migrations",
            Section::Qemu => "qemu",
        }
    }

    /// What it measures, for progress lines.
    pub fn title(self) -> &'static str {
        match self {
            Section::Floor => "the floor (two plain processes over TCP)",
            Section::Kernel => "the kernel (in-process fault handler, dirty scan, bitmap)",
            Section::Migrations => "whole migrations through the agents",
            Section::Qemu => "a QEMU guest, by QEMU's own post-copy and through the agents",
        }
    }
}

/// One row of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct RowSpec {
    pub key: &'static str,
    pub unit: &'static str,
    pub what: &'static str,
    pub section: Section,
}

const fn row(key: &'static str, unit: &'static str, section: Section, what: &'static str) -> RowSpec {
    RowSpec { key, unit, what, section }
}

use Section::{Floor, Kernel, Migrations, Qemu};

/// Every row, in the order of the table.
pub const ROWS: &[RowSpec] = &[
    row("floor_rtt_p50_us", "µs", Floor, "raw TCP 4 KiB request/response, two plain processes, p50"),
    row("floor_rtt_p99_us", "µs", Floor, "the same, p99"),
    row("floor_2m_us", "µs", Floor, "raw TCP request/response carrying 2 MiB, p50"),
    row("floor_bulk_gib_s", "GiB/s", Floor, "raw TCP bulk, two plain processes"),
    row("floor_precopy_gib_s", "GiB/s", Floor, "the same bulk received into a fresh memfd of the guest's size"),
    row(
        "baseline_fresh_fault_p50_us",
        "µs",
        Kernel,
        "minimal in-process handler: event read to UFFDIO_CONTINUE done, p50",
    ),
    row("dirty_scan_gib_s", "GiB/s", Kernel, "PAGEMAP_SCAN (write-protect matching) over guest memory, 1% written"),
    row(
        "bitmap_bytes_per_gib_scattered",
        "B/GiB",
        Kernel,
        "encoded bitmap, 1% dirty pages of a 4 GiB guest, scattered",
    ),
    row("bitmap_bytes_per_gib_clustered", "B/GiB", Kernel, "the same, in clusters of 64 pages"),
    row("fresh_fault_p50_us", "µs", Migrations, "target agent, page known fresh, event read to resolved, p50"),
    row("fresh_fault_p99_us", "µs", Migrations, "the same, p99"),
    row("stale_fault_p50_us", "µs", Migrations, "target agent, stale page fetched over gRPC, idle, p50"),
    row("stale_fault_p99_us", "µs", Migrations, "the same, p99"),
    row("stale_fault_loaded_p99_us", "µs", Migrations, "stale fault while the background pull runs flat out, p99"),
    row("stale_fault_one_thread_p50_us", "µs", Migrations, "stale fault, one guest thread and no busy vCPUs, p50"),
    row("stale_fault_one_thread_p99_us", "µs", Migrations, "the same, p99"),
    row("background_pull_loaded_gib_s", "GiB/s", Migrations, "the pull's rate meanwhile"),
    row("background_pull_gib_s", "GiB/s", Migrations, "the background pull alone"),
    row("precopy_gib_s", "GiB/s", Migrations, "pre-copy round 0 of a fully written 4 GiB guest"),
    row("bulk_install_gib_s", "GiB/s", Migrations, "bulk install of fresh pages"),
    row("resume_ms_1g", "ms", Migrations, "source paused → first guest access served, 4 vCPUs, 1 GiB"),
    row("resume_ms_4g", "ms", Migrations, "the same at 4 GiB"),
    row("resume_ms_16vcpu", "ms", Migrations, "the same with 16 vCPUs at 1 GiB"),
    row("stale_faults_per_s_1t", "1/s", Migrations, "stale faults served per second, 1 guest thread"),
    row("stale_faults_per_s_16t", "1/s", Migrations, "the same with 16 guest threads at once"),
    row("network_pages_per_stale_page", "", Migrations, "pages fetched after switchover per stale page"),
    row("pages_fetched", "pages", Migrations, "pages fetched after switchover, one dirtying workload"),
    row(
        "baseline_missing_mode_pages_fetched",
        "pages",
        Migrations,
        "the same workload, MISSING-mode baseline: every page the guest touched",
    ),
    row("demand_fetches_nearest_first", "pages", Migrations, "hot/cold workload: demand fetches, pull nearest first"),
    row("demand_fetches_hot_first", "pages", Migrations, "the same, pull hottest first"),
    row("source_rss_mib_per_gib", "MiB/GiB", Migrations, "source agent private memory (RssAnon + page tables) per GiB"),
    row("target_rss_mib_per_gib", "MiB/GiB", Migrations, "target agent private memory per GiB"),
    row("stale_fault_2m_p50_us", "µs", Migrations, "hugetlbfs: stale 2 MiB page fault, p50"),
    row("sparse_1t_precopy_gib", "GiB", Migrations, "1 TiB guest, 4 GiB written: bytes pre-copy moved"),
    row("sparse_1t_resume_ms", "ms", Migrations, "its resume time"),
    row("sparse_1t_agent_private_mib", "MiB", Migrations, "the larger agent's private memory"),
    row("sparse_1t_vmm_page_tables_mib", "MiB", Migrations, "page tables dirty tracking adds to the VMM"),
    row("sparse_1t_tracking_setup_ms", "ms", Migrations, "time to start dirty tracking"),
    row("max_converging_dirty_pages_s", "pages/s", Migrations, "highest dirty rate at which pre-copy converges"),
    row("qemu_native_downtime_ms", "ms", Qemu, "QEMU's own post-copy, memcheck guest: downtime"),
    row("qemu_native_blocktime_ms", "ms", Qemu, "its target blocktime"),
    row("qemu_native_total_s", "s", Qemu, "its total time"),
    row("qemu_agents_downtime_ms", "ms", Qemu, "the same guest through the agents: downtime"),
    row("qemu_agents_blocktime_ms", "ms", Qemu, "its blocktime"),
    row("qemu_agents_total_s", "s", Qemu, "its total time"),
];

/// The figures of one run, by key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// Whether this was a `--quick` run (smaller guests: not comparable).
    pub quick: bool,
    /// The figures (numbers only), by key of [`ROWS`].
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
    /// The sections this run measured.
    #[serde(skip)]
    pub sections: Vec<Section>,
    /// Latency distributions for the plot (`--plot`), not in the JSON.
    #[serde(skip)]
    pub distributions: Vec<crate::plot::Distribution>,
    /// What each section said about how it measured, for the reader.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl BenchReport {
    pub fn new(quick: bool) -> Self {
        Self { quick, ..Self::default() }
    }

    /// Records `value` for `key`, which must be a row of [`ROWS`].
    pub fn set(&mut self, key: &str, value: f64) {
        debug_assert!(ROWS.iter().any(|r| r.key == key), "{key} is not a row");
        if value.is_finite() {
            self.figures.insert(key.to_owned(), value);
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The rows of `section` this report has no figure for.
    pub fn missing(&self, section: Section) -> Vec<&'static str> {
        ROWS.iter().filter(|r| r.section == section && !self.figures.contains_key(r.key)).map(|r| r.key).collect()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = ROWS.iter().map(|r| r.key.len()).max().unwrap_or(0);
        for r in ROWS {
            let value = match self.figures.get(r.key) {
                Some(v) if v.abs() >= 100.0 => format!("{v:>12.0}"),
                Some(v) => format!("{v:>12.3}"),
                None if !self.sections.contains(&r.section) => format!("{:>12}", "not run"),
                None => format!("{:>12}", "failed"),
            };
            writeln!(f, "{:<width$}  {value} {:<8} {}", r.key, r.unit, r.what)?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}
