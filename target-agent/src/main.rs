//! `target-agent`: see the crate docs.
//!
//! Bad configuration fails at start, before anything is listening: the
//! source URL, the flags' values, the hand-off socket (bound then: a path
//! that is not a socket, or a socket another agent listens on, is refused).
//! Once the gRPC and metrics listeners are bound the agent prints one line
//! to stdout, `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`; logs go
//! to stderr (`RUST_LOG`, default `info`). Prometheus metrics are served on
//! `http://METRICS_ADDR/metrics` ([`target_agent::metrics`]).
//!
//! SIGTERM or SIGINT stop it as [`target_agent::shutdown`] says for the
//! phase the migration is in; it exits 0 only if it never got work or the
//! migration is complete, and otherwise non-zero with the reason on stderr.
//! With `PAGESERVER_DIE_WITH_PARENT=PID` it dies with the process that
//! started it ([`pageserver_parent_death`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pageserver_agent_shell::exit::describe;
use pageserver_agent_shell::{
    AgentShell, GrpcLimits, PeerAllowList, SecurityArgs, exit_code, parse_duration, shutdown_signal,
};
use target_agent::agent::{TargetAgent, TargetConfig};
use target_agent::pull_order::PullOrder;
use target_agent::service::serve;
use target_agent::shutdown::{self, Stopped};
use tokio::sync::oneshot;

/// Target side of a post-copy migration: pulls pages from the source agent
/// and serves the guest's page faults.
#[derive(Debug, Parser)]
#[command(version, after_long_help = STOPPING)]
struct Args {
    /// gRPC listen address (MigrationTarget, health, reflection).
    #[arg(long, env = "PAGESERVER_LISTEN", default_value = "127.0.0.1:50052")]
    listen: String,
    /// The source agent's gRPC URL: https://NAME:PORT over mutual TLS (the
    /// source's certificate must be valid for NAME), or http://HOST:PORT
    /// without TLS.
    #[arg(long, env = "PAGESERVER_SOURCE")]
    source: String,
    /// Unix socket on which the target VMM hands its memory over.
    #[arg(long, env = "PAGESERVER_HANDOFF_SOCKET")]
    handoff_socket: PathBuf,
    /// The uids whose processes may hand memory over on --handoff-socket
    /// (checked on every connection; default: this agent's own uid).
    #[arg(long, env = "PAGESERVER_HANDOFF_ALLOW_UID", value_name = "UID[,UID...]")]
    handoff_allow_uid: Option<PeerAllowList>,
    #[command(flatten)]
    handoff_group: pageserver_agent_shell::HandoffGroupArg,
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
    /// On SIGTERM or SIGINT during post-copy, how long the agent keeps
    /// serving the guest for the migration to complete before it fails it
    /// (e.g. 30s, 500ms). See "Stopping" below.
    #[arg(long, env = "PAGESERVER_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// How long after the switchover the background pull of stale pages
    /// waits before it starts; the guest's faults are served meanwhile, with
    /// the link to themselves (e.g. 200ms). The migration completes that
    /// much later.
    #[arg(long, env = "PAGESERVER_PULL_DELAY", default_value = "0s", value_parser = parse_duration)]
    pull_delay: Duration,
    /// Which stale pages the background pull fetches first: `hot` (the
    /// default: the pages the guest dirtied in the most pre-copy rounds, as
    /// the source counted them, then nearest), or `nearest` to the guest's
    /// latest fault. Only an order: the final bitmap alone says what is stale.
    #[arg(long, env = "PAGESERVER_PULL_ORDER", value_enum, default_value_t = PullOrder::default())]
    pull_order: PullOrder,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    grpc_limits: GrpcLimits,
    #[command(flatten)]
    hooks: target_agent::test_hooks::TestHooks,
}

/// The stop semantics, for `--help`.
const STOPPING: &str = "\
Stopping (SIGTERM or SIGINT), by the migration's phase:
  waiting-for-handoff, no hand-off yet   exits 0: it never got work
  until the switchover                   abandons the migration at once and exits 1: the source VM still
                                         runs; nothing was installed
  postcopy                               keeps serving the guest for up to --shutdown-grace; exits 0 if
                                         the migration completes, else fails it (naming the pages the
                                         guest will freeze on) and exits 1; a second signal ends the grace
  complete                               hands the guest's memory back to the kernel and exits 0
  failed                                 exits 1 with the reason";

fn main() -> ExitCode {
    let args = Args::parse();
    pageserver_agent_shell::init_logging();
    exit_code(run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    pageserver_parent_death::die_with_parent()?;
    // Bad configuration fails now, not after the VMM's hand-off.
    target_agent::source::check_url(&args.source, args.security.files().is_some())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let flags = "--tls-cert, --tls-key, --tls-ca, --plaintext";
        let security = args.security.resolve(&args.listen).context(flags)?;
        let source_tls = args.security.client().context(flags)?;
        let reloading: Vec<_> = security
            .tls
            .iter()
            .map(|tls| tls.reloading())
            .chain(source_tls.iter().map(|tls| tls.reloading()))
            .collect();
        let _reloading = pageserver_tls::watch(reloading, pageserver_tls::reloading::POLL_INTERVAL)
            .context("watching the TLS certificates")?;
        let agent = TargetAgent::new(TargetConfig {
            source_url: args.source,
            source_tls,
            handoff_socket: args.handoff_socket,
            handoff_peers: args.handoff_allow_uid.unwrap_or_else(PeerAllowList::own_uid),
            handoff_group: args.handoff_group.group,
            vm: args.vm,
            max_precopy_rounds: args.max_precopy_rounds,
            source_unreachable_timeout: args.source_unreachable_timeout,
            pause_timeout: args.pause_timeout,
            pull_delay: args.pull_delay,
            pull_order: args.pull_order,
            hooks: args.hooks,
        });
        agent.handoff.bind().context("binding the hand-off socket (--handoff-socket)")?;
        let metrics = target_agent::metrics::install(agent.clone()).context("setting up metrics")?;
        let shell = AgentShell::bind(&args.listen, &args.metrics_listen, &args.grpc_limits).await?;
        tokio::spawn(agent.clone().run());
        let (stopped_tx, stopped_rx) = oneshot::channel();
        // Watched from now on, before the listening line.
        let signalled = shutdown_signal();
        let stopping = {
            let agent = agent.clone();
            async move {
                signalled.await;
                let _ = stopped_tx.send(shutdown::stop(&agent, args.shutdown_grace, shutdown_signal()).await);
            }
        };
        let (limits, serving) = (args.grpc_limits, agent.clone());
        let served = shell
            .run_until(metrics, stopping, |listener, shutdown| async move {
                serve(listener, serving, &limits, security, shutdown).await
            })
            .await;
        // Without a signal the server stopped by itself: an error.
        let stopped = stopped_rx.await.unwrap_or_else(|_| Stopped::as_it_is(&agent));
        match (served, stopped.into_result()) {
            (Err(error), Err(stop_error)) => {
                tracing::error!(error = %describe(&error), "the gRPC server failed too");
                Err(stop_error.into())
            }
            (Err(error), Ok(())) => Err(error.into()),
            (Ok(()), stopped) => Ok(stopped?),
        }
    })
}
