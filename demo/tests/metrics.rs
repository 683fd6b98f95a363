//! Both agents' Prometheus metrics after a real migration (real processes,
//! real HTTP on 127.0.0.1): the final `/metrics` text of each agent, saved by
//! `metrics_dump`, passes `promtool check metrics`, every series carries the
//! VM's name, the fault-latency histogram resolves microseconds, and the
//! counters agree with the target agent's own final status.
//!
//! Needs root (userfaultfd) and `promtool` (Debian's `prometheus` package;
//! `scripts/setup` installs it).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use pageserver_demo::process::WorkDir;
use pageserver_demo::{MigrationOptions, run_migration};

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an exposition text (our label values hold no `,` or `"`).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value = value.parse().unwrap_or_else(|e| panic!("bad value in {line}: {e}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {line}"));
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample { name: name.to_owned(), labels, value }
        })
        .collect()
}

/// Sum of the samples named `name` whose labels include every `(key, value)` of `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn promtool_check(path: &Path) {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running promtool (scripts/setup installs Debian's prometheus package): {e}"));
    child.stdin.take().expect("stdin").write_all(&text).expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics < {}: {}\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_metrics_of_both_agents_are_valid_and_agree_with_the_migration() {
    let dump = WorkDir::create().expect("dump directory");
    let opts = MigrationOptions {
        memory_bytes: 64 << 20,
        quiet: true,
        run_ms: 300,
        vm_name: "metrics-vm".to_owned(),
        metrics_dump: Some(dump.path().join("prom")),
        ..MigrationOptions::default()
    };
    let report = run_migration(&opts).await.unwrap_or_else(|e| panic!("migration failed: {e}"));
    assert_eq!(report.mismatched_pages, 0, "{:?}", report.first_mismatches);
    assert!(report.source_metrics_addr.starts_with("127.0.0.1:"), "{}", report.source_metrics_addr);
    assert!(report.target_metrics_addr.starts_with("127.0.0.1:"), "{}", report.target_metrics_addr);

    let source_path = dump.path().join("prom/source.prom");
    let target_path = dump.path().join("prom/target.prom");
    let source_text = std::fs::read_to_string(&source_path).expect("source.prom");
    let target_text = std::fs::read_to_string(&target_path).expect("target.prom");
    promtool_check(&source_path);
    promtool_check(&target_path);
    let source = samples(&source_text);
    let target = samples(&target_text);

    for (agent, samples) in [("source", &source), ("target", &target)] {
        for s in samples {
            assert_eq!(s.labels.get("vm").map(String::as_str), Some("metrics-vm"), "{agent}: {s:?}");
        }
        let info = [("agent", agent), ("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(sum(samples, "pageserver_build_info", &info), 1.0, "{agent} build info");
    }

    // Target: a microsecond-resolving fault histogram that saw the faults.
    let fault_buckets: Vec<&Sample> =
        target.iter().filter(|s| s.name == "pageserver_target_fault_latency_seconds_bucket").collect();
    assert!(
        fault_buckets.iter().any(|s| s.labels["le"] != "+Inf" && s.labels["le"].parse::<f64>().expect("le") < 1e-5),
        "no bucket below 10 µs:\n{target_text}"
    );
    let observed = sum(&target, "pageserver_target_fault_latency_seconds_count", &[]);
    assert!(observed > 0.0, "no fault latency observed:\n{target_text}");
    let fresh = [("resolution", "fresh"), ("state_known", "true")];
    assert_eq!(sum(&target, "pageserver_target_fault_latency_seconds_count", &fresh), report.faults_fresh as f64);
    assert_eq!(sum(&target, "pageserver_target_phase", &[("phase", "complete")]), 1.0, "{target_text}");
    assert_eq!(sum(&target, "pageserver_target_phase", &[]), 1.0, "exactly one phase is current");
    assert_eq!(sum(&target, "pageserver_target_faults_total", &[]), report.faults_total as f64);
    assert_eq!(
        sum(&target, "pageserver_target_faults_total", &[("resolution", "fetched")]),
        report.faults_fetched as f64
    );
    let demand = sum(&target, "pageserver_target_pages_fetched_total", &[("origin", "demand")]);
    let background = sum(&target, "pageserver_target_pages_fetched_total", &[("origin", "background")]);
    assert_eq!((demand, background), (report.pages_fetched_on_demand as f64, report.pages_fetched_background as f64));
    assert_eq!(sum(&target, "pageserver_target_bytes_received_total", &[]), report.bytes_received as f64);
    assert_eq!(sum(&target, "pageserver_target_precopy_rounds_total", &[]), report.precopy_rounds as f64);
    assert_eq!(sum(&target, "pageserver_target_pages", &[]), report.total_pages as f64, "every page has one state");
    assert_eq!(sum(&target, "pageserver_target_pages", &[("state", "stale")]), 0.0);
    assert_eq!(sum(&target, "pageserver_target_faults_waiting", &[]), 0.0);
    assert_eq!(sum(&target, "pageserver_target_source_up", &[]), 1.0);
    assert_eq!(
        sum(&target, "pageserver_target_stale_pages_at_switchover", &[]),
        report.stale_pages_at_switchover as f64
    );

    // Source: per-RPC request latency, GetPages included, and what it served.
    let get_pages = [("rpc", "GetPages")];
    assert!(
        source.iter().any(|s| s.name == "pageserver_source_request_duration_seconds_bucket"
            && s.labels.get("rpc").map(String::as_str) == Some("GetPages")),
        "no GetPages latency buckets:\n{source_text}"
    );
    assert!(sum(&source, "pageserver_source_request_duration_seconds_count", &get_pages) > 0.0);
    let served = sum(&source, "pageserver_source_pages_served_total", &[]);
    assert!(
        served >= (report.pages_sent_precopy + report.pages_fetched_on_demand + report.pages_fetched_background) as f64,
        "the source served {served} pages:\n{source_text}"
    );
    assert!(sum(&source, "pageserver_source_dirty_scan_duration_seconds_count", &[]) >= report.precopy_rounds as f64);
    assert_eq!(sum(&source, "pageserver_source_paused", &[]), 1.0, "the source VM ends paused");
    assert!(sum(&source, "pageserver_source_epoch", &[]) > 1.0);
}
