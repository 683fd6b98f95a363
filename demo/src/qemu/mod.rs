//! Migrating an unmodified QEMU guest through the agents.
//!
//! Both QEMUs run Debian's stock `qemu-system-x86_64` (TCG) with guest RAM
//! in a shared file (`memory-backend-file,share=on`), the VMM shim loaded
//! with `LD_PRELOAD`, so that their RAM is handed to the agents, and
//! QEMU's own migration moving device state only (`x-ignore-shared`):
//!
//! 1. source agent, source QEMU (shim role `source`); the guest boots and
//!    its memory checker starts printing generations on the serial console;
//! 2. target agent, target QEMU (`-incoming defer`, shim role `target`);
//!    `migrate-incoming`; the target agent pre-copies until converged;
//! 3. source: `migrate` with `pause-before-switchover`; at status
//!    `pre-switchover` the source vCPUs are stopped: the source agent is told
//!    (`MigrationSource/SetPaused`), the target agent switches over (faults
//!    served from now on: QEMU reads guest pages while loading device
//!    state), then `migrate-continue`;
//! 4. the target guest runs, faulting through the target agent; its checker
//!    must print further generations with `bad=0` on the target's console.
#![forbid(unsafe_code)]

pub mod qmp;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_source_client::MigrationSourceClient;
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, SetPausedRequest, SwitchoverRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::migration::MigrationError;
use crate::process::{Binaries, ChildProcess, WorkDir};
use crate::report::Report;
use qmp::{Qmp, QmpError};

/// What a QEMU migration needs besides the agents.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub memory_mib: u64,
    pub hugetlb: bool,
    /// MiB the guest's checker keeps rewriting and checking.
    pub checker_mib: u64,
    /// Generations the target's checker must complete after switchover.
    pub generations_after_switchover: u64,
    pub quiet: bool,
    /// FAULT INJECTION: the target agent installs this many stale pages as
    /// if fresh (the guest's checker must catch it).
    pub withhold_stale_pages: u64,
    /// Start the target paused (`-S`), wait until the target agent has
    /// installed every page, compare the target's RAM file with the source's
    /// (frozen since the pause) byte for byte, then let the guest run.
    pub verify_bytes: bool,
    pub timeout: Duration,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            hugetlb: false,
            checker_mib: 48,
            generations_after_switchover: 3,
            quiet: false,
            withhold_stale_pages: 0,
            verify_bytes: false,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The guest's own verdict, from the target's serial console.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVerdict {
    /// `memcheck gen=N bad=B` lines the target printed after switchover.
    pub generations_after_switchover: u64,
    /// Sum of B over those lines.
    pub bad_words: u64,
    pub last_lines: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QemuReport {
    #[serde(flatten)]
    pub migration: Report,
    pub guest: GuestVerdict,
}

/// A hugetlbfs mount of our own inside the work directory (none may be
/// mounted on the host), unmounted when dropped.
const HUGETLBFS_DIR: &str = "hugetlbfs";

#[derive(Debug)]
struct HugetlbfsMount(PathBuf);

impl HugetlbfsMount {
    fn new(dir: PathBuf) -> Result<Self, MigrationError> {
        std::fs::create_dir_all(&dir).map_err(MigrationError::WorkDir)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "pageserver-demo"])
            .arg(&dir)
            .status()
            .map_err(MigrationError::WorkDir)?;
        if !status.success() {
            return Err(MigrationError::InvalidOptions(format!(
                "mounting hugetlbfs on {} failed (root?)",
                dir.display()
            )));
        }
        Ok(Self(dir))
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Where the guest kernel and initramfs are (built by `guest/build.sh`).
fn guest_dir() -> PathBuf {
    std::env::var_os("PAGESERVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// Installs QEMU and builds the guest image (`scripts/setup`, as root).
fn set_up_qemu_and_guest() -> Result<(), MigrationError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup");
    println!("installing QEMU and building the guest image with {}", script.display());
    let status = std::process::Command::new(&script).status().map_err(MigrationError::WorkDir)?;
    if !status.success() || !guest_dir().join("initramfs.cpio.gz").is_file() {
        return Err(MigrationError::InvalidOptions(format!(
            "{} failed: QEMU and the guest image are needed (run it as root)",
            script.display()
        )));
    }
    Ok(())
}

fn qemu_error(e: QmpError) -> MigrationError {
    MigrationError::AgentFailed(format!("QEMU: {e}"))
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> MigrationError {
    move |status| MigrationError::Rpc { call, status: Box::new(status) }
}

/// `memcheck gen=N bad=B` lines in a serial log.
pub fn checker_lines(log: &str) -> Vec<(u64, u64, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("memcheck gen=")? + "memcheck gen=".len()..];
            let (gen_, bad) = rest.split_once(" bad=")?;
            Some((gen_.trim().parse().ok()?, bad.trim().parse().ok()?, l.trim().to_owned()))
        })
        .collect()
}

fn read_log(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

struct Qemus<'a> {
    opts: &'a QemuOptions,
    work: &'a Path,
    binaries: &'a Binaries,
    shim: PathBuf,
    started: Instant,
}

impl Qemus<'_> {
    fn say(&self, msg: impl AsRef<str>) {
        if !self.opts.quiet {
            println!("[{:7.2}s] {}", self.started.elapsed().as_secs_f64(), msg.as_ref());
        }
    }

    fn ram_path(&self, role: &str) -> PathBuf {
        if self.opts.hugetlb {
            self.work.join(HUGETLBFS_DIR).join(format!("{role}.ram"))
        } else {
            self.work.join(format!("{role}.ram"))
        }
    }

    fn spawn_qemu(&self, role: &str, socket: &Path, incoming: bool) -> Result<ChildProcess, MigrationError> {
        let dir = guest_dir();
        let ram = self.ram_path(role);
        let mib = self.opts.memory_mib;
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            format!("{mib}M"),
            "-smp".into(),
            "1".into(),
            "-object".into(),
            format!("memory-backend-file,id=mem0,size={mib}M,mem-path={},share=on", ram.display()),
            "-machine".into(),
            "pc,memory-backend=mem0".into(),
            "-kernel".into(),
            // The uncompressed kernel boots (PVH) seconds faster under TCG.
            [dir.join("vmlinux"), dir.join("vmlinuz")]
                .into_iter()
                .find(|k| k.is_file())
                .unwrap_or_else(|| dir.join("vmlinuz"))
                .display()
                .to_string(),
            "-initrd".into(),
            dir.join("initramfs.cpio.gz").display().to_string(),
            "-append".into(),
            format!("console=ttyS0 quiet panic=-1 memcheck.mib={}", self.opts.checker_mib),
            "-nographic".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", self.work.join(format!("{role}-serial.log")).display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.work.join(format!("{role}.qmp")).display()),
        ];
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
            if self.opts.verify_bytes {
                args.push("-S".into());
            }
        }
        let env: [(&str, &OsStr); 5] = [
            ("LD_PRELOAD", self.shim.as_os_str()),
            ("PAGESERVER_SHIM_ROLE", OsStr::new(role)),
            ("PAGESERVER_SHIM_MEM_PATH", ram.as_os_str()),
            ("PAGESERVER_SHIM_SOCKET", socket.as_os_str()),
            ("PAGESERVER_SHIM_VM", OsStr::new("qemu-vm")),
        ];
        Ok(ChildProcess::spawn_with_env(
            &format!("qemu-{role}"),
            Path::new("qemu-system-x86_64"),
            &args,
            &env,
            self.work,
        )?)
    }

    /// Waits until the serial log at `path` holds `count` checker lines
    /// after the first `skip`; fails fast on a bad one.
    async fn wait_generations(
        &self,
        path: &Path,
        skip: usize,
        count: u64,
    ) -> Result<Vec<(u64, u64, String)>, MigrationError> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let lines = checker_lines(&read_log(path));
            let after: Vec<_> = lines.into_iter().skip(skip).collect();
            if after.len() as u64 >= count || after.iter().any(|(_, bad, _)| *bad > 0) {
                return Ok(after);
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout {
                    what: format!("{count} memory-checker generations in {}", path.display()),
                    after: self.opts.timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until the target agent has nothing left to fetch.
async fn wait_complete(
    target: &mut MigrationTargetClient<tonic::transport::Channel>,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = target.get_status(GetStatusRequest {}).await.map_err(rpc("GetStatus"))?.into_inner();
        match status.phase.as_str() {
            "complete" => return Ok(()),
            "failed" => return Err(MigrationError::AgentFailed(format!("target agent failed: {}", status.error))),
            _ if Instant::now() >= deadline => {
                return Err(MigrationError::Timeout { what: "post-copy to complete".into(), after: timeout });
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Compares two RAM files page by page (4 KiB granules); returns (pages
/// compared, pages differing, the first few differing).
fn compare_files(source: &Path, target: &Path) -> Result<(u64, u64, Vec<u64>), MigrationError> {
    use std::io::Read;
    const PAGE: usize = 4096;
    let open = |p: &Path| std::fs::File::open(p).map(|f| std::io::BufReader::with_capacity(1 << 20, f));
    let (mut a, mut b) =
        (open(source).map_err(MigrationError::WorkDir)?, open(target).map_err(MigrationError::WorkDir)?);
    let (mut pa, mut pb) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let (mut pages, mut bad, mut first) = (0u64, 0u64, Vec::new());
    loop {
        let n = a.read(&mut pa).map_err(MigrationError::WorkDir)?;
        if n == 0 {
            break;
        }
        a.read_exact(&mut pa[n..]).map_err(MigrationError::WorkDir)?;
        b.read_exact(&mut pb).map_err(MigrationError::WorkDir)?;
        if pa != pb {
            bad += 1;
            if first.len() < 16 {
                first.push(pages);
            }
        }
        pages += 1;
    }
    Ok((pages, bad, first))
}

async fn listening(child: &mut ChildProcess, timeout: Duration) -> Result<String, MigrationError> {
    let value = child.next_json("listening", Instant::now() + timeout).await?;
    value
        .get("grpc")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| MigrationError::AgentFailed(format!("unexpected first line from {}: {value}", child.name())))
}

/// Runs one QEMU migration; see the module docs.
pub async fn run_qemu_migration(opts: &QemuOptions) -> Result<QemuReport, MigrationError> {
    let _huge = if opts.hugetlb {
        Some(
            crate::hugepages::reserve(2 * opts.memory_mib.div_ceil(2) + 8)
                .map_err(|e| MigrationError::InvalidOptions(e.to_string()))?,
        )
    } else {
        None
    };
    let binaries = Binaries::locate().await?;
    let shim = binaries.vmm_shim.clone();
    let have_qemu = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file()));
    if !have_qemu || !guest_dir().join("initramfs.cpio.gz").is_file() {
        set_up_qemu_and_guest()?;
    }
    let work = WorkDir::create().map_err(MigrationError::WorkDir)?;
    let _mount = if opts.hugetlb { Some(HugetlbfsMount::new(work.path().join(HUGETLBFS_DIR))?) } else { None };
    let q = Qemus { opts, work: work.path(), binaries: &binaries, shim, started: Instant::now() };
    let mut children: Vec<ChildProcess> = Vec::new();
    let result = migrate(&q, &mut children).await;
    for child in children.iter_mut().rev() {
        child.shut_down(None, Duration::ZERO).await;
    }
    for role in ["source", "target"] {
        let _ = std::fs::remove_file(q.ram_path(role));
    }
    if result.is_err() {
        for child in &children {
            eprintln!("--- {} stderr (last lines) ---\n{}", child.name(), child.log_tail());
        }
        for role in ["source", "target"] {
            let log = q.work.join(format!("{role}-serial.log"));
            eprintln!("--- {role} serial console (last lines) ---\n{}", crate::process::tail_of_file(&log, 15));
        }
    }
    result
}

async fn migrate(q: &Qemus<'_>, children: &mut Vec<ChildProcess>) -> Result<QemuReport, MigrationError> {
    let t = q.opts.timeout;
    let work = q.work;
    // Source side.
    let source_sock = work.join("source.sock");
    let args = [
        "--listen=127.0.0.1:0".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        format!("--handoff-socket={}", source_sock.display()),
    ];
    children.push(ChildProcess::spawn("source-agent", &q.binaries.source_agent, &args, work)?);
    let source_addr = listening(children.last_mut().expect("just pushed"), t).await?;
    children.push(q.spawn_qemu("source", &source_sock, false)?);
    let mut source_qmp = Qmp::connect(&work.join("source.qmp"), t).await.map_err(qemu_error)?;
    let source_serial = work.join("source-serial.log");
    q.wait_generations(&source_serial, 0, 1).await?;
    q.say(format!("source QEMU booted; its memory checker runs (source agent on {source_addr})"));

    // Target side.
    let target_sock = work.join("target.sock");
    let mut args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        format!("--source=http://{source_addr}"),
        format!("--handoff-socket={}", target_sock.display()),
    ];
    if q.opts.withhold_stale_pages > 0 {
        args.push(format!("--fault-injection-withhold-stale-pages={}", q.opts.withhold_stale_pages));
    }
    children.push(ChildProcess::spawn("target-agent", &q.binaries.target_agent, &args, work)?);
    let target_addr = listening(children.last_mut().expect("just pushed"), t).await?;
    children.push(q.spawn_qemu("target", &target_sock, true)?);
    let mut target_qmp = Qmp::connect(&work.join("target.qmp"), t).await.map_err(qemu_error)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| MigrationError::AgentFailed(e.to_string()))?;
        l.local_addr().map_err(|e| MigrationError::AgentFailed(e.to_string()))?.port()
    };
    target_qmp.set_capabilities(&[("x-ignore-shared", true)]).await.map_err(qemu_error)?;
    target_qmp
        .execute("migrate-incoming", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .await
        .map_err(qemu_error)?;

    let mut target = MigrationTargetClient::connect(format!("http://{target_addr}"))
        .await
        .map_err(|source| MigrationError::Connect { addr: target_addr.clone(), source })?;
    let deadline = Instant::now() + t;
    loop {
        let status = target.get_status(GetStatusRequest {}).await.map_err(rpc("GetStatus"))?.into_inner();
        match status.phase.as_str() {
            "precopy-converged" => break,
            "failed" => return Err(MigrationError::AgentFailed(format!("target agent failed: {}", status.error))),
            _ if Instant::now() >= deadline => {
                return Err(MigrationError::Timeout { what: "pre-copy to converge".into(), after: t });
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    q.say("target agent pre-copied the guest's RAM");

    // Switchover.
    source_qmp
        .set_capabilities(&[("x-ignore-shared", true), ("pause-before-switchover", true)])
        .await
        .map_err(qemu_error)?;
    source_qmp.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") })).await.map_err(qemu_error)?;
    source_qmp.wait_migration_status("pre-switchover", t).await.map_err(qemu_error)?;
    let paused_at = Instant::now();
    let source_lines_at_pause = checker_lines(&read_log(&source_serial)).len();
    let mut control = MigrationSourceClient::connect(format!("http://{source_addr}"))
        .await
        .map_err(|source| MigrationError::Connect { addr: source_addr.clone(), source })?;
    control.set_paused(SetPausedRequest { paused: true }).await.map_err(rpc("SetPaused"))?;
    target.switchover(SwitchoverRequest::default()).await.map_err(rpc("Switchover"))?;
    source_qmp.execute("migrate-continue", json!({ "state": "pre-switchover" })).await.map_err(qemu_error)?;
    source_qmp.wait_migration_status("completed", t).await.map_err(qemu_error)?;
    let state = target_qmp.run_state().await.map_err(qemu_error)?;
    // QEMU gives no "first guest access" event: downtime here runs from the
    // source's pre-switchover pause to the migration's completion with the
    // target running.
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    q.say(format!(
        "switched over in {downtime_ms:.1} ms; target QEMU is {state} (source checker had printed {source_lines_at_pause} generations)"
    ));

    let mut report = Report::default();
    if q.opts.verify_bytes {
        wait_complete(&mut target, t).await?;
        let (verified, mismatched, first) = compare_files(&q.ram_path("source"), &q.ram_path("target"))?;
        report.verified_pages = verified;
        report.mismatched_pages = mismatched;
        report.first_mismatches = first;
        q.say(format!("compared the target's RAM with the source's at pause: {verified} pages, {mismatched} differ"));
        target_qmp.execute("cont", json!({})).await.map_err(qemu_error)?;
    }

    // The target guest's verdict.
    let target_serial = work.join("target-serial.log");
    let lines = q.wait_generations(&target_serial, 0, q.opts.generations_after_switchover).await?;
    let verdict = GuestVerdict {
        generations_after_switchover: lines.len() as u64,
        bad_words: lines.iter().map(|(_, bad, _)| bad).sum(),
        last_lines: lines.iter().rev().take(5).rev().map(|(_, _, l)| l.clone()).collect(),
    };
    q.say(format!(
        "target guest: {} generations checked after switchover, {} bad words",
        verdict.generations_after_switchover, verdict.bad_words
    ));
    let status = target.get_status(GetStatusRequest {}).await.map_err(rpc("GetStatus"))?.into_inner();
    report.apply_status(&status);
    report.page_size = status.page_size;
    report.total_pages = status.total_pages;
    report.guest_bytes = q.opts.memory_mib << 20;
    report.downtime_ms = downtime_ms;
    report.hugetlb = q.opts.hugetlb;
    report.total_seconds = q.started.elapsed().as_secs_f64();
    Ok(QemuReport { migration: report, guest: verdict })
}

impl std::fmt::Display for QemuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.migration;
        writeln!(f, "guest:      {} MiB, {} pages of {} bytes", m.guest_bytes >> 20, m.total_pages, m.page_size)?;
        writeln!(f, "pre-copy:   {} rounds, dirty pages per round {:?}", m.precopy_rounds, m.dirty_pages_per_round)?;
        writeln!(f, "downtime:   {:.1} ms (source paused → migration completed, target running)", m.downtime_ms)?;
        writeln!(
            f,
            "post-copy:  {} stale pages at switchover; faults {} (fresh {}, fetched {}, missing {}); fetched on demand {}, in the background {}; installed in bulk {}; fetched twice {}",
            m.stale_pages_at_switchover,
            m.faults_total,
            m.faults_fresh,
            m.faults_fetched,
            m.faults_missing,
            m.pages_fetched_on_demand,
            m.pages_fetched_background,
            m.pages_installed_bulk,
            m.pages_fetched_twice
        )?;
        for (kind, l) in &m.fault_latency_us {
            writeln!(f, "  fault latency {kind:>8}: p50 {:8.1} µs  p99 {:8.1} µs  max {:8.1} µs", l.p50, l.p99, l.max)?;
        }
        writeln!(
            f,
            "guest:      its own check: {} generations after switchover, {} bad words",
            self.guest.generations_after_switchover, self.guest.bad_words
        )?;
        for line in &self.guest.last_lines {
            writeln!(f, "  {line}")?;
        }
        write!(f, "total:      {:.2} s", m.total_seconds)
    }
}
