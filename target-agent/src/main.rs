//! `target-agent`: see the crate docs.
//!
//! Bad configuration fails at start, before anything is listening: the
//! source URL, the flags' values, the hand-off socket (bound then: a path
//! that is not a socket, or a socket another agent listens on, is refused).
//! With `PAGESERVER_DIE_WITH_PARENT=PID` it dies with the process that
//! started it ([`pageserver_parent_death`]).
//!
//! Once the gRPC and metrics listeners are bound the agent prints one line to
//! stdout, `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`; logs go to
//! stderr (`RUST_LOG`, default `info`). Prometheus metrics are served on
//! `http://METRICS_ADDR/metrics` ([`target_agent::metrics`]). SIGTERM or
//! SIGINT shut it down gracefully; it then exits non-zero, with the reason on
//! stderr, if the migration failed.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pageserver_agent_shell::exit::describe;
use pageserver_agent_shell::{AgentShell, exit_code, parse_duration};
use target_agent::agent::{TargetAgent, TargetConfig};
use target_agent::phase::Phase;
use target_agent::service::serve;

/// Target side of a post-copy migration: pulls pages from the source agent
/// and serves the guest's page faults.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// gRPC listen address (MigrationTarget, health, reflection).
    #[arg(long, env = "PAGESERVER_LISTEN", default_value = "127.0.0.1:50052")]
    listen: String,
    /// The source agent's gRPC URL, e.g. http://10.0.0.5:50051.
    #[arg(long, env = "PAGESERVER_SOURCE")]
    source: String,
    /// Unix socket on which the target VMM hands its memory over.
    #[arg(long, env = "PAGESERVER_HANDOFF_SOCKET")]
    handoff_socket: PathBuf,
    /// Name of the VM (logs, metrics label `vm`).
    #[arg(long, env = "PAGESERVER_VM", default_value = "vm")]
    vm: String,
    /// Prometheus metrics listen address, served at /metrics (port 0 picks a free port).
    #[arg(long, env = "PAGESERVER_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: String,
    /// Most pre-copy rounds before waiting for switchover (at least 1).
    #[arg(long, env = "PAGESERVER_MAX_PRECOPY_ROUNDS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_precopy_rounds: u32,
    /// How long the migration waits for an unreachable source agent (or for
    /// the right one while another answers on its address) before it fails,
    /// freezing the guest (e.g. 30s, 500ms).
    #[arg(long, env = "PAGESERVER_SOURCE_UNREACHABLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    source_unreachable_timeout: Duration,
    /// How long post-copy waits for a source that says its VM is not paused
    /// (Switchover declared before the pause) before it fails.
    #[arg(long, env = "PAGESERVER_PAUSE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pause_timeout: Duration,
    #[command(flatten)]
    hooks: target_agent::test_hooks::TestHooks,
}

fn main() -> ExitCode {
    let args = Args::parse();
    pageserver_agent_shell::init_logging();
    exit_code(run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    pageserver_parent_death::die_with_parent()?;
    // Bad configuration fails now, not after the VMM's hand-off.
    target_agent::source::check_url(&args.source)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let agent = TargetAgent::new(TargetConfig {
            source_url: args.source,
            handoff_socket: args.handoff_socket,
            vm: args.vm,
            max_precopy_rounds: args.max_precopy_rounds,
            source_unreachable_timeout: args.source_unreachable_timeout,
            pause_timeout: args.pause_timeout,
            hooks: args.hooks,
        });
        agent.handoff.bind().context("binding the hand-off socket (--handoff-socket)")?;
        let metrics = target_agent::metrics::install(agent.clone()).context("setting up metrics")?;
        let shell = AgentShell::bind(&args.listen, &args.metrics_listen).await?;
        tokio::spawn(agent.clone().run());
        let served = shell.run(metrics, |listener, shutdown| serve(listener, agent.clone(), shutdown)).await;
        // A failed migration fails the agent, even after a clean shutdown.
        if agent.phase.get() == Phase::Failed {
            if let Err(error) = &served {
                tracing::error!(error = %describe(error), "the gRPC server failed too");
            }
            anyhow::bail!("the migration failed: {}", agent.phase.error().unwrap_or_default());
        }
        Ok(served?)
    })
}
