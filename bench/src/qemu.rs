//! The same QEMU guest (the memcheck guest, 256 MiB, TCG) migrated twice on
//! this machine in the same run: by QEMU's own post-copy (`postcopy-ram`,
//! its RAM anonymous memory moved over QEMU's migration stream), and through
//! the agents (`pageserver-demo --vmm qemu`). A run through the agents must
//! end with the guest's own checker reporting no bad word on the target;
//! what the checker said after QEMU's own post-copy is noted beside its
//! figures (with QEMU 7.2 under TCG it sometimes reports bad words: see
//! `pageserver_demo::qemu::native`).
//!
//! The definitions match: downtime is how long the guest was stopped
//! (QEMU's `downtime`; ours, the source's pause to the migration completed
//! with the target running); blocktime is the time faults waited after the
//! switchover, summed (QEMU's `postcopy-blocktime` on the target; ours, the
//! target agent's fault latencies summed, from the fault read to the page
//! resolved); total is the migration's own time (QEMU's `total-time`; ours,
//! from `migrate-incoming` to post-copy complete).
#![forbid(unsafe_code)]

use anyhow::{Context, ensure};
use pageserver_demo::qemu::native::run_native_postcopy;
use pageserver_demo::qemu::{QemuOptions, run_qemu_migration};

use crate::migrations::Samples;
use crate::{BenchOptions, BenchReport};

/// Measures the `qemu_*` rows.
pub async fn measure(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    let mut samples = Samples::default();
    let mut native_verdicts = Vec::new();
    let qemu = QemuOptions { quiet: true, ..QemuOptions::default() };
    if opts.link.is_some() {
        report.note("qemu: on loopback, not across the two hosts' link (the QEMU driver has no two-host mode)");
    }
    for repetition in 0..opts.migration_repetitions() {
        eprintln!("pageserver-bench: QEMU, repetition {} of {}", repetition + 1, opts.migration_repetitions());
        let native = run_native_postcopy(&qemu).await.context("QEMU's own post-copy")?;
        native_verdicts.push(format!(
            "{} generations, {} bad words",
            native.guest.generations_after_switchover, native.guest.bad_words
        ));
        samples.add("qemu_native_downtime_ms", native.downtime_ms);
        samples.add("qemu_native_blocktime_ms", native.blocktime_ms);
        samples.add("qemu_native_total_s", native.total_s);

        let ours = run_qemu_migration(&qemu).await.context("the QEMU migration through the agents")?;
        ensure!(ours.guest.bad_words == 0, "the guest saw {} bad words after our migration", ours.guest.bad_words);
        samples.add("qemu_agents_downtime_ms", ours.migration.downtime_ms);
        samples.add("qemu_agents_blocktime_ms", ours.migration.fault_wait_ms_total);
        samples.add("qemu_agents_total_s", ours.migration_seconds);
    }
    samples.into_report(report);
    report.note(format!(
        "qemu: {} repetition(s) of each, medians; QEMU's own post-copy starts after its first pass over the RAM; \
         the guest's checker after it: {}; through the agents: no bad word (checked)",
        opts.migration_repetitions(),
        native_verdicts.join("; ")
    ));
    Ok(())
}
