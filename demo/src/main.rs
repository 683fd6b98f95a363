//! `pageserver-demo`: runs a whole post-copy migration on this machine (both
//! agents and two VMM stand-ins as separate processes) and reports what it
//! measured.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use pageserver_demo::qemu::{QemuOptions, run_qemu_migration};
use pageserver_demo::size::parse_size;
use pageserver_demo::{MigrationOptions, run_migration};

#[derive(Debug, Parser)]
#[command(about = "Runs a post-copy live migration between two local VMM stand-ins and reports on it")]
struct Args {
    /// Which VMM runs the guest: the stand-in (a process that dirties memory
    /// like a guest), or an unmodified QEMU booting a guest that checks its
    /// own memory (needs qemu-system-x86 and guest/build.sh).
    #[arg(long, value_enum, default_value = "standin")]
    vmm: Vmm,
    /// Guest memory size: 1G, 256M, 64MiB or bytes [default: 1G; 256M with --vmm qemu].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Back guest memory with 2 MiB huge pages (reserved in
    /// /proc/sys/vm/nr_hugepages for the run when too few are free).
    #[arg(long)]
    hugetlb: bool,
    #[arg(long, default_value_t = 4)]
    vcpus: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Source page writes per second across all vCPUs [default: 20000, or
    /// 100 with --hugetlb, where one write dirties a whole 2 MiB page].
    #[arg(long)]
    dirty_rate: Option<u64>,
    /// How long the target guest runs after the switchover, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    run_ms: u64,
    #[arg(long, default_value_t = 8)]
    max_precopy_rounds: u32,
    /// Pages the source writes after pre-copy converged, just before the
    /// pause (e.g. holes from the source's "ready" event, to show MISSING
    /// faults that must fetch), comma-separated.
    #[arg(long, value_delimiter = ',')]
    write_before_pause: Vec<u64>,
    /// Pages every target vCPU reads at once right after the switchover,
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    touch_after_resume: Vec<u64>,
    /// The target agent asks for the final bitmap only after this many faults...
    #[arg(long, default_value_t = 0)]
    bitmap_after_faults: u64,
    /// ...or after this many milliseconds, whichever comes first.
    #[arg(long, default_value_t = 0)]
    bitmap_delay_ms: u64,
    /// FAULT INJECTION: the target agent installs this many stale pages as
    /// if fresh, to show that the verification catches them.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_injection_withhold_stale_pages: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// After the migration, save each agent's final Prometheus metrics to
    /// DIR/source.prom and DIR/target.prom (stand-in VMM only).
    #[arg(long, value_name = "DIR")]
    metrics_dump: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Vmm {
    Standin,
    Qemu,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.vmm == Vmm::Qemu {
        if args.metrics_dump.is_some() {
            bail!("--metrics-dump works with --vmm standin only");
        }
        return run_qemu(&args).await;
    }
    let options = MigrationOptions {
        memory_bytes: args.memory.unwrap_or(1 << 30),
        hugetlb: args.hugetlb,
        vcpus: args.vcpus,
        seed: args.seed,
        dirty_rate: args.dirty_rate.unwrap_or(if args.hugetlb { 100 } else { 20_000 }),
        run_ms: args.run_ms,
        max_precopy_rounds: args.max_precopy_rounds,
        write_before_pause: args.write_before_pause,
        touch_after_resume: args.touch_after_resume,
        bitmap_after_faults: args.bitmap_after_faults,
        bitmap_delay_ms: args.bitmap_delay_ms,
        withhold_stale_pages: args.fault_injection_withhold_stale_pages,
        metrics_dump: args.metrics_dump.clone(),
        ..MigrationOptions::default()
    };
    // On Ctrl-C the migration future is dropped: its children are killed and
    // its work directory removed.
    let report = tokio::select! {
        report = run_migration(&options) => report.context("migration failed")?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    println!("\n{report}");
    if let Some(path) = &args.report_json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if !report.verification_passed() {
        bail!(
            "verification failed: {} of {} pages compared, {} mismatched (first: {:?})",
            report.verified_pages,
            report.total_pages,
            report.mismatched_pages,
            report.first_mismatches
        );
    }
    Ok(())
}

async fn run_qemu(args: &Args) -> anyhow::Result<()> {
    let options = QemuOptions {
        memory_mib: args.memory.unwrap_or(256 << 20) >> 20,
        hugetlb: args.hugetlb,
        withhold_stale_pages: args.fault_injection_withhold_stale_pages,
        ..QemuOptions::default()
    };
    let report = tokio::select! {
        report = run_qemu_migration(&options) => report.context("QEMU migration failed")?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    println!("\n{report}");
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.guest.bad_words > 0 {
        bail!("the guest saw {} bad words after the migration", report.guest.bad_words);
    }
    Ok(())
}
