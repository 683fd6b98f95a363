//! `pageserver-bench`: see the library's docs and `BENCHMARKS.md`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pageserver_bench::report::Section;
use pageserver_bench::{BenchOptions, BenchReport, Link, floor, kernel, migrations, plot, qemu};

/// Measures the agents against the physical floor of this machine, in one
/// run: prints a table and writes the figures as JSON.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A short run (about a minute): smaller guests, one repetition.
    #[arg(long)]
    quick: bool,
    /// Write the figures as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    report_json: Option<PathBuf>,
    /// Draw the fault-latency distributions (ours against the floor's) as
    /// an SVG at PATH.
    #[arg(long, value_name = "PATH")]
    plot: Option<PathBuf>,
    /// Only these sections (floor, kernel, migrations, qemu); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Two hosts on one machine: the floor and the migrations run across a
    /// veth link between two network namespaces (as `pageserver-demo
    /// --two-hosts`), not loopback. The kernel rows are in-process, and the
    /// QEMU rows stay on loopback (the QEMU driver has no two-host mode).
    #[arg(long)]
    two_hosts: bool,
    /// Limits that link to N Gbit/s each way (`tc tbf`; with --two-hosts).
    #[arg(long, value_name = "N", requires = "two_hosts")]
    link_rate_gbit: Option<f64>,
}

/// Under `cargo run`, builds the binaries the migrations run (the agents and
/// the VMM stand-in) if they are not there yet; otherwise `Binaries::locate`
/// says which one is missing and how to build it.
fn build_agents_if_missing() -> anyhow::Result<()> {
    let (Err(_), Some(cargo)) = (pageserver_demo::process::Binaries::locate(), std::env::var_os("CARGO")) else {
        return Ok(());
    };
    eprintln!("pageserver-bench: building the agents and the VMM stand-in first");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--bins", "-p", "source-agent", "-p", "target-agent", "-p", "vmm-standin"])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "cargo build of the agents failed ({status})");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // The floor's peer is this binary too: a plain process of its own.
    if std::env::args().nth(1).as_deref() == Some(floor::PEER_ARG) {
        return floor::peer_main();
    }
    let args = Args::parse();
    if let Some(unknown) = args.only.iter().find(|name| Section::MEASURED.iter().all(|s| s.name() != name.as_str())) {
        anyhow::bail!("--only {unknown}: the sections are floor, kernel, migrations and qemu");
    }
    if let Some(rate) = args.link_rate_gbit
        && !(rate > 0.0 && rate.is_finite())
    {
        anyhow::bail!("--link-rate-gbit {rate}: give a positive number of Gbit/s");
    }
    let link = args.two_hosts.then_some(Link { rate_gbit: args.link_rate_gbit });
    let opts = BenchOptions { quick: args.quick, link };
    let wanted = |section: &str| args.only.is_empty() || args.only.iter().any(|s| s == section);
    let mut report = BenchReport::new(opts.quick);
    let mut failures = Vec::new();
    report.sections = Section::MEASURED.into_iter().filter(|s| wanted(s.name())).collect();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    for section in report.sections.clone() {
        eprintln!("pageserver-bench: {}", section.title());
        if matches!(section, Section::Migrations | Section::Qemu) {
            build_agents_if_missing()?;
        }
        let measured = match section {
            Section::Floor => floor::measure(&opts, &mut report),
            Section::Kernel => kernel::measure(&opts, &mut report),
            Section::Migrations => runtime.block_on(migrations::measure(&opts, &mut report)),
            Section::Qemu => runtime.block_on(qemu::measure(&opts, &mut report)),
        };
        if let Err(e) = measured {
            failures.push(format!("{}: {e:#}", section.name()));
        }
    }
    println!("{report}");
    if let Some(path) = &args.report_json {
        let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = "Fault latency: the target agent against the floor (cumulative)";
        std::fs::write(path, plot::svg(title, &report.distributions))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for &section in &report.sections {
        let missing = report.missing(section);
        if !missing.is_empty() {
            failures.push(format!("{}: no figure for {}", section.name(), missing.join(", ")));
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("some rows were not measured:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
