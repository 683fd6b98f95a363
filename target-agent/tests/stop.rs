//! Stopping a target agent (SIGTERM) in each phase, with real processes:
//! the `target-agent` binary, a `source-agent` binary serving a memory
//! file, and this test process as the target VMM, all on 127.0.0.1. See
//! `target_agent::shutdown` for what a stop means in each phase.
//!
//! The source agent is stopped (SIGSTOP) to hold the migration where a test
//! wants it: a target agent cannot move past a phase that needs its source.

mod support;

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{MigrationPhase, SwitchoverRequest};
use rustix::process::Signal;
use support::{Agent, Migration, Scratch, TARGET_AGENT, join_reads, page_content, status, wait_for_status};

/// A migration that converged, its source then stopped, and `Switchover`
/// called: post-copy, with the final bitmap not in.
async fn postcopy_with_the_source_stopped(name: &str, pages: u64, grace: &str) -> Migration {
    let grace = format!("--shutdown-grace={grace}");
    let m = Migration::start(name, pages, &[&grace, "--source-unreachable-timeout=10m"]).await;
    wait_for_status(&m.target, "pre-copy converged", |s| s.phase() == MigrationPhase::PrecopyConverged).await;
    m.source.stop();
    let mut client = MigrationTargetClient::connect(m.target.url()).await.expect("connect");
    let reply = client.switchover(SwitchoverRequest {}).await.expect("Switchover").into_inner();
    assert_eq!(reply.phase(), MigrationPhase::Postcopy);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_before_any_handoff_exits_0() {
    let dir = Scratch::new("idle");
    let socket = dir.join("target.sock").display().to_string();
    // Nothing listens on the source's address: an agent that never got work
    // never calls it.
    let mut agent = Agent::start(
        "target-agent",
        std::path::Path::new(TARGET_AGENT),
        &["--source", "http://127.0.0.1:9", "--handoff-socket", &socket],
        &dir,
    );
    assert_eq!(status(&agent).await.phase(), MigrationPhase::WaitingForHandoff);
    agent.signal(Signal::TERM);
    let exit = agent.wait();
    assert_eq!(exit.code(), Some(0), "{}", agent.stderr());
    assert!(agent.stderr().contains("stopped before any VMM handed its memory over"), "{}", agent.stderr());
    assert!(!std::path::Path::new(&socket).exists(), "a clean exit removes the hand-off socket");
}

/// A SIGTERM sent as soon as the agent says it is listening is handled (the
/// signals are watched before that line), not the signal's default action
/// killing it. Several agents, to give a regression its chance.
#[test]
fn sigterm_right_after_the_listening_line_is_handled() {
    let dir = Scratch::new("early-sigterm");
    for attempt in 0..5 {
        let socket = dir.join(&format!("target-{attempt}.sock")).display().to_string();
        let args = ["--source", "http://127.0.0.1:9", "--handoff-socket", socket.as_str()];
        let mut agent = Agent::start("target-agent", std::path::Path::new(TARGET_AGENT), &args, &dir);
        agent.signal(Signal::TERM);
        let exit = agent.wait();
        assert_eq!(exit.code(), Some(0), "attempt {attempt}: {exit:?}; stderr:\n{}", agent.stderr());
    }
}

/// Stopped before the switchover, the migration is abandoned at once: the
/// source VM still runs, and nothing was installed into the target guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_precopy_abandons_the_migration_and_exits_non_zero() {
    // Large enough that the first round takes a while: the source is
    // stopped while it runs, which holds the agent in pre-copy.
    let mut m = Migration::start("precopy", 256 << 8, &["--source-unreachable-timeout=10m"]).await;
    wait_for_status(&m.target, "pre-copy", |s| s.phase() >= MigrationPhase::Precopy).await;
    m.source.stop();
    let before = status(&m.target).await;
    assert_eq!(before.phase(), MigrationPhase::Precopy, "pre-copy finished before the source was stopped");
    assert_eq!(before.pages_by_state.expect("page counts").installed, 0);

    m.target.signal(Signal::TERM);
    let exit = m.target.wait();
    let stderr = m.target.stderr();
    assert_eq!(exit.code(), Some(1), "{stderr}");
    let message = "migration abandoned in phase precopy: the source VM still runs; nothing was installed";
    assert!(stderr.contains(&format!("Error: the migration failed: {message}")), "{stderr}");
    m.source.signal(Signal::CONT);
}

/// Stopped in post-copy, the agent goes on serving the guest (a fault on a
/// page that needs the source is resolved once the source is back) and
/// exits 0 once the migration completes, handing the guest's memory back
/// to the kernel: after it has exited, every page reads as the source's,
/// holes included (they would wait for ever on a registered range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_postcopy_that_completes_within_the_grace_exits_0() {
    const PAGES: u64 = 1024;
    let mut m = postcopy_with_the_source_stopped("postcopy-completes", PAGES, "10m").await;
    m.target.signal(Signal::TERM);
    m.target.wait_for_log("stopping during post-copy");
    // A vCPU touches a page of unknown state: it needs the stopped source.
    let touched = m.vmm.read_pages(5..6);
    let during_grace = status(&m.target).await;
    assert_eq!(during_grace.phase(), MigrationPhase::Postcopy, "the status is served during the grace");
    assert!(!touched.is_finished(), "the page cannot have come from a stopped source");

    m.source.signal(Signal::CONT);
    assert_eq!(join_reads(touched, "the touched page"), vec![page_content(5)]);
    let exit = m.target.wait();
    let stderr = m.target.stderr();
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the guest's memory is the kernel's again"), "{stderr}");

    let all = join_reads(m.vmm.read_pages(0..PAGES), "every page after the agent exited");
    for (page, content) in (0..PAGES).zip(&all) {
        assert!(content == &page_content(page), "page {page} differs from the source's");
    }
    assert!(all.iter().any(|page| page.iter().all(|&b| b == 0)), "holes were read too");
}

/// Stopped in post-copy with the source unreachable, the migration cannot
/// complete: when the grace is over it fails, naming the pages that still
/// need the source, and the agent exits non-zero with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_postcopy_with_the_source_stopped_fails_after_the_grace() {
    const PAGES: u64 = 1024;
    let mut m = postcopy_with_the_source_stopped("postcopy-fails", PAGES, "1s").await;
    m.target.signal(Signal::TERM);
    let exit = m.target.wait();
    let stderr = m.target.stderr();
    assert_eq!(exit.code(), Some(1), "{stderr}");
    let reason = format!(
        "stopped during post-copy: post-copy did not complete within the 1s shutdown grace; {PAGES} pages still need \
         the source (unknown {PAGES}): pages 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, …: the guest will \
         freeze on them"
    );
    assert!(stderr.contains(&format!("migration failed: {reason}")), "the phase failed with the reason: {stderr}");
    assert!(stderr.contains(&format!("Error: the migration failed: {reason}")), "{stderr}");
    m.source.signal(Signal::CONT);
}
