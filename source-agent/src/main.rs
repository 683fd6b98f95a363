//! `source-agent`: serves one VM's memory to a migration's target agent.
//!
//! Memory comes from a VMM's hand-off on a Unix socket (`--handoff-socket`)
//! or from a plain file (`--memory-file`). Once the gRPC and metrics listeners
//! are bound the agent prints one line to stdout,
//! `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`; logs go to stderr
//! (`RUST_LOG`, default `info`). Prometheus metrics are served on
//! `http://METRICS_ADDR/metrics` ([`source_agent::metrics`]). SIGTERM or
//! SIGINT shut it down gracefully.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use source_agent::{SourceAgent, SourceMemory, listen_for_handoff, serve};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

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
    /// Serve this file as the guest memory instead (never changes; counts as paused).
    #[arg(long, env = "PAGESERVER_MEMORY_FILE", value_name = "PATH")]
    memory_file: Option<PathBuf>,
    /// Page size of --memory-file (4096 or 2097152).
    #[arg(long, env = "PAGESERVER_PAGE_SIZE", default_value_t = 4096)]
    page_size: u64,
    /// The VM's name, reported in GetLayout, logs and metrics (label `vm`).
    #[arg(long, env = "PAGESERVER_VM", default_value = "vm")]
    vm: String,
    /// Prometheus metrics listen address, served at /metrics (port 0 picks a free port).
    #[arg(long, env = "PAGESERVER_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
}

#[derive(serde::Serialize)]
struct ListeningEvent<'a> {
    event: &'a str,
    grpc: String,
    metrics: String,
}

async fn shutdown_signal() {
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let (agent, _handoff_listener) = match (&cli.handoff_socket, &cli.memory_file) {
        (Some(socket), _) => {
            let agent = Arc::new(SourceAgent::waiting_for_handoff(&cli.vm, socket));
            let listener = listen_for_handoff(socket, agent.clone())?;
            (agent, Some(listener))
        }
        (None, Some(file)) => {
            let memory = SourceMemory::open_file(file, cli.page_size)?;
            tracing::info!(file = %file.display(), pages = memory.layout().total_pages(), "serving a memory file");
            (Arc::new(SourceAgent::with_memory(&cli.vm, memory)), None)
        }
        (None, None) => anyhow::bail!("give --handoff-socket or --memory-file"),
    };

    let metrics = source_agent::metrics::install(agent.clone()).context("setting up metrics")?;
    let listener = TcpListener::bind(&cli.listen).await.with_context(|| format!("binding {}", cli.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    let metrics_listener = TcpListener::bind(&cli.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics listener {}", cli.metrics_listen))?;
    let metrics_address = metrics_listener.local_addr().context("reading the bound metrics address")?;
    let mut stdout = std::io::stdout().lock();
    let event = ListeningEvent { event: "listening", grpc: address.to_string(), metrics: metrics_address.to_string() };
    serde_json::to_writer(&mut stdout, &event)?;
    writeln!(stdout)?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%address, %metrics_address, vm = %cli.vm, "gRPC and metrics listening");

    // Metrics stay up until the gRPC server has finished its calls.
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = tokio::spawn(pageserver_metrics::serve_metrics(metrics_listener, metrics, async {
        let _ = metrics_stopped.await;
    }));
    let served = serve(listener, agent, shutdown_signal()).await;
    let _ = stop_metrics.send(());
    let _ = metrics_server.await;
    served?;
    tracing::info!("stopped");
    Ok(())
}
