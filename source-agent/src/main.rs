//! `source-agent`: serves one VM's memory to a migration's target agent.
//!
//! Memory comes from a VMM's hand-off on a Unix socket (`--handoff-socket`)
//! or from a plain file (`--memory-file`). Bad configuration fails at start,
//! before anything is listening: a page size other than 4 KiB or 2 MiB, a
//! memory file that is not whole pages, a hand-off socket path that is not a
//! socket or is in use, an address that cannot be bound. Once the gRPC and
//! metrics listeners are bound the agent prints one line to stdout,
//! `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`; logs go to stderr
//! (`RUST_LOG`, default `info`). Prometheus metrics are served on
//! `http://METRICS_ADDR/metrics` ([`source_agent::metrics`]).
//!
//! SIGTERM or SIGINT stop it within `--shutdown-grace` (plus a second to
//! close its connections), whatever its clients do: see
//! [`source_agent::drain`]. With `PAGESERVER_DIE_WITH_PARENT=PID` it dies
//! with the process that started it ([`pageserver_parent_death`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use pageserver_agent_shell::{
    AgentShell, GrpcLimits, PeerAllowList, SecurityArgs, exit_code, parse_duration, shutdown_signal,
};
use source_agent::memory::SUPPORTED_PAGE_SIZES;
use source_agent::pages_in_flight::PagesInFlightLimits;
use source_agent::{HandoffListener, SourceAgent, SourceLimits, SourceMemory, listen_for_handoff, serve_with_grace};

#[derive(Debug, Parser)]
#[command(version, about = "Serves one VM's memory and dirty bitmaps to a post-copy migration target")]
#[command(group(ArgGroup::new("memory").required(true).args(["handoff_socket", "memory_file"])))]
struct Cli {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "PAGESERVER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Unix socket on which the VMM hands its guest memory over.
    #[arg(long, env = "PAGESERVER_HANDOFF_SOCKET", value_name = "PATH")]
    handoff_socket: Option<PathBuf>,
    /// The uids whose processes may hand memory over on --handoff-socket
    /// (checked on every connection; default: this agent's own uid).
    #[arg(long, env = "PAGESERVER_HANDOFF_ALLOW_UID", value_name = "UID[,UID...]")]
    handoff_allow_uid: Option<PeerAllowList>,
    #[command(flatten)]
    handoff_group: pageserver_agent_shell::HandoffGroupArg,
    /// Serve this file as the guest memory instead (never changes; counts as paused).
    #[arg(long, env = "PAGESERVER_MEMORY_FILE", value_name = "PATH")]
    memory_file: Option<PathBuf>,
    /// Page size of --memory-file (4096 or 2097152).
    #[arg(long, env = "PAGESERVER_PAGE_SIZE", default_value_t = 4096, value_parser = parse_page_size)]
    page_size: u64,
    /// The VM's name, reported in GetLayout, logs and metrics (label `vm`).
    #[arg(long, env = "PAGESERVER_VM", default_value = "vm")]
    vm: String,
    /// Prometheus metrics listen address, served at /metrics (port 0 picks a free port).
    #[arg(long, env = "PAGESERVER_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    /// On SIGTERM or SIGINT, how long the calls and GetPages streams under
    /// way may go on before they are cut (e.g. 10s, 500ms).
    #[arg(long, env = "PAGESERVER_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    grpc_limits: GrpcLimits,
    #[command(flatten)]
    pages_in_flight: PagesInFlightLimits,
}

/// `--page-size`: one of the sizes guest memory comes in.
fn parse_page_size(text: &str) -> Result<u64, String> {
    let size: u64 = text.parse().map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if SUPPORTED_PAGE_SIZES.contains(&size) {
        Ok(size)
    } else {
        Err(format!("{size} is not a supported page size (4096, or 2097152 for hugetlbfs)"))
    }
}

/// The agent with its memory, or waiting on its hand-off socket (served as
/// long as the listener lives).
fn agent(cli: &Cli) -> anyhow::Result<(Arc<SourceAgent>, Option<HandoffListener>)> {
    match (&cli.handoff_socket, &cli.memory_file) {
        (Some(socket), _) => {
            let agent = Arc::new(SourceAgent::waiting_for_handoff(&cli.vm, socket));
            let peers = cli.handoff_allow_uid.clone().unwrap_or_else(PeerAllowList::own_uid);
            tracing::info!(allowed_uids = %peers, "hand-offs are accepted from these uids only");
            let listener = listen_for_handoff(socket, peers, cli.handoff_group.group.as_ref(), agent.clone())
                .context("binding the hand-off socket (--handoff-socket)")?;
            Ok((agent, Some(listener)))
        }
        (None, Some(file)) => {
            let memory = SourceMemory::open_file(file, cli.page_size)?;
            tracing::info!(file = %file.display(), pages = memory.layout().total_pages(), "serving a memory file");
            Ok((Arc::new(SourceAgent::with_memory(&cli.vm, memory)), None))
        }
        (None, None) => anyhow::bail!("give --handoff-socket or --memory-file"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pageserver_agent_shell::init_logging();
    exit_code(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    pageserver_parent_death::die_with_parent()?;
    serve_until_stopped(cli)
}

#[tokio::main]
async fn serve_until_stopped(cli: Cli) -> anyhow::Result<()> {
    tracing::info!(vm = %cli.vm, "source agent starting");
    let security = cli.security.resolve(&cli.listen).context("--tls-cert, --tls-key, --tls-ca, --plaintext")?;
    let reloading = security.tls.iter().map(|tls| tls.reloading()).collect();
    let _reloading = pageserver_tls::watch(reloading, pageserver_tls::reloading::POLL_INTERVAL)
        .context("watching the TLS certificates")?;
    let (agent, _handoff_listener) = agent(&cli)?;
    let metrics = source_agent::metrics::install(agent.clone()).context("setting up metrics")?;
    let shell = AgentShell::bind(&cli.listen, &cli.metrics_listen, &cli.grpc_limits).await?;
    let grace = cli.shutdown_grace;
    let limits = SourceLimits { grpc: cli.grpc_limits, pages_in_flight: cli.pages_in_flight };
    tracing::info!(
        stream_bytes = limits.pages_in_flight.get_pages_stream_bytes,
        total_bytes = limits.pages_in_flight.get_pages_total_bytes,
        stall_timeout = ?limits.pages_in_flight.get_pages_stall_timeout,
        "GetPages limits"
    );
    shell
        .run_until(metrics, shutdown_signal(), |listener, shutdown| async move {
            serve_with_grace(listener, agent, &limits, security, shutdown, grace).await
        })
        .await?;
    Ok(())
}
