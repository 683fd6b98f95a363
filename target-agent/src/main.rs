//! `target-agent`: see the crate docs.

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
    /// Name of the VM (logs, metrics).
    #[arg(long, env = "PAGESERVER_VM", default_value = "vm")]
    vm: String,
    /// Most pre-copy rounds before waiting for switchover.
    #[arg(long, env = "PAGESERVER_MAX_PRECOPY_ROUNDS", default_value_t = 8)]
    max_precopy_rounds: u32,
    /// FAULT INJECTION for tests of the verification: install this many
    /// stale pages as if fresh. Breaks the product's guarantee on purpose.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_injection_withhold_stale_pages: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("{}", serde_json::json!({"event": "listening", "grpc": addr.to_string()}));
        use std::io::Write;
        std::io::stdout().flush()?;
        let agent = TargetAgent::new(TargetConfig {
            source_url: args.source,
            handoff_socket: args.handoff_socket,
            vm: args.vm,
            max_precopy_rounds: args.max_precopy_rounds,
            withhold_stale_pages: args.fault_injection_withhold_stale_pages,
        });
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
