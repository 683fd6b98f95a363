//! QEMU's own post-copy of the same guest, for comparison with the agents
//! (`pageserver-bench`'s `qemu_native_*` rows): no shim and no agents; the
//! guest's RAM is anonymous memory (`memory-backend-ram`) that QEMU moves
//! over its migration stream. Pre-copy makes one pass over the RAM (as the
//! agents' round 0 does), then `migrate-start-postcopy` switches over, and
//! the target QEMU fetches the rest on its own faults (`postcopy-ram`),
//! measuring how long its vCPUs waited (`postcopy-blocktime`). The guest's
//! checker's verdict on the target is reported beside QEMU's figures. (Seen
//! here with Debian's QEMU 7.2 under TCG: in some runs the guest read wrong
//! memory after QEMU's own post-copy, millions of bad words, or printed
//! nothing more; through the agents it never did.)

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::qmp;
use super::guest::{GuestImage, GuestVerdict, checker_lines, qemu_installed, read_log, wait_generations};
use super::qmp::{Qmp, QmpError};
use super::{QemuError, QemuOptions, Qemus, free_port};
use crate::process::{Binaries, ChildProcess, WorkDir};
use crate::progress::Progress;

/// What QEMU reported of its own post-copy migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NativeReport {
    /// `query-migrate` on the source: how long the VM was stopped, ms.
    pub downtime_ms: f64,
    /// `query-migrate` on the target: `postcopy-blocktime`, the time its
    /// vCPUs waited on pages after the switchover, ms.
    pub blocktime_ms: f64,
    /// `query-migrate` on the source: `total-time`, s.
    pub total_s: f64,
    pub guest: GuestVerdict,
}

/// How long the target guest's checker gets to print its generations after
/// QEMU's own post-copy (a guest that read wrong memory may print nothing).
const CHECKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often pre-copy's progress is polled before the switch to post-copy.
const PRECOPY_POLL: Duration = Duration::from_millis(20);

/// Migrates the QEMU guest of `opts` with QEMU's own post-copy.
pub async fn run_native_postcopy(opts: &QemuOptions) -> Result<NativeReport, QemuError> {
    crate::leftovers::clean_up();
    let binaries = Binaries::locate()?;
    if !qemu_installed() {
        return Err(QemuError::QemuNotInstalled);
    }
    let image = GuestImage::locate()?;
    let work = WorkDir::create().map_err(QemuError::WorkDir)?;
    let q =
        Qemus { opts, work: work.path(), binaries: &binaries, image, progress: Progress::start(opts.quiet), tls: None };
    let mut children = Vec::new();
    let result = migrate_natively(&q, &mut children).await;
    for child in children.iter_mut().rev() {
        child.shut_down(None, Duration::ZERO).await;
    }
    if result.is_err() {
        q.print_failure(&children);
    }
    result
}

async fn migrate_natively(q: &Qemus<'_>, children: &mut Vec<ChildProcess>) -> Result<NativeReport, QemuError> {
    let t = q.opts.timeout;
    children.push(q.spawn_native_qemu("source")?);
    let mut source = Qmp::connect(&q.qmp_socket("source").into(), None, t).await.map_err(qmp("source"))?;
    wait_generations("source", &q.serial_log("source"), 1, t).await?;
    q.progress.say("source QEMU booted (QEMU's own post-copy, no agents)");
    children.push(q.spawn_native_qemu("target")?);
    let mut target = Qmp::connect(&q.qmp_socket("target").into(), None, t).await.map_err(qmp("target"))?;
    source.set_capabilities(&[("postcopy-ram", true)]).await.map_err(qmp("source"))?;
    target.set_capabilities(&[("postcopy-ram", true), ("postcopy-blocktime", true)]).await.map_err(qmp("target"))?;
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    target.execute("migrate-incoming", json!({ "uri": uri })).await.map_err(qmp("target"))?;
    source.execute("migrate", json!({ "uri": uri })).await.map_err(qmp("source"))?;
    wait_first_pass(&mut source, t).await.map_err(qmp("source"))?;
    source.execute("migrate-start-postcopy", json!({})).await.map_err(qmp("source"))?;
    source.wait_migration_status("completed", t).await.map_err(qmp("source"))?;
    let info = source.execute("query-migrate", json!({})).await.map_err(qmp("source"))?;
    let target_info = target.execute("query-migrate", json!({})).await.map_err(qmp("target"))?;
    let number = |value: &Value, key: &str| value.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let report = NativeReport {
        downtime_ms: number(&info, "downtime"),
        blocktime_ms: number(&target_info, "postcopy-blocktime"),
        total_s: number(&info, "total-time") / 1e3,
        guest: GuestVerdict::default(),
    };
    q.progress.say(format!(
        "QEMU's post-copy: downtime {:.1} ms, target blocktime {:.1} ms, total {:.2} s",
        report.downtime_ms, report.blocktime_ms, report.total_s
    ));
    // The figures stand whatever the guest says next; its verdict is
    // reported beside them (a guest that prints nothing more, e.g. one that
    // crashed on wrong memory, has 0 generations).
    let wanted = q.opts.generations_after_switchover;
    let checker_timeout = t.min(CHECKER_TIMEOUT);
    let lines = match wait_generations("target", &q.serial_log("target"), wanted, checker_timeout).await {
        Ok(lines) => lines,
        Err(QemuError::CheckerTimeout { .. }) => checker_lines(&read_log(&q.serial_log("target"))),
        Err(e) => return Err(e),
    };
    let guest = GuestVerdict::of(&lines);
    if guest.bad_words > 0 || guest.generations_after_switchover < wanted {
        q.progress.say(format!(
            "after QEMU's own post-copy the target guest printed {} generations with {} bad words",
            guest.generations_after_switchover, guest.bad_words
        ));
    }
    Ok(NativeReport { guest, ..report })
}

/// Waits until pre-copy has been through the whole RAM once (QEMU's second
/// dirty-bitmap sync starts the second pass).
async fn wait_first_pass(source: &mut Qmp, timeout: Duration) -> Result<(), QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = source.execute("query-migrate", json!({})).await?;
        let syncs = info.get("ram").and_then(|ram| ram.get("dirty-sync-count")).and_then(Value::as_u64);
        if syncs.is_some_and(|n| n >= 2) {
            return Ok(());
        }
        let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
        if status == "failed" || status == "cancelled" || status == "completed" {
            return Err(QmpError::Command { command: "migrate (waiting for the first pass)".into(), error: info });
        }
        if Instant::now() >= deadline {
            return Err(QmpError::Timeout("pre-copy's first pass over the RAM".into()));
        }
        tokio::time::sleep(PRECOPY_POLL).await;
    }
}
