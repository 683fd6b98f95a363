//! A hostile flood of the source agent during a migration: hundreds of
//! streams asking for every page, a stream that asks for 2 GB and never
//! reads a reply, a thousand connections that never send anything. The
//! migration must complete with every byte verified; the flood must be
//! refused (RESOURCE_EXHAUSTED) or cut; the agent's memory and descriptors
//! must stay under bounds derived from its limits, and come back down once
//! the flood has gone.
//!
//! No timing is asserted: the waits below have deadlines only so that a
//! broken limit fails the test instead of hanging it.
//!
//! Needs root and the workspace's binaries (`scripts/test`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MIB, assert_every_byte_verified, migrate, options};
use pageserver_demo::flood::{self, StreamEnd};
use pageserver_demo::resources::ProcessResources;
use pageserver_demo::{MigrationObserver, MigrationOptions, StartedAgent};
use tokio::sync::{Notify, mpsc};

/// The source agent's limits in this test, small so that the flood
/// reaches every one of them.
const MAX_CONNECTIONS: u64 = 64;
const MAX_RPCS: u64 = 32;
const STREAM_BYTES: u64 = 4 * MIB;
const TOTAL_BYTES: u64 = 32 * MIB;
const METRICS_MAX_CONNECTIONS: u64 = 16;

fn limit_flags() -> Vec<String> {
    [
        format!("--grpc-max-connections={MAX_CONNECTIONS}"),
        "--grpc-idle-timeout=1s".to_owned(),
        "--grpc-max-streams-per-connection=8".to_owned(),
        format!("--grpc-max-rpcs={MAX_RPCS}"),
        format!("--get-pages-stream-bytes={STREAM_BYTES}"),
        format!("--get-pages-total-bytes={TOTAL_BYTES}"),
        "--get-pages-stall-timeout=1s".to_owned(),
        format!("--metrics-max-connections={METRICS_MAX_CONNECTIONS}"),
    ]
    .into()
}

/// What the agent may hold at worst above its baseline, from its limits:
/// - the replies all `GetPages` streams may queue (`TOTAL_BYTES`);
/// - per RPC under way (`MAX_RPCS`), what HTTP/2 and tonic hold beyond
///   that queue: hyper's send buffer (400 KiB), one encoded reply and one
///   reply read (2 MiB each);
/// - per connection (`MAX_CONNECTIONS`), the requests it may send unread
///   (the 1 MiB connection window) and its buffers (256 KiB);
/// - 32 MiB for the allocator, tasks and the agent's own work.
const MEMORY_BOUND_KIB: u64 =
    (TOTAL_BYTES + MAX_RPCS * (4 * MIB + 400 * 1024) + MAX_CONNECTIONS * (MIB + 256 * 1024) + 32 * MIB) / 1024;
/// Descriptors above the baseline: every connection under the caps, and a
/// few for the agent's own use (a hand-off, a log).
const FD_BOUND: u64 = MAX_CONNECTIONS + METRICS_MAX_CONNECTIONS + 8;
/// Once the flood has gone, what the migration's own streams may still
/// hold (two of them queuing their whole budget) and 16 MiB of slack.
const MEMORY_AFTER_KIB: u64 = (2 * STREAM_BYTES + 16 * MIB) / 1024;
/// Once the flood has gone: the migration's own connections.
const FD_AFTER: u64 = 8;

/// The flood's sizes: 200 streams, 2000 requests of 512 pages, 1000 idle
/// connections.
const READER_CONNECTIONS: usize = 20;
const STREAMS_PER_CONNECTION: usize = 10;
const NEVER_READ_REQUESTS: u64 = 2000;
const IDLE_CONNECTIONS: usize = 1000;
/// A broken limit fails the test after this, rather than hanging it.
const DEADLINE: Duration = Duration::from_secs(60);

/// The value of the series `name` (with its labels, as rendered) in the
/// agent's `/metrics`.
async fn metric(agent: &StartedAgent, series: &str) -> f64 {
    let text = pageserver_metrics::scrape(&agent.metrics).await.expect("scrape the source agent");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Waits until `done` says so, at most [`DEADLINE`].
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_during_a_migration_is_refused_or_cut_and_the_agent_stays_bounded() {
    pageserver_agent_shell::fd_limit::raise_fd_limit();
    let (started, mut source_agents) = mpsc::unbounded_channel();
    let before_verify = Arc::new(Notify::new());
    let opts = MigrationOptions {
        source_agent_flags: limit_flags(),
        observer: Some(MigrationObserver { source_agent: started, before_verify: before_verify.clone() }),
        run_ms: 2_000,
        // The flood must reach the RPC layer to test its limits: over mutual
        // TLS a client without the CA's certificate never gets past the
        // handshake (tested in source-agent/tests/mtls.rs).
        plaintext: true,
        ..options(64 * MIB)
    };
    let migration = tokio::spawn(async move { migrate(opts).await });
    let agent = source_agents.recv().await.expect("the source agent started");
    let vm = r#"{vm="demo-vm"}"#;
    let layout = {
        let start = Instant::now();
        loop {
            match flood::layout(&agent.grpc).await {
                Ok(layout) => break layout,
                Err(status) => assert!(start.elapsed() < DEADLINE, "no memory on the source agent: {status}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let before = ProcessResources::of(agent.pid).expect("the source agent's resources");

    let ((reader_ends, never_read_end, idle), worst) = flood::worst_during(agent.pid, async {
        let readers = flood::read_everything(&agent.grpc, &layout, READER_CONNECTIONS, STREAMS_PER_CONNECTION);
        let never_reading = async {
            let stream = flood::never_reading(&agent.grpc, NEVER_READ_REQUESTS, 512).await.expect("connect");
            if !stream.refused_at_once() {
                wait_until("the stream that never reads is cut", || async {
                    metric(&agent, r#"pageserver_grpc_connections_closed_total{vm="demo-vm",reason="cut"}"#).await
                        >= 1.0
                })
                .await;
            }
            tokio::time::timeout(DEADLINE, stream.end()).await.expect("the stream that never reads ended")
        };
        let idle = async {
            let idle = flood::idle_connections(&agent.grpc, IDLE_CONNECTIONS).await;
            wait_until("every idle connection is closed by the agent", || async {
                flood::closed_by_peer(&idle) == idle.len()
            })
            .await;
            idle
        };
        tokio::join!(readers, never_reading, idle)
    })
    .await;
    drop(idle);
    // The flood has gone: its connections close, its memory goes back.
    wait_until("the flood's connections are closed", || async {
        metric(&agent, &format!("pageserver_grpc_connections_open{vm}")).await <= FD_AFTER as f64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = ProcessResources::of(agent.pid).expect("the source agent's resources");
    let refused = metric(&agent, &format!("pageserver_grpc_connections_refused_total{vm}")).await;
    let shed_rpcs = metric(&agent, r#"pageserver_grpc_rpcs_shed_total{vm="demo-vm",reason="max_rpcs"}"#).await;
    let shed_pages = metric(&agent, r#"pageserver_grpc_rpcs_shed_total{vm="demo-vm",reason="pages_in_flight"}"#).await;
    before_verify.notify_one();
    let report = migration.await.expect("the migration task");

    let count = |f: fn(&StreamEnd) -> bool| reader_ends.iter().filter(|end| f(end)).count();
    let served = count(|end| matches!(end, StreamEnd::Served { .. }));
    let refused_streams = count(|end| matches!(end, StreamEnd::Refused));
    println!(
        "flood: {} streams: {served} served, {refused_streams} refused, {} cut; the stream that never reads: \
         {never_read_end:?}; metrics: {refused} connections refused, {shed_rpcs} + {shed_pages} RPCs shed",
        reader_ends.len(),
        reader_ends.len() - served - refused_streams
    );
    println!("source agent before: {before:?}\n  worst during: {worst:?}\n  after: {after:?}");
    println!(
        "bounds: private memory {MEMORY_BOUND_KIB} KiB and {FD_BOUND} descriptors above the baseline during, \
         {MEMORY_AFTER_KIB} KiB and {FD_AFTER} after"
    );
    println!("stale-fault latency under the flood: {:?}", report.fault_latency_us.get("fetched"));

    assert_every_byte_verified(&report);
    // The flood was refused or cut: every stream ended; some were refused
    // with RESOURCE_EXHAUSTED; the one that never reads was not served.
    assert_eq!(reader_ends.len(), READER_CONNECTIONS * STREAMS_PER_CONNECTION);
    assert!(refused_streams > 0, "no stream was refused: {reader_ends:?}");
    assert!(!matches!(never_read_end, StreamEnd::Served { .. }), "{never_read_end:?}");
    // More idle connections than the cap: some were refused at once.
    assert!(refused > 0.0, "no connection refused");
    assert!(shed_rpcs + shed_pages > 0.0);
    // Bounded during the flood, back down after it.
    assert!(
        worst.rss_anon_kib <= before.rss_anon_kib + MEMORY_BOUND_KIB,
        "private memory grew past its bound: {before:?} -> {worst:?}"
    );
    assert!(worst.fds <= before.fds + FD_BOUND, "descriptors grew past their bound: {before:?} -> {worst:?}");
    assert!(after.rss_anon_kib <= before.rss_anon_kib + MEMORY_AFTER_KIB, "memory kept: {before:?} -> {after:?}");
    assert!(after.fds <= before.fds + FD_AFTER, "descriptors kept: {before:?} -> {after:?}");
}
