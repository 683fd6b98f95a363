//! `pageserver-flood`: a hostile client of a source agent, for measuring
//! what its limits hold (the figures): it runs one flood against
//! `--grpc ADDR`, samples the agent's memory and descriptors (`--pid`)
//! before, at its worst during the flood, and after the flood's clients
//! have gone (`--settle` later), and prints them as one JSON line.
#![forbid(unsafe_code)]

use std::time::Duration;

use clap::{Parser, Subcommand};
use pageserver_agent_shell::parse_duration;
use pageserver_demo::flood::{self, StreamEnd};
use pageserver_demo::resources::ProcessResources;

#[derive(Debug, Parser)]
#[command(about = "Floods a source agent and measures its memory and descriptors")]
struct Cli {
    /// The source agent's gRPC address (HOST:PORT).
    #[arg(long)]
    grpc: String,
    /// The source agent's pid (sampled from /proc).
    #[arg(long)]
    pid: u32,
    /// How long after the flood's clients are gone the "after" sample is taken.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    settle: Duration,
    #[command(subcommand)]
    flood: Flood,
}

#[derive(Debug, Subcommand)]
enum Flood {
    /// Streams that send their requests and never read a reply, held open.
    NeverReading {
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        #[arg(long, default_value_t = 512)]
        pages: u32,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
    },
    /// Clients that each ask for every page and read everything.
    Readers {
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 1)]
        per_connection: usize,
    },
    /// TCP connections that send nothing, held open.
    Idle {
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
    },
}

fn summary(ends: &[StreamEnd]) -> serde_json::Value {
    let served = ends.iter().filter(|e| matches!(e, StreamEnd::Served { .. })).count();
    let refused = ends.iter().filter(|e| matches!(e, StreamEnd::Refused)).count();
    let cut: Vec<&String> =
        ends.iter().filter_map(|e| if let StreamEnd::Cut(why) = e { Some(why) } else { None }).collect();
    serde_json::json!({ "served": served, "refused": refused, "cut": cut.len(), "first_cut": cut.first() })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let before = ProcessResources::of(cli.pid)?;
    let grpc = cli.grpc.clone();
    let (outcome, during) = match cli.flood {
        Flood::NeverReading { streams, requests, pages, hold } => {
            flood::worst_during(cli.pid, async {
                let mut open = Vec::new();
                for _ in 0..streams {
                    open.push(flood::never_reading(&grpc, requests, pages).await?);
                }
                tokio::time::sleep(hold).await;
                let mut ends = Vec::new();
                for stream in open {
                    ends.push(
                        tokio::time::timeout(Duration::from_secs(1), stream.end())
                            .await
                            .unwrap_or(StreamEnd::Cut("still open, nothing read: abandoned".to_owned())),
                    );
                }
                anyhow::Ok(summary(&ends))
            })
            .await
        }
        Flood::Readers { connections, per_connection } => {
            let layout = flood::layout(&grpc).await?;
            flood::worst_during(cli.pid, async {
                anyhow::Ok(summary(&flood::read_everything(&grpc, &layout, connections, per_connection).await))
            })
            .await
        }
        Flood::Idle { count, hold } => flood::worst_during(cli.pid, async {
            let connections = flood::idle_connections(&grpc, count).await;
            let opened = connections.len();
            let early = flood::closed_by_peer(&connections);
            tokio::time::sleep(hold).await;
            let closed = flood::closed_by_peer(&connections);
            let layout = tokio::time::timeout(Duration::from_secs(5), flood::layout(&grpc)).await;
            let layout = match layout {
                Ok(Ok(_)) => "answered".to_owned(),
                Ok(Err(status)) => format!("{:?}", status.code()),
                Err(_) => "timed out".to_owned(),
            };
            anyhow::Ok(serde_json::json!({
                "connected": opened, "closed_at_once": early, "closed_after_hold": closed, "get_layout_during": layout
            }))
        })
        .await,
    };
    let outcome = outcome?;
    tokio::time::sleep(cli.settle).await;
    let after = ProcessResources::of(cli.pid)?;
    let line = serde_json::json!({ "outcome": outcome, "before": before, "during_worst": during, "after": after });
    println!("{line}");
    Ok(())
}
