//! The sparse guest: a 1 TiB memfd of which 4 GiB were ever written (64
//! clusters of 64 MiB spread evenly, the vCPUs dirtying inside them), one
//! whole migration through the demo, once per bench (not repeated).
//! A quick run uses 64 GiB with 256 MiB written instead, and says so.
//!
//! | row | what it is |
//! |---|---|
//! | `sparse_1t_precopy_gib` | bytes the pre-copy rounds moved: every page they asked for at a full page (`Report::precopy_bytes`), to compare with the bytes written |
//! | `sparse_1t_resume_ms` | source paused → the target guest's first access served (`Report::downtime_ms`) |
//! | `sparse_1t_agent_private_mib` | the larger agent's RssAnon + page tables at the end |
//! | `sparse_1t_vmm_page_tables_mib` | the source VMM stand-in's VmPTE right after the hand-off minus right before it (before its vCPUs run): what starting the tracking added |
//! | `sparse_1t_tracking_setup_ms` | the source VMM stand-in's hand-off, from connecting to the agent's acceptance: the agent's watch of the file's data pages and its first scan that write-protects them |
//!
//! Every byte that exists in either memory is verified, as in every demo
//! run; pages that are holes on both sides count as verified zeros.
#![forbid(unsafe_code)]

use std::time::Instant;

use pageserver_demo::migration::MigrationOptions;

use crate::migrations::{GIB, migrate, shmem};
use crate::{BenchOptions, BenchReport};

/// The full run's guest, and what of it was written.
const MEMORY: u64 = 1 << 40;
const WRITTEN: u64 = 4 << 30;
/// The quick run's.
const QUICK_MEMORY: u64 = 64 << 30;
const QUICK_WRITTEN: u64 = 256 << 20;

/// Measures the sparse rows with one migration.
pub async fn measure(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    let (memory, written) = if opts.quick { (QUICK_MEMORY, QUICK_WRITTEN) } else { (MEMORY, WRITTEN) };
    eprintln!("pageserver-bench: a sparse guest, {} GiB with {} MiB written", memory >> 30, written >> 20);
    let started = Instant::now();
    let run = MigrationOptions { written_bytes: Some(written), ..shmem(memory, 4) };
    let sparse = migrate(opts, "sparse", run).await?;
    let seconds = started.elapsed().as_secs_f64();
    report.set("sparse_1t_precopy_gib", sparse.precopy_bytes as f64 / GIB);
    report.set("sparse_1t_resume_ms", sparse.downtime_ms);
    let private = sparse.agent_resources.values().map(|r| r.private_kib()).max().unwrap_or(0);
    report.set("sparse_1t_agent_private_mib", private as f64 / 1024.0);
    let added = sparse.source_vmm_pte_kib_after_tracking.saturating_sub(sparse.source_vmm_pte_kib_before_tracking);
    report.set("sparse_1t_vmm_page_tables_mib", added as f64 / 1024.0);
    report.set("sparse_1t_tracking_setup_ms", sparse.tracking_setup_ms);
    report.note(format!(
        "sparse: a {} GiB guest with {} MiB written{}, one run of {seconds:.0} s; pre-copy moved {:.2}x the \
         written bytes ({} rounds)",
        memory >> 30,
        written >> 20,
        if opts.quick { " (quick: not the 1 TiB guest of the row names)" } else { "" },
        sparse.precopy_bytes as f64 / written as f64,
        sparse.precopy_rounds
    ));
    Ok(())
}
