//! The dashboards against a real Prometheus (Debian's 2.42): it scrapes both
//! agents of a demo migration on 127.0.0.1 and loads the alert rules; then
//! every panel query of every dashboard, with its variables substituted, must
//! return data, evaluated at a moment when both agents were still up.
//!
//! Needs root, `prometheus` and `python3` (`scripts/setup` installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pageserver_demo::{MigrationOptions, run_migration};

const VM: &str = "prom-vm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A Prometheus server on 127.0.0.1, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(source_metrics: &str, target_metrics: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pageserver-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let rules = repo().join("dashboards/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 200ms\n  evaluation_interval: 1s\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: pageserver-source\n    static_configs: [{{targets: [\"{source_metrics}\"]}}]\n  - job_name: pageserver-target\n    static_configs: [{{targets: [\"{target_metrics}\"]}}]\n",
            rules = rules.display().to_string()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("start prometheus (apt-get install prometheus; scripts/setup does it)");
        let prom = Self { child, addr, _dir: TempDir(dir) };
        // Ready, and the scrape targets in place (Prometheus applies
        // discovered targets every few seconds), so that no scrape of the
        // short migration is lost.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let targets = http_get(&prom.addr, "/api/v1/targets").map(|(_, body)| body).unwrap_or_default();
            if targets.matches("\"scrapeUrl\"").count() == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "Prometheus did not set up its scrape targets: {targets}");
            std::thread::sleep(Duration::from_millis(100));
        }
        prom
    }

    /// An instant query at `time` (unix seconds); the JSON result list.
    fn query(&self, query: &str, time: f64) -> serde_json::Value {
        let path = format!("/api/v1/query?query={}&time={time:.3}", urlencode(query));
        let (status, body) = http_get(&self.addr, &path).expect("query Prometheus");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(status, 200, "query {query:?} failed: {body}");
        json["data"]["result"].clone()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal HTTP/1.0 GET: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

fn panel_queries(dashboard: &str) -> Vec<String> {
    let out = Command::new("python3")
        .arg(repo().join("dashboards/panel_queries.py"))
        .arg(repo().join("dashboards").join(dashboard))
        .arg(VM)
        .output()
        .expect("run dashboards/panel_queries.py");
    assert!(out.status.success(), "panel_queries.py failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    let (source_metrics, target_metrics) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let prometheus = Prometheus::start(&source_metrics, &target_metrics);
    let opts = MigrationOptions {
        memory_bytes: 64 << 20,
        quiet: true,
        run_ms: 2000,
        vm_name: VM.to_owned(),
        metrics_listen: (source_metrics, target_metrics),
        ..MigrationOptions::default()
    };
    let report = run_migration(&opts).await.unwrap_or_else(|e| panic!("migration failed: {e}"));
    // The agents stop when run_migration returns: ask about a moment just
    // before, when Prometheus had scraped them a few times in the phase
    // "complete" (staleness markers come only after they are gone).
    let at = unix_now() - 0.5;
    assert_eq!(report.mismatched_pages, 0);

    let up = prometheus.query("up", at);
    assert_eq!(up.as_array().map(Vec::len), Some(2), "both agents scraped: {up}");
    let mut empty = Vec::new();
    let mut checked = 0;
    for dashboard in ["pageserver-target.json", "pageserver-source.json"] {
        for query in panel_queries(dashboard) {
            checked += 1;
            let result = prometheus.query(&query, at);
            if result.as_array().is_none_or(Vec::is_empty) {
                empty.push(format!("{dashboard}: {query}"));
            }
        }
    }
    assert!(checked >= 20, "only {checked} panel queries found");
    assert!(empty.is_empty(), "panel queries with no data:\n{}", empty.join("\n"));
    // The alert rules loaded and evaluate without error.
    let (status, rules) = http_get(&prometheus.addr, "/api/v1/rules").expect("rules");
    assert_eq!(status, 200);
    assert!(rules.contains("PageserverPostcopyStuck") && !rules.contains("\"health\":\"err\""), "{rules}");
}
