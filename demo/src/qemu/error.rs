//! Why a QEMU migration did not run to the end: one variant per thing that
//! can go wrong, each naming it; what it shares with the stand-in
//! orchestration (child processes, the target agent's status) converts.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use guest_memory::hugepages::HugePageError;

use super::qmp::QmpError;
use crate::chaos::ChaosEvent;
use crate::process::ProcessError;
use crate::status_watch::StatusError;

/// What provides QEMU and the guest image (as root).
pub const SETUP_COMMAND: &str = "scripts/setup --qemu";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("interrupted by {0}")]
    Interrupted(String),
    #[error("the run's TLS certificates")]
    Tls(#[source] crate::tls::DemoTlsError),
    #[error("--chaos {0}: a QEMU migration rehearses kill-target-agent only (the others need --vmm standin)")]
    ChaosUnsupported(ChaosEvent),
    #[error(
        "the target QEMU's VMM shim did not hand the guest's memory to the new target agent within {after:.1?} \
         (no \"handed over again\" line in {log})",
        log = log.display()
    )]
    NotHandedOverAgain { log: PathBuf, after: Duration },
    #[error("qemu-system-x86_64 is not on PATH: install it with `{SETUP_COMMAND}` (as root)")]
    QemuNotInstalled,
    #[error("the QEMU test guest is not built ({path} is missing): build it with `{SETUP_COMMAND}` (as root)", path = path.display())]
    GuestImageMissing { path: PathBuf },
    #[error("huge pages for both guests: {0}")]
    HugePages(#[source] HugePageError),
    #[error("creating the work directory under /dev/shm: {0}")]
    WorkDir(#[source] io::Error),
    #[error("creating the hugetlbfs mount point {path}: {source}", path = path.display())]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running `mount -t hugetlbfs` on {path}: {source}", path = path.display())]
    MountCommand {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`mount -t hugetlbfs` on {path} failed ({status}); mounting needs root", path = path.display())]
    MountFailed { path: PathBuf, status: ExitStatus },
    #[error("the migration ({})", source.vm)]
    Migrate {
        #[source]
        source: Box<pageserver_migrate::MigrateError>,
    },
    #[error("pageserver-migrate failed ({status}); its stderr:\n{stderr}")]
    MigrateFailed { status: String, stderr: String, vm_state: String },
    #[error(
        "pageserver-migrate failed and {vm_state}: the source guest checked {source_generations_after} more \
         generations, {source_bad_words} bad words; its stderr:\n{stderr}"
    )]
    RolledBack { vm_state: String, stderr: String, source_generations_after: u64, source_bad_words: u64 },
    #[error("pageserver-migrate's {path}", path = path.display())]
    MigrateLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pageserver-migrate's report {path}", path = path.display())]
    MigrateReport {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("picking a free port for QEMU's own migration stream: {0}")]
    MigrationPort(#[source] io::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("the {qemu} QEMU's QMP: {source}")]
    Qmp {
        qemu: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("connecting to the {agent} agent at {addr}: {source}")]
    Connect {
        agent: &'static str,
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "timed out after {after:.1?}: the {qemu} guest's memory checker printed {seen} of {want} generations in {log}",
        log = log.display()
    )]
    CheckerTimeout { qemu: &'static str, log: PathBuf, seen: u64, want: u64, after: Duration },
    #[error("reading the RAM file {path} to compare it: {source}", path = path.display())]
    RamFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Maps a QMP error of the `qemu` ("source" or "target") QEMU.
pub(super) fn qmp(qemu: &'static str) -> impl FnOnce(QmpError) -> QemuError {
    move |source| QemuError::Qmp { qemu, source }
}
