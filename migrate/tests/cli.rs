//! The `pageserver-migrate` binary without QEMU: what `--dry-run` prints,
//! the flags it refuses, and a failure before anything was asked of the
//! VM (its QMP socket missing), which must leave the VM untouched, say so,
//! and still write the report. A whole migration of a QEMU VM with it is
//! in `demo/tests/qemu.rs` (the demo's QEMU mode runs this binary).

use std::path::Path;
use std::process::{Command, Output};

fn migrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pageserver-migrate"))
        .args(args)
        .env_remove("PAGESERVER_TLS_CERT")
        .env_remove("PAGESERVER_TLS_KEY")
        .env_remove("PAGESERVER_TLS_CA")
        .env_remove("PAGESERVER_PLAINTEXT")
        .output()
        .expect("pageserver-migrate runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The flags of a plaintext migration between `dir`'s QMP sockets.
fn plaintext_args(dir: &Path) -> Vec<String> {
    vec![
        "--source-agent=http://127.0.0.1:1".into(),
        "--target-agent=http://127.0.0.1:2".into(),
        format!("--source-qmp={}", dir.join("source.qmp").display()),
        format!("--target-qmp={}", dir.join("target.qmp").display()),
        "--migration-uri=tcp:127.0.0.1:4444".into(),
        "--plaintext".into(),
    ]
}

#[test]
fn dry_run_prints_every_step_in_order_and_contacts_nothing() {
    // Nothing listens at these addresses and the sockets do not exist: a
    // dry run that tried to reach them would fail.
    let out = migrate(&[
        "--source-agent=https://source.pageserver.example:50051",
        "--target-agent=https://target.pageserver.example:50051",
        "--source-qmp=/nonexistent/source.qmp",
        "--target-qmp=/nonexistent/target.qmp",
        "--migration-uri=tcp:192.0.2.7:4444",
        "--tls-cert=/nonexistent/orchestrator.crt",
        "--tls-key=/nonexistent/orchestrator.key",
        "--tls-ca=/nonexistent/ca.crt",
        "--dry-run",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    let steps = [
        ("check-vmms", "/nonexistent/source.qmp"),
        ("check-agents", "https://target.pageserver.example:50051"),
        ("start-incoming", "migrate-incoming tcp:192.0.2.7:4444"),
        ("await-precopy", "pre-copy converged"),
        ("start-migrate", "pause-before-switchover; migrate tcp:192.0.2.7:4444"),
        ("await-pre-switchover", "pre-switchover"),
        ("pause-source", "SetPaused(true) on the source agent https://source.pageserver.example:50051"),
        ("switchover", "Switchover on the target agent"),
        ("continue", "migrate-continue"),
        ("await-postcopy", "post-copy complete"),
    ];
    let mut from = 0;
    for (number, (step, detail)) in steps.iter().enumerate() {
        let line = format!("{:2}. {step} ", number + 1);
        let at = stdout[from..].find(&line).unwrap_or_else(|| panic!("no {line:?} after offset {from} in:\n{stdout}"));
        let rest = &stdout[from + at..];
        let end = rest.find('\n').unwrap_or(rest.len());
        assert!(rest[..end].contains(detail), "step {step} does not mention {detail:?}: {}", &rest[..end]);
        from += at + end;
    }
    assert!(stdout.contains("mutual TLS"), "{stdout}");
    assert!(stdout.contains("the VM runs on the source again"), "{stdout}");
}

#[test]
fn urls_must_match_the_transport() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = plaintext_args(dir.path());
    args.retain(|arg| arg != "--plaintext");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let flags = |agents: &str, uri: &str| {
        let mut flags = vec![
            format!("--source-agent={agents}://a:1"),
            format!("--target-agent={agents}://b:2"),
            "--source-qmp=/s".to_owned(),
            "--target-qmp=/t".to_owned(),
            format!("--migration-uri={uri}"),
        ];
        flags.extend((agents == "http").then(|| "--plaintext".to_owned()));
        flags
    };
    let cases = [
        (args.iter().map(|arg| arg.to_string()).collect(), "http (no TLS) needs --plaintext"),
        (flags("https", "tcp:h:1"), "https needs --tls-cert"),
        (flags("http", "unix:/tmp/x"), "expected tcp:HOST:PORT"),
    ];
    for (flags, refusal) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let out = migrate(&flags);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(refusal), "{flags:?}: {}", text(&out.stderr));
    }
}

#[test]
fn a_missing_qmp_socket_fails_the_first_step_and_leaves_the_vm_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let mut args = plaintext_args(dir.path());
    args.push("--timeout=1s".into());
    args.push(format!("--report-json={}", report.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = migrate(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Error: step check-vmms failed: the source QEMU's QMP"), "{stderr}");
    assert!(stderr.contains("source.qmp"), "{stderr}");
    assert!(stderr.contains("VM: the VM runs on the source, untouched"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the report is written")).expect("JSON");
    assert_eq!(report["failed_step"], "check-vmms", "{report}");
    assert_eq!(report["vm_state"], "the VM runs on the source, untouched", "{report}");
    assert!(report["failure"].as_str().is_some_and(|f| f.contains("QMP")), "{report}");
}
