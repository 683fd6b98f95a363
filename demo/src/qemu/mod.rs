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
//! 3. `pageserver-migrate` (the product's binary; with chaos events, its
//!    steps in this process, [`pageserver_migrate::migrate`], so that the
//!    events fire between them): `migrate-incoming`; the target agent
//!    pre-copies until converged; source: `migrate` with
//!    `pause-before-switchover`; at status `pre-switchover` the source
//!    vCPUs are stopped: the source agent is told
//!    (`MigrationSource/SetPaused`), the target agent switches over (faults
//!    served from now on: QEMU reads guest pages while loading device
//!    state), then `migrate-continue`;
//! 4. the target guest runs, faulting through the target agent; its checker
//!    must print further generations with `bad=0` on the target's console.
//!
//! # Layout
//!
//! - this file: the options and the sequence above;
//! - `agent_restart`: `--chaos kill-target-agent@PHASE`, the one chaos event
//!   a QEMU migration rehearses (the shim's hand-off to a new agent);
//! - [`error`]: why a run fails ([`QemuError`]);
//! - [`qmp`]: a minimal QMP client (`pageserver-migrate`'s);
//! - `command_line`: how each QEMU is started, with the VMM shim;
//! - [`guest`]: the guest image, and its memory checker's verdict;
//! - `hugetlbfs`: a hugetlbfs mount for the RAM files of hugetlbfs guests;
//! - `ram_compare`: the target's RAM file against the source's;
//! - [`report`]: what a run measured ([`QemuReport`]);
//! - [`native`]: the same guest migrated by QEMU's own post-copy, for
//!   comparison.
//!
//! Nothing is installed or built here: QEMU and the guest image come from
//! `scripts/setup --qemu`, the binaries and the shim from a workspace build.

#![forbid(unsafe_code)]

mod agent_restart;
mod command_line;
pub mod error;
pub mod guest;
mod hugetlbfs;
pub mod native;
mod ram_compare;
pub mod report;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pageserver_migrate::report::MigrateReport;
use pageserver_migrate::{Hooks, MigrationPlan, Step};
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use serde_json::json;
use tonic::transport::Channel;

pub use agent_restart::supported as chaos_supported;
pub use error::QemuError;
pub use guest::GuestVerdict;
pub use pageserver_migrate::qmp;
pub use report::QemuReport;

use crate::chaos::{ChaosEvent, ChaosPhase};
use crate::process::{Binaries, ChildProcess, WorkDir};
use crate::progress::Progress;
use crate::status_watch::StatusWatch;
use crate::test_hooks::AgentTestHooks;
use crate::tls::DemoTls;
use agent_restart::TargetAgent;
use command_line::QemuLaunch;
use error::qmp;
use guest::{GuestImage, qemu_installed, wait_generations};
use hugetlbfs::HugetlbfsMount;
use qmp::Qmp;
use ram_compare::compare_ram_files;

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
    /// The target agent's test hooks (a `test-hooks` build only), e.g.
    /// stale pages installed as if fresh, which the guest's checker must
    /// catch.
    pub hooks: AgentTestHooks,
    /// Start the target paused (`-S`), wait until the target agent has
    /// installed every page, compare the target's RAM file with the source's
    /// (frozen since the pause) byte for byte, then let the guest run.
    pub verify_bytes: bool,
    pub timeout: Duration,
    /// Chaos events; only `kill-target-agent` ([`chaos_supported`]).
    pub chaos: Vec<ChaosEvent>,
    /// The agents without TLS (`--plaintext`); by default mutual TLS with
    /// throwaway certificates ([`crate::tls`]).
    pub plaintext: bool,
    /// For a test of a failed migration: the source agent lets another
    /// certificate name steer, so `pageserver-migrate`'s SetPaused is refused
    /// after the source QEMU paused at pre-switchover; the migration must be
    /// cancelled, and the guest must go on running on the source
    /// ([`QemuError::RolledBack`]). Needs TLS.
    pub refuse_orchestrator_on_source: bool,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            hugetlb: false,
            checker_mib: 48,
            generations_after_switchover: 3,
            quiet: false,
            hooks: AgentTestHooks::default(),
            verify_bytes: false,
            timeout: Duration::from_secs(120),
            chaos: Vec::new(),
            plaintext: false,
            refuse_orchestrator_on_source: false,
        }
    }
}

/// The directory of the hugetlbfs mount inside the work directory.
const HUGETLBFS_DIR: &str = "hugetlbfs";
/// Serial-console lines of each QEMU shown when the migration fails.
const SERIAL_LINES_ON_FAILURE: usize = 15;

/// Runs one QEMU migration; see the module docs.
pub async fn run_qemu_migration(opts: &QemuOptions) -> Result<QemuReport, QemuError> {
    run_qemu_migration_until(opts, std::future::pending()).await
}

/// [`run_qemu_migration`], unless `stop` completes first (with what stopped
/// it): then it ends with [`QemuError::Interrupted`], through the same
/// shutdown as any other error.
pub async fn run_qemu_migration_until(
    opts: &QemuOptions,
    stop: impl Future<Output = String>,
) -> Result<QemuReport, QemuError> {
    crate::leftovers::clean_up();
    // What the run needs is checked before anything is started.
    if let Some(event) = opts.chaos.iter().find(|e| !chaos_supported(e)) {
        return Err(QemuError::ChaosUnsupported(*event));
    }
    let binaries = Binaries::locate()?;
    if !qemu_installed() {
        return Err(QemuError::QemuNotInstalled);
    }
    let image = GuestImage::locate()?;
    let _huge_pages = if opts.hugetlb {
        Some(crate::leftovers::reserve_huge_pages(2 * opts.memory_mib.div_ceil(2) + 8).map_err(QemuError::HugePages)?)
    } else {
        None
    };
    let work = WorkDir::create().map_err(QemuError::WorkDir)?;
    let _mount = if opts.hugetlb { Some(HugetlbfsMount::new(work.path().join(HUGETLBFS_DIR))?) } else { None };
    let tls = if opts.plaintext { None } else { Some(DemoTls::create(work.path(), &[]).map_err(QemuError::Tls)?) };
    let q = Qemus { opts, work: work.path(), binaries: &binaries, image, progress: Progress::start(opts.quiet), tls };
    let mut children: Vec<ChildProcess> = Vec::new();
    let result = tokio::select! {
        result = migrate(&q, &mut children) => result,
        by = stop => Err(QemuError::Interrupted(by)),
    };
    for child in children.iter_mut().rev() {
        child.shut_down(None, Duration::ZERO).await;
    }
    for role in ["source", "target"] {
        let _ = std::fs::remove_file(q.ram_path(role));
    }
    if result.is_err() {
        q.print_failure(&children);
    }
    result
}

/// One QEMU migration's setting.
struct Qemus<'a> {
    opts: &'a QemuOptions,
    work: &'a Path,
    binaries: &'a Binaries,
    image: GuestImage,
    progress: Progress,
    /// The run's certificates; `None` with `--plaintext`.
    tls: Option<DemoTls>,
}

impl Qemus<'_> {
    /// A client of the target agent at `addr`, as the orchestrator.
    async fn target_client(&self, addr: &str) -> Result<MigrationTargetClient<Channel>, QemuError> {
        crate::tls::channel(self.tls.as_ref(), addr)
            .await
            .map(MigrationTargetClient::new)
            .map_err(|source| QemuError::Connect { agent: "target", addr: addr.to_owned(), source })
    }

    /// Prints the children's stderr and both serial consoles (a failed run).
    fn print_failure(&self, children: &[ChildProcess]) {
        for child in children {
            eprintln!("--- {} stderr (last lines) ---\n{}", child.name(), child.log_tail());
        }
        for role in ["source", "target"] {
            let log = crate::process::tail_of_file(&self.serial_log(role), SERIAL_LINES_ON_FAILURE);
            eprintln!("--- {role} serial console (last lines) ---\n{log}");
        }
    }

    /// Starts the `role` QEMU for QEMU's own migration: no shim, its RAM
    /// anonymous memory.
    fn spawn_native_qemu(&self, role: &'static str) -> Result<ChildProcess, QemuError> {
        let (ram, serial_log, qmp_socket) = (self.ram_path(role), self.serial_log(role), self.qmp_socket(role));
        let launch = QemuLaunch {
            role,
            image: &self.image,
            ram: &ram,
            handoff_socket: Path::new(""),
            serial_log: &serial_log,
            qmp_socket: &qmp_socket,
            incoming: role == "target",
            shared_ram_file: false,
        };
        let no_env: [(&str, &OsStr); 0] = [];
        let program = Path::new("qemu-system-x86_64");
        let args = launch.args(self.opts);
        Ok(ChildProcess::spawn_with_env(&format!("qemu-{role}"), program, &args, &no_env, self.work)?)
    }

    fn ram_path(&self, role: &str) -> PathBuf {
        if self.opts.hugetlb {
            self.work.join(HUGETLBFS_DIR).join(format!("{role}.ram"))
        } else {
            self.work.join(format!("{role}.ram"))
        }
    }

    fn serial_log(&self, role: &str) -> PathBuf {
        self.work.join(format!("{role}-serial.log"))
    }

    fn qmp_socket(&self, role: &str) -> PathBuf {
        self.work.join(format!("{role}.qmp"))
    }

    /// Starts the `role` QEMU, its RAM handed to the agent on `handoff_socket`.
    fn spawn_qemu(&self, role: &'static str, handoff_socket: &Path) -> Result<ChildProcess, QemuError> {
        let (ram, serial_log, qmp_socket) = (self.ram_path(role), self.serial_log(role), self.qmp_socket(role));
        let launch = QemuLaunch {
            role,
            image: &self.image,
            ram: &ram,
            handoff_socket,
            serial_log: &serial_log,
            qmp_socket: &qmp_socket,
            incoming: role == "target",
            shared_ram_file: true,
        };
        let env = launch.shim_env(&self.binaries.vmm_shim);
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(name, value)| (*name, value.as_os_str())).collect();
        let program = Path::new("qemu-system-x86_64");
        Ok(ChildProcess::spawn_with_env(&format!("qemu-{role}"), program, &launch.args(self.opts), &env, self.work)?)
    }

    /// Starts an agent with `args`; returns its gRPC address.
    async fn start_agent(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        children: &mut Vec<ChildProcess>,
    ) -> Result<String, QemuError> {
        let agent = push(children, ChildProcess::spawn(name, program, args, self.work)?);
        Ok(agent.wait_listening(Instant::now() + self.opts.timeout).await?.grpc)
    }
}

fn push(children: &mut Vec<ChildProcess>, child: ChildProcess) -> &mut ChildProcess {
    children.push(child);
    let last = children.len() - 1;
    &mut children[last]
}

/// A TCP port free now on 127.0.0.1, for QEMU's own migration stream (the
/// device state).
fn free_port() -> Result<u16, QemuError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(QemuError::MigrationPort)?;
    Ok(listener.local_addr().map_err(QemuError::MigrationPort)?.port())
}

async fn migrate(q: &Qemus<'_>, children: &mut Vec<ChildProcess>) -> Result<QemuReport, QemuError> {
    let t = q.opts.timeout;
    // Source side.
    let source_sock = q.work.join("source.sock");
    let mut args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        format!("--handoff-socket={}", source_sock.display()),
    ];
    args.extend(q.tls.as_ref().map(DemoTls::source_args).unwrap_or_default());
    if q.opts.refuse_orchestrator_on_source {
        for arg in args.iter_mut().filter(|arg| arg.starts_with("--control-allow-name=")) {
            *arg = "--control-allow-name=not-the-orchestrator.pageserver.demo".to_owned();
        }
    }
    let source_addr = q.start_agent("source-agent", &q.binaries.source_agent, &args, children).await?;
    children.push(q.spawn_qemu("source", &source_sock)?);
    let source_serial = q.serial_log("source");
    wait_generations("source", &source_serial, 1, t).await?;
    q.progress.say(format!("source QEMU booted; its memory checker runs (source agent on {source_addr})"));

    // Target side.
    let target_sock = q.work.join("target.sock");
    let mut args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        format!("--source={}", crate::tls::url(q.tls.as_ref(), &source_addr)),
        format!("--handoff-socket={}", target_sock.display()),
    ];
    args.extend(q.opts.hooks.args());
    args.extend(q.tls.as_ref().map(DemoTls::target_args).unwrap_or_default());
    let addr = q.start_agent("target-agent", &q.binaries.target_agent, &args, children).await?;
    let child = children.len() - 1;
    children.push(q.spawn_qemu("target", &target_sock)?);
    q.progress.say(format!("target QEMU started, waiting for the migration (target agent on {addr})"));

    // The migration: pageserver-migrate, or its steps in this process
    // when chaos events must fire between them.
    let plan = MigrationPlan {
        source_agent: crate::tls::url(q.tls.as_ref(), &source_addr),
        target_agent: crate::tls::url(q.tls.as_ref(), &addr),
        source_qmp: q.qmp_socket("source").into(),
        target_qmp: q.qmp_socket("target").into(),
        migration_uri: format!("tcp:127.0.0.1:{}", free_port()?),
        incoming_uri: None,
        step_timeout: t,
        wait_postcopy: true,
    };
    let (migrated, target, chaos, handoffs) = if q.opts.chaos.is_empty() {
        let migrated = match run_pageserver_migrate(q, &plan).await {
            Err(QemuError::MigrateFailed { vm_state, stderr, .. })
                if vm_state.starts_with(pageserver_migrate::error::RESUMED_ON_SOURCE) =>
            {
                return Err(source_ran_on(q, vm_state, stderr).await);
            }
            other => other?,
        };
        (migrated, q.target_client(&addr).await?, Vec::new(), None)
    } else {
        let client = q.target_client(&addr).await?;
        let mut hooks = ChaosHooks {
            q,
            target: TargetAgent { client, child },
            agent_args: &args,
            children,
            records: Vec::new(),
            handoffs: None,
        };
        let tls = q.tls.as_ref().map(|tls| &tls.orchestrator);
        let migrated =
            pageserver_migrate::migrate(&plan, tls, &q.progress, &mut hooks, Box::pin(std::future::pending()))
                .await
                .map_err(|error| QemuError::Migrate { source: Box::new(error) })?;
        let ChaosHooks { target, records, handoffs, .. } = hooks;
        let report = MigrateReport {
            migration: migrated.report,
            migration_seconds: migrated.migration_seconds,
            target_run_state: migrated.target_run_state,
            failed_step: None,
            vm_state: String::new(),
        };
        (report, target.client, records, handoffs)
    };
    let watch = StatusWatch::start(target.clone());

    let mut report = migrated.migration;
    if q.opts.verify_bytes {
        // pageserver-migrate waited for post-copy to complete: every page
        // is on the target, and the source's RAM is frozen since the pause.
        let compared = compare_ram_files(&q.ram_path("source"), &q.ram_path("target"))?;
        report.verified_pages = compared.compared;
        report.mismatched_pages = compared.differing;
        report.first_mismatches = compared.first_differing;
        q.progress.say(format!(
            "compared the target's RAM with the source's at pause: {} pages, {} differ",
            compared.compared, compared.differing
        ));
        let mut target_qmp = Qmp::connect(&q.qmp_socket("target").into(), None, t).await.map_err(qmp("target"))?;
        target_qmp.execute("cont", json!({})).await.map_err(qmp("target"))?;
    }

    // The target guest's verdict.
    let wanted = q.opts.generations_after_switchover;
    let lines = watch.unless_failed(wait_generations("target", &q.serial_log("target"), wanted, t)).await?;
    let verdict = GuestVerdict::of(&lines);
    q.progress.say(format!(
        "target guest: {} generations checked after switchover, {} bad words",
        verdict.generations_after_switchover, verdict.bad_words
    ));
    report.guest_bytes = q.opts.memory_mib << 20;
    report.hugetlb = q.opts.hugetlb;
    report.total_seconds = q.progress.seconds();
    report.chaos = chaos;
    if let Some(handoffs) = handoffs {
        report.handoffs.insert("target".to_owned(), handoffs);
    }
    Ok(QemuReport { migration: report, guest: verdict, migration_seconds: migrated.migration_seconds })
}

/// Runs `pageserver-migrate` for `plan`, its progress lines on stdout
/// (unless quiet), its stderr in the work directory; returns its report.
async fn run_pageserver_migrate(q: &Qemus<'_>, plan: &MigrationPlan) -> Result<MigrateReport, QemuError> {
    let program = q.binaries.migrate()?;
    let report_path = q.work.join("pageserver-migrate.json");
    let log_path = q.work.join("pageserver-migrate.log");
    let mut command = tokio::process::Command::new(program);
    command
        .arg(format!("--source-agent={}", plan.source_agent))
        .arg(format!("--target-agent={}", plan.target_agent))
        .arg(format!("--source-qmp={}", plan.source_qmp))
        .arg(format!("--target-qmp={}", plan.target_qmp))
        .arg(format!("--migration-uri={}", plan.migration_uri))
        .arg(format!("--timeout={}s", plan.step_timeout.as_secs().max(1)))
        .arg(format!("--report-json={}", report_path.display()));
    match &q.tls {
        Some(tls) => {
            let files = tls.orchestrator_files();
            command.arg(format!("--tls-cert={}", files.cert.display()));
            command.arg(format!("--tls-key={}", files.key.display()));
            command.arg(format!("--tls-ca={}", files.ca.display()));
        }
        None => drop(command.arg("--plaintext")),
    }
    let log =
        std::fs::File::create(&log_path).map_err(|source| QemuError::MigrateLog { path: log_path.clone(), source })?;
    command.stdout(if q.opts.quiet { Stdio::null() } else { Stdio::inherit() }).stderr(log).kill_on_drop(true);
    q.progress.say(format!("running {}", program.display()));
    let status = command.status().await.map_err(|source| QemuError::MigrateLog { path: program.to_owned(), source })?;
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        // The report says where the VM was left (written after failures too).
        let written = std::fs::read_to_string(&report_path).ok();
        let report: Option<MigrateReport> = written.and_then(|text| serde_json::from_str(&text).ok());
        let vm_state = report.map(|report| report.vm_state).unwrap_or_default();
        return Err(QemuError::MigrateFailed { status: status.to_string(), stderr, vm_state });
    }
    let text = std::fs::read_to_string(&report_path)
        .map_err(|source| QemuError::MigrateLog { path: report_path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| QemuError::MigrateReport { path: report_path, source })
}

/// After `pageserver-migrate` cancelled a migration and resumed the source
/// VM: the source guest's checker must print two more generations without
/// a bad word.
async fn source_ran_on(q: &Qemus<'_>, vm_state: String, stderr: String) -> QemuError {
    let serial = q.serial_log("source");
    let before = guest::checker_lines(&guest::read_log(&serial)).len();
    match wait_generations("source", &serial, before as u64 + 2, q.opts.timeout).await {
        Ok(lines) => {
            let after = &lines[before.min(lines.len())..];
            q.progress.say(format!("the source guest runs on: {} generations after the failure", after.len()));
            QemuError::RolledBack {
                vm_state,
                stderr,
                source_generations_after: after.len() as u64,
                source_bad_words: after.iter().map(|line| line.bad).sum(),
            }
        }
        Err(error) => error,
    }
}

/// The demo's chaos events between `pageserver-migrate`'s steps: each
/// phase's `kill-target-agent` fires after the step that starts it.
struct ChaosHooks<'a, 'q> {
    q: &'a Qemus<'q>,
    target: TargetAgent,
    agent_args: &'a [String],
    children: &'a mut Vec<ChildProcess>,
    records: Vec<crate::chaos::ChaosRecord>,
    handoffs: Option<u64>,
}

impl Hooks for ChaosHooks<'_, '_> {
    async fn after(&mut self, step: Step) -> Result<Option<MigrationTargetClient<Channel>>, String> {
        let phase = match step {
            Step::StartIncoming => ChaosPhase::Precopy,
            Step::PauseSource => ChaosPhase::Switchover,
            Step::Switchover => ChaosPhase::Postcopy,
            _ => return Ok(None),
        };
        let fired = self
            .q
            .fire_chaos(phase, &mut self.target, self.agent_args, self.children, &mut self.records, &mut self.handoffs)
            .await
            .map_err(|error| pageserver_agent_shell::exit::describe(&error))?;
        Ok(fired.then(|| self.target.client.clone()))
    }
}
