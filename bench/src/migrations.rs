//! Whole migrations through the demo (both agents and both VMM stand-ins as
//! separate processes, as in `pageserver-demo`), read from its report.
//!
//! | run | guest | what it gives |
//! |---|---|---|
//! | idle | 1 GiB shmem, 4 vCPUs dirtying 20 000 pages/s, the background pull held back (`--pull-delay`) while the guest runs | fresh and stale fault latencies with nothing else on the link, resume at 1 GiB, pages fetched per stale page, and the pages a MISSING-mode baseline would fetch for the same run (every page the guest touched) |
//! | pull | 1 GiB shmem, a quarter of it written just before the pause, the guest idle | the background pull's rate alone |
//! | loaded | the same, the 4 vCPUs reading those pages right after the switchover | the stale fault p99 while the pull runs, and the pull's rate meanwhile |
//! | stale faults | 1 GiB shmem, 4096 pages written before the pause, then read at once by 1 and by 16 guest threads (the pull held back) | stale faults served per second; with one thread, the stale fault latency with no vCPU spinning beside the agents |
//! | large | 4 GiB shmem, 4 vCPUs | pre-copy round 0's rate, resume at 4 GiB, the bulk install's rate, each agent's private memory per GiB |
//! | many vCPUs | 1 GiB shmem, 16 vCPUs | resume with 16 vCPUs |
//! | pull order | 1 GiB shmem, a hot set rewritten all through pre-copy and a cold half written once before the pause; the hot set read by 4 vCPUs once the final bitmap is in; `--pull-order nearest`, then `hot` ([`crate::pull_order`]) | demand fetches with each order |
//! | huge pages | 1 GiB hugetlbfs, 8 huge pages written just before the pause and read right after the switchover (the pull held back) | the stale 2 MiB fault |
//! | sparse ([`crate::sparse`]) | 1 TiB shmem, 4 GiB of it written, once | pre-copy bytes, resume, agent memory, VMM page tables and set-up time of dirty tracking |
//!
//! Every run verifies every byte of the target's memory against the
//! source's at pause, as the demo always does: a run that fails that is an
//! error here, not a figure. Each run is repeated ([`BenchOptions::repetitions`])
//! and the median of each figure is reported.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use pageserver_demo::migration::{MigrationOptions, run_migration};
use pageserver_demo::report::Report;

use crate::plot::{self, Distribution};
use crate::stats::median;
use crate::{BenchOptions, BenchReport};

/// How long the target guest runs after the switchover in the idle run;
/// the pull waits a little longer than that.
const GUEST_RUN: Duration = Duration::from_millis(1000);
const IDLE_PULL_DELAY: Duration = Duration::from_millis(1500);
/// Huge pages made stale on purpose in the huge-page run.
const HUGE_STALE_PAGES: u64 = 8;
/// The dirty rates (pages/s) the convergence search starts and stops at.
const FIRST_DIRTY_RATE: u64 = 10_000;
const LAST_DIRTY_RATE: u64 = 2_560_000;
/// The page size of a shmem guest.
const PAGE: u64 = 4096;
/// The target agent's fault-latency histogram (`target-agent/src/metrics.rs`).
const FAULT_LATENCY: &str = "pageserver_target_fault_latency_seconds";
const MIB: f64 = (1u64 << 20) as f64;
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// Figures gathered across repetitions, by key.
#[derive(Default)]
pub(crate) struct Samples(BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    pub(crate) fn add(&mut self, key: &'static str, value: f64) {
        self.0.entry(key).or_default().push(value);
    }

    /// The median of each key's figures, into `report`.
    pub(crate) fn into_report(self, report: &mut BenchReport) {
        for (key, values) in self.0 {
            if let Some(value) = median(&values) {
                report.set(key, value);
            }
        }
    }
}

/// Measures the migration rows.
pub async fn measure(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    if let Some(link) = opts.link {
        report.note(format!("migrations: {}", link.describe()));
    }
    let mut samples = Samples::default();
    let guest = opts.guest_bytes();
    let large = opts.large_guest_bytes();
    let repetitions = opts.migration_repetitions();
    let metrics = tempfile::tempdir().context("a directory for the agents' metrics")?;
    for repetition in 0..repetitions {
        eprintln!("pageserver-bench: migrations, repetition {} of {repetitions}", repetition + 1);
        // The first repetition's metrics give the plot its distributions.
        let dump = (repetition == 0).then(|| metrics.path().join("idle"));
        let idle =
            MigrationOptions { pull_delay: Some(IDLE_PULL_DELAY), metrics_dump: dump.clone(), ..shmem(guest, 4) };
        let idle = migrate(opts, "idle", idle).await?;
        if let Some(dir) = &dump {
            let text = std::fs::read_to_string(dir.join("target.prom")).context("the idle run's target metrics")?;
            for (resolution, label) in
                [("fresh", "target agent: fresh fault"), ("fetched", "target agent: stale fault")]
            {
                let buckets = plot::buckets(&text, FAULT_LATENCY, &[&format!("resolution=\"{resolution}\"")]);
                report.distributions.push(Distribution::of_buckets(label, &buckets));
            }
        }
        sample_faults(&mut samples, &idle, "fresh", "fresh_fault_p50_us", "fresh_fault_p99_us");
        sample_faults(&mut samples, &idle, "fetched", "stale_fault_p50_us", "stale_fault_p99_us");
        samples.add("resume_ms_1g", idle.downtime_ms);
        let fetched = idle.pages_fetched_on_demand + idle.pages_fetched_background;
        samples.add("pages_fetched", fetched as f64);
        // A MISSING-mode target holding none of the guest's memory fetches
        // every page the guest touches, in the same run: the pages its
        // vCPUs accessed at least once (counted by the target stand-in).
        samples.add("baseline_missing_mode_pages_fetched", idle.guest_pages_touched as f64);
        if idle.stale_pages_at_switchover > 0 {
            samples.add("network_pages_per_stale_page", fetched as f64 / idle.stale_pages_at_switchover as f64);
        }

        // A stale set of a quarter of the guest: the pull alone, then the
        // same with the vCPUs faulting on those pages meanwhile.
        let stale = (guest / PAGE / 4, guest / PAGE / 4);
        let pull = MigrationOptions { dirty_rate: 0, write_range_before_pause: Some(stale), ..shmem(guest, 4) };
        let pull = migrate(opts, "pull", MigrationOptions { run_ms: 1, ..pull }).await?;
        if let Some(rate) = pull_rate(&pull) {
            samples.add("background_pull_gib_s", rate);
        }
        let loaded = MigrationOptions {
            dirty_rate: 0,
            write_range_before_pause: Some(stale),
            touch_spread_after_resume: Some(stale),
            ..shmem(guest, 4)
        };
        let loaded = migrate(opts, "loaded", MigrationOptions { run_ms: 1, ..loaded }).await?;
        if let Some(l) = loaded.fault_latency_us.get("fetched").filter(|l| l.max > 0.0) {
            samples.add("stale_fault_loaded_p99_us", l.p99);
        }
        if let Some(rate) = pull_rate(&loaded) {
            samples.add("background_pull_loaded_gib_s", rate);
        }

        // Stale faults served per second, by 1 and by 16 guest threads at
        // once, the pull held back.
        let faulted = (guest / PAGE / 2, if opts.quick { 1024 } else { 4096 });
        for (vcpus, key) in [(1, "stale_faults_per_s_1t"), (16, "stale_faults_per_s_16t")] {
            let run = MigrationOptions {
                dirty_rate: 0,
                write_range_before_pause: Some(faulted),
                touch_spread_after_resume: Some(faulted),
                pull_delay: Some(IDLE_PULL_DELAY),
                ..shmem(guest, vcpus)
            };
            let run = migrate(opts, "stale faults", MigrationOptions { run_ms: 1, ..run }).await?;
            if vcpus == 1 {
                // The same faults with no vCPU spinning beside the agents
                // (the idle run has four on two cores): what the scheduler
                // adds to the idle run's latencies.
                sample_faults(
                    &mut samples,
                    &run,
                    "fetched",
                    "stale_fault_one_thread_p50_us",
                    "stale_fault_one_thread_p99_us",
                );
            }
            if let Some(touched) = run.touch_spread.filter(|t| t.seconds > 0.0) {
                samples.add(key, touched.pages as f64 / touched.seconds);
            }
        }

        crate::pull_order::measure(opts, &mut samples, guest, 1 + repetition as u64).await?;

        let many = migrate(opts, "many vCPUs", shmem(guest, 16)).await?;
        samples.add("resume_ms_16vcpu", many.downtime_ms);

        // The source writes these huge pages just before the pause, and the
        // target guest reads them right after the switchover, the pull held
        // back: each read is a stale 2 MiB fault, fetched on demand.
        let huge_pages = guest / (2 << 20);
        let stale: Vec<u64> = (1..=HUGE_STALE_PAGES).map(|i| i * huge_pages / (HUGE_STALE_PAGES + 1)).collect();
        let huge = MigrationOptions {
            hugetlb: true,
            dirty_rate: 100,
            write_before_pause: stale.clone(),
            touch_after_resume: stale,
            pull_delay: Some(IDLE_PULL_DELAY),
            ..shmem(guest, 1)
        };
        let dump = (repetition == 0).then(|| metrics.path().join("huge"));
        let huge = migrate(opts, "huge pages", MigrationOptions { metrics_dump: dump.clone(), ..huge }).await?;
        if let Some(dir) = &dump {
            let text =
                std::fs::read_to_string(dir.join("target.prom")).context("the huge-page run's target metrics")?;
            let buckets = plot::buckets(&text, FAULT_LATENCY, &["resolution=\"fetched\""]);
            report.distributions.push(Distribution::of_buckets("target agent: stale 2 MiB fault", &buckets));
        }
        if let Some(l) = huge.fault_latency_us.get("fetched").filter(|l| l.max > 0.0) {
            samples.add("stale_fault_2m_p50_us", l.p50);
        }
    }
    // The 4 GiB guest once: it takes as long as the rest of a repetition.
    let big = migrate(opts, "large", shmem(large, 4)).await?;
    samples.add("resume_ms_4g", big.downtime_ms);
    if big.bulk_install_seconds > 0.0 {
        let bytes = (big.pages_installed_bulk * big.page_size) as f64;
        samples.add("bulk_install_gib_s", bytes / GIB / big.bulk_install_seconds);
    }
    if let (Some(&pages), Some(&seconds)) = (big.dirty_pages_per_round.first(), big.precopy_round_seconds.first())
        && seconds > 0.0
    {
        samples.add("precopy_gib_s", (pages * big.page_size) as f64 / GIB / seconds);
    }
    for (side, key) in [("source", "source_rss_mib_per_gib"), ("target", "target_rss_mib_per_gib")] {
        if let Some(resources) = big.agent_resources.get(side) {
            samples.add(key, resources.private_kib() as f64 * 1024.0 / MIB / (large as f64 / GIB));
        }
    }

    samples.into_report(report);
    max_converging_dirty_rate(opts, report).await?;
    crate::sparse::measure(opts, report).await?;
    report.note(format!(
        "migrations: {} repetition(s), medians (the 4 GiB run once); guests of {} MiB ({} MiB for the 4 GiB rows); \
         fault latencies are the target agent's own histogram (event read to resolved)",
        repetitions,
        guest >> 20,
        large >> 20
    ));
    Ok(())
}

/// The highest guest dirty rate (pages/s) at which pre-copy still
/// converges: its last round leaves under 1% of the guest's pages dirty.
/// Rates double from [`FIRST_DIRTY_RATE`] until one does not converge (or
/// [`LAST_DIRTY_RATE`]; a quick run tries three), then one bisection step
/// between the last two; one run each, not repeated.
async fn max_converging_dirty_rate(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    // 1 GiB even in a quick run: in a small guest, the pages one round
    // dirties are a large share of it at any rate worth knowing.
    let guest = 1 << 30;
    let last_rate = if opts.quick { 4 * FIRST_DIRTY_RATE } else { LAST_DIRTY_RATE };
    let converges = |rate: u64| async move {
        let run = migrate(opts, "dirty rate", MigrationOptions { dirty_rate: rate, ..shmem(guest, 4) }).await?;
        let last = run.dirty_pages_per_round.last().copied().unwrap_or(u64::MAX);
        anyhow::Ok(last.saturating_mul(100) < run.total_pages)
    };
    let (mut converged, mut failed) = (None, None);
    let mut rate = FIRST_DIRTY_RATE;
    while rate <= last_rate {
        eprintln!("pageserver-bench: does pre-copy converge at {rate} dirty pages/s?");
        if converges(rate).await? {
            converged = Some(rate);
            rate *= 2;
        } else {
            failed = Some(rate);
            break;
        }
    }
    if let (Some(low), Some(high)) = (converged, failed) {
        let middle = (low + high) / 2;
        if converges(middle).await? {
            converged = Some(middle);
        }
    }
    match converged {
        Some(rate) => report.set("max_converging_dirty_pages_s", rate as f64),
        None => report.note(format!("pre-copy did not converge even at {FIRST_DIRTY_RATE} dirty pages/s")),
    }
    if failed.is_none() {
        report.note(format!("pre-copy still converged at {last_rate} dirty pages/s, the most tried"));
    }
    Ok(())
}

/// The background pull's rate in `report`'s migration, GiB/s.
fn pull_rate(report: &Report) -> Option<f64> {
    let bytes = (report.pages_fetched_background * report.page_size) as f64;
    (report.background_pull_seconds > 0.0 && bytes > 0.0).then(|| bytes / GIB / report.background_pull_seconds)
}

/// A shmem guest of `bytes` with `vcpus` dirtying vCPUs, as the demo runs it.
pub(crate) fn shmem(bytes: u64, vcpus: u32) -> MigrationOptions {
    MigrationOptions {
        memory_bytes: bytes,
        vcpus,
        run_ms: GUEST_RUN.as_millis() as u64,
        quiet: true,
        vm_name: "bench-vm".to_owned(),
        ..MigrationOptions::default()
    }
}

/// Runs one migration, across the two hosts' link if `bench` asks for one;
/// a failed one, or one whose verification found a wrong page, is an error.
pub(crate) async fn migrate(bench: &BenchOptions, name: &str, opts: MigrationOptions) -> anyhow::Result<Report> {
    let opts = MigrationOptions {
        two_hosts: bench.link.is_some(),
        link_rate_gbit: bench.link.and_then(|link| link.rate_gbit),
        ..opts
    };
    let report = run_migration(&opts).await.with_context(|| format!("the {name} migration"))?;
    if let Some(failure) = &report.failure {
        anyhow::bail!("the {name} migration failed: {failure}");
    }
    if !report.verification_passed() {
        anyhow::bail!(
            "the {name} migration's verification failed: {} of {} pages compared, {} mismatched",
            report.verified_pages,
            report.total_pages,
            report.mismatched_pages
        );
    }
    Ok(report)
}

/// The `kind` fault latencies of `report`, if it had such faults.
fn sample_faults(samples: &mut Samples, report: &Report, kind: &str, p50: &'static str, p99: &'static str) {
    if let Some(l) = report.fault_latency_us.get(kind).filter(|l| l.max > 0.0) {
        samples.add(p50, l.p50);
        samples.add(p99, l.p99);
    }
}
