//! `pageserver-bench --quick` runs every section and writes every row it
//! measures (no speed is asserted: benchmarks are not timed tests). Needs
//! root (huge pages, userfaultfd) and the workspace's binaries, as the
//! demo's tests do.

use std::process::Command;

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
