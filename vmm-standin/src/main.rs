//! `vmm-standin`: a process that owns guest memory like a VMM, for the demo
//! and the tests. Commands on stdin, JSON events on stdout, logs on stderr;
//! see `vmm_standin::protocol`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use vmm_standin::size::parse_size;
use vmm_standin::{EventSink, StandinConfig, StandinEvent, StandinRole};

#[derive(Debug, Parser)]
#[command(about = "A VMM stand-in: owns guest memory and hands it to a page-server agent")]
struct Args {
    /// source or target.
    #[arg(long)]
    role: StandinRole,
    /// Guest memory size: 1G, 256M, 64MiB or bytes.
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    /// A sparse guest: only this much of the memory is ever written (64
    /// clusters spread evenly; the vCPUs stay inside them); all of it if
    /// unset.
    #[arg(long, value_parser = parse_size)]
    written: Option<u64>,
    /// Back guest memory with 2 MiB huge pages (MFD_HUGETLB).
    #[arg(long)]
    hugetlb: bool,
    #[arg(long, default_value_t = 4)]
    vcpus: usize,
    /// Seed of the memory content and of the vCPUs' accesses.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The agent's hand-off socket (retried for ~10 s until it exists).
    #[arg(long)]
    handoff_socket: PathBuf,
    #[arg(long, default_value = "demo-vm")]
    vm: String,
    /// Source: page writes per second across all vCPUs.
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// Source: rewrite every page of the hot set (2% of the pages, the
    /// ones the vCPUs favour) every this many milliseconds until the pause;
    /// 0: never.
    #[arg(long, default_value_t = 0)]
    hot_sweep_ms: u64,
    /// Source: file the paused memory is copied to after `pause`.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Target: how long `resume` runs the guest, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    run_ms: u64,
    /// Target: most pages the guest writes (each needs an undo copy).
    #[arg(long, default_value_t = 4096)]
    max_written_pages: u64,
    /// Source: write TEXT at the start of every page that starts with data
    /// (a marker to look for where no guest memory may appear, e.g. logs).
    #[arg(long, value_name = "TEXT", default_value = "")]
    marker: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // With PAGESERVER_DIE_WITH_PARENT (the demo sets it), this VM dies with
    // the demo, even a demo killed with SIGKILL.
    pageserver_parent_death::die_with_parent()?;
    let config = StandinConfig {
        role: args.role,
        memory_bytes: args.memory,
        written_bytes: args.written,
        hugetlb: args.hugetlb,
        vcpus: args.vcpus,
        seed: args.seed,
        handoff_socket: args.handoff_socket,
        vm: args.vm,
        dirty_rate: args.dirty_rate,
        hot_sweep_ms: args.hot_sweep_ms,
        snapshot: args.snapshot,
        run_ms: args.run_ms,
        max_written_pages: args.max_written_pages,
        marker: args.marker.into_bytes(),
    };
    let events = Arc::new(EventSink::stdout());
    let result = vmm_standin::run(&config, std::io::stdin().lock(), &events);
    if let Err(e) = &result {
        // Tell the orchestrator why, on the channel it reads.
        events.emit(&StandinEvent::Error { message: format!("fatal: {e}") });
    }
    // Returning ends the process, and with it any vCPU thread still running
    // or blocked in a fault.
    result.with_context(|| format!("vmm-standin ({:?} role)", config.role))
}
