//! Two hosts on one machine (`pageserver-demo --two-hosts`): the source side
//! and the target side each in a network namespace, the agents talking only
//! over a veth link between them; and faults on that link (the link down,
//! packets lost, connections reset) and a rate limit. After each migration
//! every byte of the target is compared with the source's memory at pause,
//! and nothing of the two hosts may be left on the machine.
//!
//! Needs root, iproute2, nftables and the workspace's binaries
//! (`scripts/test`).

mod common;

use std::process::Command;

use common::{MIB, assert_every_byte_verified, hold_bitmap, migrate_then, options};
use pageserver_demo::chaos::ChaosEvent;
use pageserver_demo::netns::NAMESPACE_PREFIX;
use pageserver_demo::process::WorkDir;
use pageserver_demo::{MigrationOptions, Report};

fn two_hosts() -> MigrationOptions {
    MigrationOptions { two_hosts: true, dirty_rate: 20_000, ..options(64 * MIB) }
}

/// `command`'s stdout.
fn output(command: &[&str]) -> String {
    let out = Command::new(command[0]).args(&command[1..]).output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// No namespace of this process's migrations and no demo link remains.
fn assert_nothing_left() {
    let ours = format!("{NAMESPACE_PREFIX}{}-", std::process::id());
    let namespaces = output(&["ip", "netns", "list"]);
    assert!(!namespaces.contains(&ours), "namespaces left behind:\n{namespaces}");
    let links = output(&["ip", "-o", "link", "show"]);
    assert!(!links.contains("psdemo"), "links left behind:\n{links}");
}

/// A two-hosts migration; then nothing of it may be left.
async fn migrate_on_two_hosts(opts: MigrationOptions) -> Report {
    let r = migrate_then(opts, assert_nothing_left).await;
    let network = r.network.as_ref().expect("the report describes the two hosts");
    assert!(network.source_namespace.starts_with(NAMESPACE_PREFIX), "{network:?}");
    assert_ne!(network.source_addr, network.target_addr);
    r
}

/// A migration with one link fault; the final bitmap is held back a while
/// so that post-copy still fetches from the source when it strikes.
async fn with_link_fault(event: &str) -> Report {
    let event: ChaosEvent = event.parse().unwrap_or_else(|why| panic!("{why}"));
    let r = migrate_on_two_hosts(MigrationOptions { chaos: vec![event], hooks: hold_bitmap(300), ..two_hosts() }).await;
    assert_eq!(r.chaos.len(), 1, "the event fired: {:?}", r.chaos);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_between_two_hosts_verifies_every_byte_and_its_metrics_are_scraped() {
    let dump = WorkDir::create().expect("a directory for the metrics");
    let r = migrate_on_two_hosts(MigrationOptions { metrics_dump: Some(dump.path().to_owned()), ..two_hosts() }).await;
    assert_every_byte_verified(&r);
    assert!(r.stale_pages_at_switchover > 0, "the guest dirtied nothing after the last round");
    let network = r.network.as_ref().expect("two hosts");
    let target = std::fs::read_to_string(dump.path().join("target.prom")).expect("the target agent's metrics");
    assert!(target.contains("phase=\"complete\"} 1"), "{target}");
    let source = std::fs::read_to_string(dump.path().join("source.prom")).expect("the source agent's metrics");
    assert!(source.contains("pageserver_source_pages_served_total"), "{source}");
    assert!(!network.source_qdisc.contains("tbf"), "no rate limit was asked for: {}", network.source_qdisc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_a_migration_between_two_hosts_verifies_every_byte() {
    let r = migrate_on_two_hosts(MigrationOptions { hugetlb: true, dirty_rate: 400, ..two_hosts() }).await;
    assert_eq!(r.page_size, 2 * MIB);
    assert_every_byte_verified(&r);
}

/// The link goes down for longer than the target needs to notice: its
/// streams break, it reports the source down, reconnects with backoff, and
/// the migration completes once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_during_postcopy_is_seen_survived_and_every_byte_verified() {
    let r = with_link_fault("link-down:1500@postcopy").await;
    assert_every_byte_verified(&r);
    assert_eq!(r.chaos[0].source_down_seen, Some(true), "source_up never false during the outage: {:?}", r.chaos[0]);
    assert!(r.source_reconnects >= 1, "the target agent never reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_during_precopy_is_survived_and_every_byte_verified() {
    let r = with_link_fault("link-down:1000@precopy").await;
    assert_every_byte_verified(&r);
    assert!(r.chaos[0].source_down_seen.is_some(), "the outage was watched: {:?}", r.chaos[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_link_during_postcopy_is_survived_and_every_byte_verified() {
    let r = with_link_fault("link-loss:30:2000@postcopy").await;
    assert_every_byte_verified(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_during_postcopy_are_reopened_and_every_byte_verified() {
    let r = with_link_fault("link-reset@postcopy").await;
    assert_every_byte_verified(&r);
    assert!(r.source_reconnects >= 1, "the target agent never reconnected after the reset: {:?}", r.chaos[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_link_carries_the_migration_and_every_byte_verified() {
    let r = migrate_on_two_hosts(MigrationOptions { link_rate_gbit: Some(1.0), ..two_hosts() }).await;
    assert_every_byte_verified(&r);
    let network = r.network.as_ref().expect("two hosts");
    for qdisc in [&network.source_qdisc, &network.target_qdisc] {
        assert!(qdisc.contains("tbf") && qdisc.contains("rate 1Gbit"), "both ends are limited: {qdisc}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_chaos_without_two_hosts_is_refused_before_anything_starts() {
    let event: ChaosEvent = "link-down:100@postcopy".parse().expect("a link event");
    let err = pageserver_demo::run_migration(&MigrationOptions { chaos: vec![event], ..options(64 * MIB) })
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("needs --two-hosts"), "{err}");
    let rate = MigrationOptions { link_rate_gbit: Some(1.0), ..options(64 * MIB) };
    let err = pageserver_demo::run_migration(&rate).await.expect_err("refused");
    assert!(err.to_string().contains("needs --two-hosts"), "{err}");
}
