//! `target-agent`: see the crate docs.
//!
//! Once the gRPC and metrics listeners are bound the agent prints one line to
//! stdout, `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`; logs go to
//! stderr (`RUST_LOG`). Prometheus metrics are served on
//! `http://METRICS_ADDR/metrics` ([`target_agent::metrics`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use target_agent::agent::{TargetAgent, TargetConfig};

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
    /// Most pre-copy rounds before waiting for switchover.
    #[arg(long, env = "PAGESERVER_MAX_PRECOPY_ROUNDS", default_value_t = 8)]
    max_precopy_rounds: u32,
    /// FAULT INJECTION for tests of the verification: install this many
    /// stale pages as if fresh. Breaks the product's guarantee on purpose.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_injection_withhold_stale_pages: u64,
}

#[derive(serde::Serialize)]
struct ListeningEvent<'a> {
    event: &'a str,
    grpc: String,
    metrics: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let agent = TargetAgent::new(TargetConfig {
            source_url: args.source,
            handoff_socket: args.handoff_socket,
            vm: args.vm,
            max_precopy_rounds: args.max_precopy_rounds,
            withhold_stale_pages: args.fault_injection_withhold_stale_pages,
        });
        let metrics = target_agent::metrics::install(agent.clone()).context("setting up metrics")?;
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("binding the metrics listener {}", args.metrics_listen))?;
        let metrics_addr = metrics_listener.local_addr()?;
        let event = ListeningEvent { event: "listening", grpc: addr.to_string(), metrics: metrics_addr.to_string() };
        println!("{}", serde_json::to_string(&event)?);
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(%addr, %metrics_addr, "gRPC and metrics listening");
        tokio::spawn(pageserver_metrics::serve_metrics(metrics_listener, metrics, std::future::pending()));
        tokio::spawn(agent.clone().run());
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        target_agent::service::serve(listener, agent, shutdown).await.context("gRPC server")?;
        Ok(())
    })
}
