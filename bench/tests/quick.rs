//! `pageserver-bench --quick` runs every section and writes every row it
//! measures (no speed is asserted: benchmarks are not timed tests). Needs
//! root (huge pages, userfaultfd) and the workspace's binaries, as the
//! demo's tests do.

use std::process::{Command, Stdio};

use pageserver_bench::report::ROWS;

#[test]
fn a_quick_run_writes_every_row_it_measures() {
    let json = tempfile::NamedTempFile::new().expect("a temporary file");
    let plot = tempfile::NamedTempFile::new().expect("a temporary file");
    let output = Command::new(env!("CARGO_BIN_EXE_pageserver-bench"))
        .args(["--quick", "--report-json"])
        .arg(json.path())
        .arg("--plot")
        .arg(plot.path())
        .output()
        .expect("run pageserver-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "pageserver-bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).expect("the report")).expect("JSON");
    assert_eq!(report["quick"], true);
    for row in ROWS {
        let value = &report[row.key];
        assert!(value.as_f64().is_some_and(f64::is_finite), "{}: {value} ({})", row.key, row.what);
        assert!(stdout.contains(row.key), "the table lacks {}", row.key);
    }
    // The plot: a curve for the floor's 4 KiB and 2 MiB round trips, the
    // minimal handler, and the agent's fresh, stale and stale 2 MiB faults.
    let svg = std::fs::read_to_string(plot.path()).expect("the plot");
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"), "{svg}");
    assert_eq!(svg.matches("<path").count(), 6, "{svg}");
}

/// `--two-hosts`: the floor's two processes talk across a veth link between
/// two network namespaces the bench makes and removes (rate-limited here,
/// so the bulk figure must stay under the limit: on loopback it is tens of
/// Gbit/s). The migrations take the same link through the demo's own
/// `--two-hosts`, tested by the demo's tests.
#[test]
fn two_hosts_runs_the_floor_across_a_rate_limited_link() {
    let json = tempfile::NamedTempFile::new().expect("a temporary file");
    let bench = Command::new(env!("CARGO_BIN_EXE_pageserver-bench"))
        .args(["--quick", "--only", "floor", "--two-hosts", "--link-rate-gbit", "2", "--report-json"])
        .arg(json.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pageserver-bench");
    let pid = bench.id();
    let output = bench.wait_with_output().expect("pageserver-bench's output");
    assert!(output.status.success(), "pageserver-bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).expect("the report")).expect("JSON");
    let notes = report["notes"].to_string();
    assert!(notes.contains("two hosts") && notes.contains("2 Gbit/s"), "{notes}");
    let bulk = report["floor_bulk_gib_s"].as_f64().expect("floor_bulk_gib_s");
    // 2 Gbit/s is 0.23 GiB/s (loopback moves 3 GiB/s and more here); the
    // token bucket lets a small burst through.
    assert!(bulk > 0.0 && bulk < 0.35, "a 2 Gbit/s link moved {bulk} GiB/s");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("psdemo-{pid}-")))
        .collect();
    assert!(left.is_empty(), "the bench left its namespaces behind: {left:?}");
}
