//! What a migration is asked to do, and why it may fail.

use std::path::PathBuf;
use std::time::Duration;

use guest_memory::hugepages::HugePageError;
use pageserver_metrics::ScrapeError;

use super::observer::MigrationObserver;
use crate::chaos::{ChaosEvent, ChaosKind, ChaosPhase};
use crate::netns::NetError;
use crate::process::ProcessError;
use crate::status_watch::StatusError;
use crate::test_hooks::AgentTestHooks;

/// The target agent's `--pull-order`: which stale pages its background
/// pull fetches first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullOrder {
    /// Nearest to the guest's latest fault.
    Nearest,
    /// The source's hottest pages (dirtied in the most pre-copy rounds).
    Hot,
}

impl PullOrder {
    /// The flag's value.
    pub fn arg(self) -> &'static str {
        match self {
            PullOrder::Nearest => "nearest",
            PullOrder::Hot => "hot",
        }
    }
}

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    pub memory_bytes: u64,
    /// A sparse guest: only this many bytes of its memory are ever written
    /// (64 clusters spread evenly, the vCPUs dirtying only inside them; the
    /// stand-ins' `--written`); `None`: all of it.
    pub written_bytes: Option<u64>,
    /// 2 MiB pages (MFD_HUGETLB); needs free huge pages for both VMs.
    pub hugetlb: bool,
    pub vcpus: u32,
    pub seed: u64,
    /// Source page writes per second across all vCPUs.
    pub dirty_rate: u64,
    /// How long the target guest runs after the switchover.
    pub run_ms: u64,
    pub max_precopy_rounds: u32,
    /// Pages the source writes (`write P`) after pre-copy converged and
    /// before the pause.
    pub write_before_pause: Vec<u64>,
    /// Pages the source VMM punches out (MADV_REMOVE, as a balloon does)
    /// after pre-copy converged and before the pause: the source agent must
    /// report them dirty, so the target ends with zeros there.
    pub discard_before_pause: Vec<u64>,
    /// Pages [first, first + count) the source writes after pre-copy
    /// converged and before the pause (`write-range`): a stale set of a
    /// chosen size.
    pub write_range_before_pause: Option<(u64, u64)>,
    /// Pages [first, first + count) the target vCPUs share and read at once
    /// right after `Switchover`, before the guest runs (`touch-spread`); the
    /// time it took is in the report.
    pub touch_spread_after_resume: Option<(u64, u64)>,
    /// Pages the target vCPUs share and read at once, in this order, right
    /// after `Switchover`, before the guest runs (`touch-shared`); the time
    /// it took is in the report (`touch_spread`).
    pub touch_shared_after_resume: Vec<u64>,
    /// Pages every target vCPU reads at once after `Switchover`, before the
    /// guest runs.
    pub touch_after_resume: Vec<u64>,
    /// Pages the target VMM punches out (MADV_REMOVE, as a balloon does)
    /// right after `Switchover`, before the touches and the guest's run: they
    /// must read as zeros afterwards, whatever the source held.
    pub discard_after_switchover: Vec<u64>,
    /// No progress output (errors still go to stderr).
    pub quiet: bool,
    pub vm_name: String,
    /// At most this many pages written by the target guest (undo copies).
    pub max_written_pages: u64,
    /// Longest wait for any one step (startup, pre-copy, verify, ...).
    pub phase_timeout: Duration,
    /// The target agent's test hooks (a `test-hooks` build only).
    pub hooks: AgentTestHooks,
    /// After the migration, each agent's final `/metrics` text goes to
    /// `source.prom` and `target.prom` in this directory (created if needed).
    pub metrics_dump: Option<PathBuf>,
    /// Where the agents serve `/metrics` (source, target); port 0 picks one.
    pub metrics_listen: (String, String),
    /// Faults to inject ([`crate::chaos`]).
    pub chaos: Vec<ChaosEvent>,
    /// The target agent's `--source-unreachable-timeout` (its default if
    /// unset).
    pub source_unreachable_timeout: Option<Duration>,
    /// The target agent's `--pause-timeout` (its default if unset).
    pub pause_timeout: Option<Duration>,
    /// The target agent's `--pull-delay` (its default, none, if unset).
    pub pull_delay: Option<Duration>,
    /// The source guest rewrites its whole hot set every this many ms until
    /// the pause (the stand-in's `--hot-sweep-ms`), on top of `dirty_rate`:
    /// the hot half of a hot/cold workload. None: never.
    pub hot_sweep_ms: Option<u64>,
    /// The target guest's touches wait until the target agent applied the
    /// final bitmap (its background pull starts then): the touches then
    /// race the pull, not the bitmap.
    pub touch_after_final_bitmap: bool,
    /// After its touches (if any), the target guest does nothing (no run,
    /// no verification) until the migration is complete: the pull alone
    /// fetches every stale page the touches did not.
    pub idle_until_complete: bool,
    /// The target agent's `--pull-order` (its default if unset).
    pub pull_order: Option<PullOrder>,
    /// More flags for the source agent (its limits, say), on every start.
    pub source_agent_flags: Vec<String>,
    /// A test's view into the migration (see [`MigrationObserver`]).
    pub observer: Option<MigrationObserver>,
    /// Two hosts on one machine: the source side and the target side each
    /// in a network namespace, joined by a veth link ([`crate::netns`]).
    pub two_hosts: bool,
    /// The link's rate in Gbit/s, each way (`two_hosts` only).
    pub link_rate_gbit: Option<f64>,
    /// The agents without TLS (`--plaintext`); by default they speak mutual
    /// TLS with throwaway certificates ([`crate::tls`]).
    pub plaintext: bool,
    /// The children's stderr logs (`NAME.log`) go to this directory, which
    /// must exist, and stay there; `None`: into the work directory, removed
    /// with it.
    pub log_dir: Option<PathBuf>,
    /// The source guest writes this at the start of every page that starts
    /// with data (the stand-in's `--marker`): something to look for where no
    /// guest memory may appear, such as the logs.
    pub guest_marker: Option<String>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            memory_bytes: 1 << 30,
            written_bytes: None,
            hugetlb: false,
            vcpus: 4,
            seed: 1,
            dirty_rate: 20_000,
            run_ms: 1000,
            max_precopy_rounds: 8,
            write_before_pause: Vec::new(),
            touch_after_resume: Vec::new(),
            discard_after_switchover: Vec::new(),
            discard_before_pause: Vec::new(),
            write_range_before_pause: None,
            touch_spread_after_resume: None,
            touch_shared_after_resume: Vec::new(),
            quiet: false,
            vm_name: "demo-vm".to_owned(),
            max_written_pages: 4096,
            phase_timeout: Duration::from_secs(300),
            hooks: AgentTestHooks::default(),
            metrics_dump: None,
            metrics_listen: ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
            chaos: Vec::new(),
            source_unreachable_timeout: None,
            pause_timeout: None,
            pull_delay: None,
            hot_sweep_ms: None,
            idle_until_complete: false,
            touch_after_final_bitmap: false,
            pull_order: None,
            source_agent_flags: Vec::new(),
            observer: None,
            two_hosts: false,
            link_rate_gbit: None,
            plaintext: false,
            log_dir: None,
            guest_marker: None,
        }
    }
}

impl MigrationOptions {
    pub fn page_size(&self) -> u64 {
        if self.hugetlb { 2 << 20 } else { 4096 }
    }

    /// Checks the options before anything is started.
    pub fn validate(&self) -> Result<(), MigrationError> {
        let page_size = self.page_size();
        if self.memory_bytes == 0 || self.memory_bytes.checked_rem(page_size) != Some(0) {
            return Err(MigrationError::InvalidOptions(format!(
                "memory size {} is not a positive multiple of the page size {page_size}",
                self.memory_bytes
            )));
        }
        if self.written_bytes.is_some_and(|written| written < page_size || written > self.memory_bytes) {
            return Err(MigrationError::InvalidOptions(format!(
                "a sparse guest writes between one page and all of its {} bytes",
                self.memory_bytes
            )));
        }
        if self.vcpus == 0 {
            return Err(MigrationError::InvalidOptions("at least one vCPU is needed".into()));
        }
        if self.max_precopy_rounds == 0 {
            return Err(MigrationError::InvalidOptions("at least one pre-copy round is needed".into()));
        }
        let total_pages = self.memory_bytes / page_size;
        // The last page of each range (an empty range: its first).
        let range_ends: Vec<u64> = [self.write_range_before_pause, self.touch_spread_after_resume]
            .into_iter()
            .flatten()
            .map(|(first, count)| first.saturating_add(count.saturating_sub(1)))
            .collect();
        if let Some(page) = self
            .write_before_pause
            .iter()
            .chain(&self.touch_after_resume)
            .chain(&self.touch_shared_after_resume)
            .chain(&self.discard_after_switchover)
            .chain(&self.discard_before_pause)
            .chain(&range_ends)
            .find(|&&p| p >= total_pages)
        {
            return Err(MigrationError::InvalidOptions(format!(
                "page {page} is beyond the guest's {total_pages} pages"
            )));
        }
        self.validate_network()
    }

    /// What needs two hosts has them; with two hosts, nothing is reachable
    /// from the link but the source agent's gRPC.
    fn validate_network(&self) -> Result<(), MigrationError> {
        let invalid = |why: String| Err(MigrationError::InvalidOptions(why));
        if self.plaintext && self.chaos.iter().any(|event| event.kind == ChaosKind::RotateCertificates) {
            return invalid("chaos rotate-certificates needs mutual TLS: not with --plaintext".into());
        }
        if !self.two_hosts {
            if let Some(event) = self.chaos.iter().find(|event| event.kind.needs_two_hosts()) {
                return invalid(format!("chaos {event} acts on the link between two hosts: it needs --two-hosts"));
            }
            if self.link_rate_gbit.is_some() {
                return invalid("--link-rate-gbit limits the link between two hosts: it needs --two-hosts".into());
            }
            return Ok(());
        }
        if let Some(rate) = self.link_rate_gbit
            && !(rate.is_finite() && rate * 1e9 >= 1.0e3)
        {
            return invalid(format!("link rate {rate} Gbit/s: give a positive rate of at least 1 kbit/s"));
        }
        for addr in [&self.metrics_listen.0, &self.metrics_listen.1] {
            if !addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback()) {
                return invalid(format!(
                    "metrics address {addr}: with two hosts the agents serve metrics on loopback only, inside \
                     their namespaces"
                ));
            }
        }
        Ok(())
    }

    /// The link's rate in bits per second, if limited.
    pub fn link_rate_bits(&self) -> Option<u64> {
        self.link_rate_gbit.map(|gbit| (gbit * 1e9).round() as u64)
    }

    /// The chaos events that fire in `phase`.
    pub fn chaos_in(&self, phase: ChaosPhase) -> Vec<ChaosEvent> {
        self.chaos.iter().copied().filter(|event| event.phase == phase).collect()
    }

    /// Whether `Switchover` is to be called before the source pauses.
    pub fn switchover_before_pause(&self) -> bool {
        self.chaos.iter().any(|event| event.kind == ChaosKind::SwitchoverBeforePause)
    }
}

/// Why a migration did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("interrupted by {0}")]
    Interrupted(String),
    #[error("huge pages for both guests: {0}")]
    HugePages(#[source] HugePageError),
    #[error("creating the work directory under /dev/shm: {0}")]
    WorkDir(#[source] std::io::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("internal error: the {0} was not started")]
    NotStarted(&'static str),
    #[error("connecting to the target agent at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("chaos event {event}: {why}")]
    Chaos { event: String, why: String },
    #[error("{call} on the target agent failed: {status}")]
    Rpc { call: &'static str, status: Box<tonic::Status> },
    #[error("the {agent} agent's metrics: {source}")]
    Scrape {
        agent: &'static str,
        #[source]
        source: ScrapeError,
    },
    #[error("an agent listens on {0:?}, which is not an IP address and port")]
    AgentAddress(String),
    #[error("the two hosts: {0}")]
    Network(#[source] NetError),
    #[error("the run's TLS certificates")]
    Tls(#[source] crate::tls::DemoTlsError),
    #[error("writing the metrics dump {path}: {source}", path = path.display())]
    MetricsDump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
