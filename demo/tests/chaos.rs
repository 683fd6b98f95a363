//! Chaos during real migrations (`pageserver-demo --chaos`): agents killed,
//! stopped, replaced by an impostor, a switchover declared too early. After
//! each one every byte the target guest can see is compared with the
//! source's memory at pause: a migration that survives must verify every
//! page; one that cannot must fail loudly with a frozen guest that saw no
//! wrong page.
//!
//! Needs root and the workspace's binaries (`scripts/test`).

mod common;

use std::time::Duration;

use common::{MIB, assert_every_byte_verified, hold_bitmap, migrate, options};
use pageserver_demo::chaos::ChaosEvent;
use pageserver_demo::{MigrationOptions, Report};

fn chaos(events: &str) -> Vec<ChaosEvent> {
    events.split(',').map(|e| e.parse().unwrap_or_else(|why| panic!("{why}"))).collect()
}

/// A shmem (or hugetlbfs) migration with `events`; the final bitmap is held
/// back a while so that an event at `switchover` hits before it is in.
async fn migrate_with(events: &str, hugetlb: bool) -> Report {
    let base = if hugetlb {
        MigrationOptions { hugetlb: true, dirty_rate: 400, ..options(64 * MIB) }
    } else {
        MigrationOptions { dirty_rate: 20_000, ..options(64 * MIB) }
    };
    let r = migrate(MigrationOptions { chaos: chaos(events), hooks: hold_bitmap(300), ..base }).await;
    assert_eq!(r.chaos.len(), events.split(',').count(), "every event fired: {:?}", r.chaos);
    r
}

/// A source agent killed and started again: the VMM hands its memory to the
/// new one, the target follows the new incarnation, and every byte arrives.
fn assert_recovered_from_a_source_restart(r: &Report) {
    assert_every_byte_verified(r);
    assert_eq!(r.handoffs["source"], 2, "the source VMM handed its memory over again");
    assert_eq!(r.source_restarts, 1, "the target agent saw the new source incarnation");
    assert!(r.source_reconnects >= 1, "the target agent reconnected");
}

/// Certificates rotated under a running migration (new certificates and
/// keys from the same CA, then SIGHUP, as a cert-manager renewal and a
/// sidecar's reload do): both agents reload them, the connections under
/// way go on, and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_during_a_migration_are_reloaded_and_every_byte_arrives() {
    let logs = tempfile::tempdir().expect("a directory for the logs");
    let events = "rotate-certificates@precopy,rotate-certificates@postcopy";
    let opts = MigrationOptions { log_dir: Some(logs.path().to_owned()), ..options(64 * MIB) };
    let r = migrate(MigrationOptions { chaos: chaos(events), hooks: hold_bitmap(300), ..opts }).await;
    assert_eq!(r.transport, "mutual TLS");
    assert_eq!(r.chaos.len(), 2, "both rotations fired: {:?}", r.chaos);
    assert_every_byte_verified(&r);
    // One reload per rotation on the source (its server side), two on the
    // target (its server side, and its client side towards the source).
    for (agent, reloads) in [("source-agent", 2), ("target-agent", 4)] {
        let log = std::fs::read_to_string(logs.path().join(format!("{agent}.log"))).expect("the agent's log");
        let seen = log.matches("TLS certificates reloaded").count();
        assert!(seen >= reloads, "{agent} reloaded {seen} times, not {reloads}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_agent_killed_during_precopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-source-agent@precopy", false).await;
    assert_recovered_from_a_source_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_agent_killed_at_switchover_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-source-agent@switchover", false).await;
    assert_recovered_from_a_source_restart(&r);
    assert_eq!(r.chaos[0].target_phase, "postcopy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_agent_killed_during_postcopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-source-agent@postcopy", false).await;
    assert_recovered_from_a_source_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_a_source_agent_killed_during_postcopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-source-agent@postcopy", true).await;
    assert_eq!(r.page_size, 2 * MIB);
    assert_recovered_from_a_source_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_source_agent_makes_vcpus_wait_and_the_migration_completes() {
    let r = migrate_with(
        "stop-source-agent:300@precopy,stop-source-agent:300@switchover,stop-source-agent:500@postcopy",
        false,
    )
    .await;
    assert_every_byte_verified(&r);
    assert_eq!(r.source_restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_a_stopped_source_agent_makes_vcpus_wait_and_the_migration_completes() {
    let r = migrate_with("stop-source-agent:500@postcopy", true).await;
    assert_every_byte_verified(&r);
}

/// A target agent killed and started again: the target VMM hands its
/// memory, uffd and pagemap to the new one with the old one's checkpoint;
/// the new agent rebuilds the page states and every byte arrives.
fn assert_recovered_from_a_target_restart(r: &Report) {
    assert_every_byte_verified(r);
    assert_eq!(r.handoffs["target"], 2, "the target VMM handed its memory over again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_killed_during_precopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-target-agent@precopy", false).await;
    assert_recovered_from_a_target_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_killed_at_switchover_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-target-agent@switchover", false).await;
    assert_recovered_from_a_target_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_killed_during_postcopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-target-agent@postcopy", false).await;
    assert_recovered_from_a_target_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugetlbfs_a_target_agent_killed_during_postcopy_is_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-target-agent@postcopy", true).await;
    assert_recovered_from_a_target_restart(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_agents_killed_at_switchover_are_replaced_and_the_migration_completes() {
    let r = migrate_with("kill-target-agent@switchover,kill-source-agent@switchover", false).await;
    assert_recovered_from_a_target_restart(&r);
    assert_eq!(r.handoffs["source"], 2);
}

/// The hostile case: the source agent dies and an agent serving another
/// VM's memory (same VM name, same layout) takes its address. The target
/// must install nothing from it, and fail once the source has been
/// unreachable for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_source_agent_is_refused_and_nothing_it_sends_is_installed() {
    let r = source_lost_during_postcopy("impostor-source-agent@postcopy", "not this migration's source").await;
    assert!(r.source_replies_refused > 0, "the impostor's replies were refused");
}

/// A migration in which the source is lost after the switchover (`event`),
/// while the final bitmap is still to come: it must fail within its
/// deadline, saying `reason`, with a frozen guest that saw no wrong page.
/// Every page that guest can see is compared (how many depends on when the
/// event came); a wrong page installed would be among them.
async fn source_lost_during_postcopy(event: &str, reason: &str) -> Report {
    let r = migrate(MigrationOptions {
        chaos: chaos(event),
        source_unreachable_timeout: Some(Duration::from_secs(3)),
        dirty_rate: 20_000,
        hooks: hold_bitmap(2_000),
        ..options(64 * MIB)
    })
    .await;
    let failure = r.failure.as_deref().expect("the migration must fail");
    assert!(failure.contains(reason), "{failure}");
    assert!(failure.contains("The guest is frozen"), "{failure}");
    assert_eq!(r.phase, "failed");
    assert_eq!(r.target_health, "NOT_SERVING");
    assert_eq!(r.target_agent_exit_code, Some(1));
    assert_eq!(r.mismatched_pages, 0, "a wrong page reached the guest: {:?}", r.first_mismatches);
    r
}

/// Switchover declared while the source VM still runs: nothing read from
/// the running VM may be installed; the target fails after its pause
/// deadline and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_before_the_pause_installs_nothing_and_fails_clearly() {
    let r = migrate(MigrationOptions {
        chaos: chaos("switchover-before-pause@switchover"),
        pause_timeout: Some(Duration::from_secs(2)),
        dirty_rate: 20_000,
        ..options(64 * MIB)
    })
    .await;
    let failure = r.failure.as_deref().expect("the migration must fail");
    assert!(failure.contains("the source VM has not been paused"), "{failure}");
    assert_eq!(r.phase, "failed");
    assert_eq!(r.pages_by_state.get("installed").copied(), Some(0), "no page may be installed: {:?}", r.pages_by_state);
    assert_eq!(r.verified_pages, 0, "the frozen guest can see no page");
    assert_eq!(r.pages_fetched_on_demand + r.pages_fetched_background + r.pages_installed_bulk, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_vmm_killed_after_the_pause_leaves_its_memory_to_its_agent_and_the_migration_completes() {
    let r = migrate_with("kill-source-vmm@postcopy", false).await;
    assert_every_byte_verified(&r);
}

/// The source VMM and its agent both gone: the only copy of the stale pages
/// is lost. The target must say so within its deadline and freeze the
/// guest, which saw no wrong page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_source_side_killed_fails_within_the_deadline_and_freezes_the_guest() {
    source_lost_during_postcopy("kill-source-side@postcopy", "unreachable").await;
}

/// A failure before switchover still gives a report saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_during_precopy_fails_the_migration_before_anything_is_installed() {
    let r = migrate(MigrationOptions {
        chaos: chaos("impostor-source-agent@precopy"),
        source_unreachable_timeout: Some(Duration::from_secs(2)),
        ..options(64 * MIB)
    })
    .await;
    let failure = r.failure.as_deref().expect("the migration must fail");
    assert!(failure.contains("not this migration's source"), "{failure}");
    assert!(failure.contains("Nothing was installed"), "{failure}");
    assert_eq!(r.phase, "failed");
    assert_eq!(r.pages_by_state.get("installed").copied(), Some(0));
}
