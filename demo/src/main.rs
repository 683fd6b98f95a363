//! `pageserver-demo`: runs a whole post-copy migration on this machine (both
//! agents and two VMM stand-ins as separate processes) and reports what it
//! measured.
//!
//! SIGINT or SIGTERM end the run cleanly (children stopped, work directory
//! removed, huge pages given back; exit 1, "interrupted by SIGTERM"). Its
//! children die with it even when it is killed with SIGKILL, and the next
//! run removes what such a run left behind (`pageserver_demo::leftovers`).
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use pageserver_agent_shell::parse_duration;
use pageserver_demo::chaos::ChaosEvent;
use pageserver_demo::qemu::{QemuOptions, chaos_supported, run_qemu_migration_until};
use pageserver_demo::stop_signal::stop_signal;
use pageserver_demo::test_hooks::{AgentTestHooks, FaultLoopBreak};
use pageserver_demo::{MigrationOptions, run_migration_until};
use vmm_standin::size::parse_size;

#[derive(Debug, Parser)]
#[command(about = "Runs a post-copy live migration between two local VMM stand-ins and reports on it")]
struct Args {
    /// Which VMM runs the guest: the stand-in (a process that dirties memory
    /// like a guest), or an unmodified QEMU booting a guest that checks its
    /// own memory (needs qemu-system-x86 and the guest image: `scripts/setup --qemu`).
    #[arg(long, value_enum, default_value = "standin")]
    vmm: Vmm,
    /// Guest memory size: 1G, 256M, 64MiB or bytes [default: 1G; 256M with --vmm qemu].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// A sparse guest: only this much of its memory is ever written (64
    /// clusters spread evenly; e.g. --memory 1T --written 4G). Stand-in only.
    #[arg(long, value_parser = parse_size)]
    written: Option<u64>,
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
    /// Faults to inject, KIND@PHASE, comma-separated: kill-source-agent,
    /// stop-source-agent:MS, impostor-source-agent, switchover-before-pause,
    /// rotate-certificates (not with --plaintext), and with --two-hosts link-down:MS, link-loss:PCT:MS, link-reset; at
    /// precopy, switchover or postcopy (stand-in VMM only). See the README's
    /// "When things fail".
    #[arg(long, value_delimiter = ',')]
    chaos: Vec<ChaosEvent>,
    /// Two hosts on one machine: the source side and the target side each in
    /// a network namespace of its own, the agents talking over a veth link
    /// between them (stand-in VMM only; needs root, iproute2 and nftables).
    #[arg(long)]
    two_hosts: bool,
    /// Limits the link between the two hosts to N Gbit/s each way (tc tbf;
    /// with --two-hosts).
    #[arg(long, value_name = "N")]
    link_rate_gbit: Option<f64>,
    /// The agents without TLS. By default they speak mutual TLS with
    /// throwaway certificates made for the run (a CA, one certificate per
    /// agent, one for the demo as the orchestrator).
    #[arg(long)]
    plaintext: bool,
    /// The target agent's --source-unreachable-timeout (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    source_unreachable_timeout: Option<Duration>,
    /// The target agent's --pause-timeout (e.g. 5s).
    #[arg(long, value_parser = parse_duration)]
    pause_timeout: Option<Duration>,
    #[command(flatten)]
    hooks: HookArgs,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// After the migration, save each agent's final Prometheus metrics to
    /// DIR/source.prom and DIR/target.prom (stand-in VMM only).
    #[arg(long, value_name = "DIR")]
    metrics_dump: Option<PathBuf>,
    /// Keep the agents' and the stand-ins' logs (their stderr) in DIR, which
    /// must exist, as NAME.log (stand-in VMM only; by default they go with
    /// the work directory).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The source guest writes TEXT at the start of every page that starts
    /// with data: a marker to look for where no guest memory may appear,
    /// such as the logs (stand-in VMM only).
    #[arg(long, value_name = "TEXT")]
    guest_marker: Option<String>,
}

/// The target agent's test hooks; they need a target agent built with its
/// `test-hooks` feature (`scripts/test` builds it so; see
/// `target-agent/src/test_hooks.rs`).
#[derive(Debug, clap::Args)]
struct HookArgs {
    /// TEST HOOK: the target agent asks for the final bitmap only after this
    /// many faults (so that faults hit pages of unknown state)...
    #[arg(long, hide = true, default_value_t = 0)]
    test_hold_bitmap_until_faults: u64,
    /// TEST HOOK: ...or after this many milliseconds, whichever comes first.
    #[arg(long, hide = true, default_value_t = 0)]
    test_hold_bitmap_ms: u64,
    /// TEST HOOK: the target agent installs this many stale pages as if
    /// fresh, to show that the verification catches them.
    #[arg(long, hide = true, default_value_t = 0)]
    test_withhold_stale_pages: u64,
    /// TEST HOOK: the target agent's fault loop stops at this fault...
    #[arg(long, hide = true, requires = "test_break_fault_loop")]
    test_break_fault_loop_after: Option<u64>,
    /// TEST HOOK: ...with an error or a panic.
    #[arg(long, hide = true, value_enum)]
    test_break_fault_loop: Option<FaultLoopBreak>,
}

impl HookArgs {
    fn hooks(&self) -> AgentTestHooks {
        AgentTestHooks {
            hold_bitmap_until_faults: self.test_hold_bitmap_until_faults,
            hold_bitmap_ms: self.test_hold_bitmap_ms,
            withhold_stale_pages: self.test_withhold_stale_pages,
            break_fault_loop: self.test_break_fault_loop_after.zip(self.test_break_fault_loop),
        }
    }
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
        if args.metrics_dump.is_some()
            || args.two_hosts
            || args.link_rate_gbit.is_some()
            || args.log_dir.is_some()
            || args.guest_marker.is_some()
        {
            bail!(
                "--metrics-dump, --two-hosts, --link-rate-gbit, --log-dir and --guest-marker work with --vmm standin \
                 only"
            );
        }
        if let Some(event) = args.chaos.iter().find(|e| !chaos_supported(e)) {
            bail!("--chaos {event}: with --vmm qemu only kill-target-agent can be rehearsed");
        }
        return run_qemu(&args).await;
    }
    let options = MigrationOptions {
        memory_bytes: args.memory.unwrap_or(1 << 30),
        written_bytes: args.written,
        hugetlb: args.hugetlb,
        vcpus: args.vcpus,
        seed: args.seed,
        dirty_rate: args.dirty_rate.unwrap_or(if args.hugetlb { 100 } else { 20_000 }),
        run_ms: args.run_ms,
        max_precopy_rounds: args.max_precopy_rounds,
        write_before_pause: args.write_before_pause,
        touch_after_resume: args.touch_after_resume,
        hooks: args.hooks.hooks(),
        metrics_dump: args.metrics_dump.clone(),
        chaos: args.chaos.clone(),
        source_unreachable_timeout: args.source_unreachable_timeout,
        pause_timeout: args.pause_timeout,
        two_hosts: args.two_hosts,
        link_rate_gbit: args.link_rate_gbit,
        plaintext: args.plaintext,
        log_dir: args.log_dir.clone(),
        guest_marker: args.guest_marker.clone(),
        ..MigrationOptions::default()
    };
    let report = run_migration_until(&options, stop_signal()).await.context("migration failed")?;
    show_report(&report, args.report_json.as_deref())?;
    if let Some(failure) = &report.failure {
        bail!(
            "the migration failed: {failure} ({} pages the frozen guest can see compared, {} mismatched)",
            report.verified_pages,
            report.mismatched_pages
        );
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
        hooks: args.hooks.hooks(),
        chaos: args.chaos.clone(),
        plaintext: args.plaintext,
        ..QemuOptions::default()
    };
    let report = run_qemu_migration_until(&options, stop_signal()).await.context("QEMU migration failed")?;
    show_report(&report, args.report_json.as_deref())?;
    if report.guest.bad_words > 0 {
        bail!("the guest saw {} bad words after the migration", report.guest.bad_words);
    }
    Ok(())
}

/// Prints `report`, and writes it to `json` as JSON if asked (`--report-json`).
fn show_report(report: &(impl fmt::Display + serde::Serialize), json: Option<&Path>) -> anyhow::Result<()> {
    println!("\n{report}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}
