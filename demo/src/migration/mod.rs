//! One whole migration on this machine: the source agent, the source VMM
//! stand-in, the target agent and the target VMM stand-in as separate
//! processes talking over 127.0.0.1 and Unix sockets in a fresh directory
//! under /dev/shm. With `two_hosts`, the source side and the target side
//! are each in a network namespace of their own, and the agents talk over
//! the veth link between them (`hosts`, [`crate::netns`]).
//!
//! Sequence: both agents and both VMs start; pre-copy runs until the target
//! agent reports "precopy-converged"; optional writes on the source; the
//! source pauses (and then writes a snapshot of its frozen memory);
//! `Switchover`; optional concurrent touches on the target; the target guest
//! runs; every page of the target is compared with the snapshot; the target
//! agent reaches "complete"; optionally, both agents' final Prometheus
//! metrics are saved (`metrics_dump`).
//!
//! If the target agent's migration fails after the switchover, its guest
//! is frozen (faults nobody resolves): the report then says why
//! (`failure`), what the agent's health and blocked faults are, and compares
//! every page the frozen guest can see, which must still all be the
//! source's content at pause.
//!
//! Chaos events ([`crate::chaos`]) fire at their phase's point in this
//! sequence (`chaos_run`; those on the link: `link_chaos`).

mod chaos_run;
mod hosts;
mod link_chaos;
mod observer;
mod options;
mod waits;

use std::path::Path;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationPhase, MigrationStatus, SwitchoverRequest};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub use observer::{MigrationObserver, StartedAgent};
pub use options::{MigrationError, MigrationOptions, PullOrder};

use vmm_standin::StandinEvent;

use crate::chaos::ChaosPhase;
use crate::netns::TwoHosts;
use crate::process::{AgentAddrs, Binaries, ChildProcess, WorkDir};
use crate::progress::Progress;
use crate::report::Report;
use crate::status_watch::{Failure, StatusError, StatusWatch};
use crate::tls::DemoTls;
use hosts::Host;
use waits::{deadline, wait_for};

/// Runs one migration and returns what it measured. A report whose
/// verification failed is still `Ok`: see [`Report::verification_passed`].
/// Every child is killed and the work directory (and the two hosts'
/// namespaces) removed, also on error.
pub async fn run_migration(opts: &MigrationOptions) -> Result<Report, MigrationError> {
    run_migration_until(opts, std::future::pending()).await
}

/// [`run_migration`], unless `stop` completes first (with what stopped it,
/// e.g. "SIGTERM"): then the migration ends with
/// [`MigrationError::Interrupted`], through the same shutdown as any other
/// error (children stopped and waited for, then the work directory and the
/// huge pages).
pub async fn run_migration_until(
    opts: &MigrationOptions,
    stop: impl Future<Output = String>,
) -> Result<Report, MigrationError> {
    opts.validate()?;
    crate::leftovers::clean_up();
    // Source and target guests, each its own huge pages (+ slack).
    let _huge_pages = if opts.hugetlb {
        Some(
            crate::leftovers::reserve_huge_pages(2 * opts.memory_bytes.div_ceil(2 << 20) + 8)
                .map_err(MigrationError::HugePages)?,
        )
    } else {
        None
    };
    let binaries = Binaries::locate()?;
    let work = WorkDir::create().map_err(MigrationError::WorkDir)?;
    // Declared before the migration: removed after its children are gone.
    let network = if opts.two_hosts {
        Some(TwoHosts::create(opts.link_rate_bits()).map_err(MigrationError::Network)?)
    } else {
        None
    };
    let tls = if opts.plaintext {
        None
    } else {
        let link: Vec<String> =
            network.iter().flat_map(|n| [n.source.addr.to_string(), n.target.addr.to_string()]).collect();
        Some(DemoTls::create(work.path(), &link).map_err(MigrationError::Tls)?)
    };
    let (source_host, target_host) = match &network {
        Some(hosts) => (Host::Namespace(hosts.source.clone()), Host::Namespace(hosts.target.clone())),
        None => (Host::Local, Host::Local),
    };
    let mut migration = Migration {
        opts,
        binaries,
        work: work.path(),
        log_dir: opts.log_dir.as_deref().unwrap_or(work.path()),
        progress: Progress::start(opts.quiet),
        network: network.as_ref(),
        source_host,
        target_host,
        children: Children::default(),
        target_channel: None,
        tls,
        source_agent_args: Vec::new(),
        target_agent_args: Vec::new(),
        target_agent_before_chaos: None,
        source_addrs: None,
        source_paused: false,
        snapshot_written: false,
        report: Report {
            guest_bytes: opts.memory_bytes,
            written_bytes: opts.written_bytes.unwrap_or(opts.memory_bytes),
            hugetlb: opts.hugetlb,
            vcpus: u64::from(opts.vcpus),
            seed: opts.seed,
            handoffs: [("source".to_owned(), 1), ("target".to_owned(), 1)].into(),
            transport: if opts.plaintext { "plaintext" } else { "mutual TLS" }.to_owned(),
            ..Report::default()
        },
    };
    let result = tokio::select! {
        result = migration.execute() => result,
        by = stop => Err(MigrationError::Interrupted(by)),
    };
    let grace = if result.is_ok() { Duration::from_secs(5) } else { Duration::from_secs(1) };
    migration.report.target_agent_exit_code = migration.children.shut_down(grace).await;
    if result.is_err() {
        migration.children.print_logs();
    }
    result?;
    migration.report.total_seconds = migration.progress.seconds();
    Ok(migration.report)
}

/// Which pages the target stand-in compares with the source's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every page (faulting in those not installed yet).
    All,
    /// Only the pages in its page tables: what a frozen guest can see,
    /// without touching (and blocking on) the others.
    Mapped,
}

/// The four processes, as far as they were started.
#[derive(Debug, Default)]
struct Children {
    source_agent: Option<ChildProcess>,
    source_vm: Option<ChildProcess>,
    target_agent: Option<ChildProcess>,
    target_vm: Option<ChildProcess>,
}

impl Children {
    /// Stops every child; returns the target agent's exit code (see
    /// [`ChildProcess::terminate`]).
    async fn shut_down(&mut self, grace: Duration) -> Option<i32> {
        for vm in [&mut self.target_vm, &mut self.source_vm].into_iter().flatten() {
            vm.shut_down(Some("quit"), grace).await;
        }
        let target_exit = match &mut self.target_agent {
            Some(agent) => agent.terminate(grace).await,
            None => None,
        };
        if let Some(agent) = &mut self.source_agent {
            agent.terminate(grace).await;
        }
        target_exit
    }

    fn print_logs(&self) {
        for child in [&self.source_agent, &self.source_vm, &self.target_agent, &self.target_vm].into_iter().flatten() {
            eprintln!("--- {} stderr (last lines) ---\n{}", child.name(), child.log_tail());
        }
    }
}

/// The child in `slot`, which an earlier step started.
fn running<'a>(slot: &'a mut Option<ChildProcess>, what: &'static str) -> Result<&'a mut ChildProcess, MigrationError> {
    slot.as_mut().ok_or(MigrationError::NotStarted(what))
}

/// The target agent's status, now.
async fn get_status(client: &mut MigrationTargetClient<Channel>) -> Result<MigrationStatus, MigrationError> {
    let reply = client.get_status(GetStatusRequest {}).await;
    Ok(reply.map_err(|status| MigrationError::Rpc { call: "GetStatus", status: Box::new(status) })?.into_inner())
}

/// One migration in progress.
struct Migration<'a> {
    opts: &'a MigrationOptions,
    binaries: Binaries,
    work: &'a Path,
    /// Where the children's stderr goes (the work directory unless asked).
    log_dir: &'a Path,
    progress: Progress,
    /// The two hosts' namespaces and link (`two_hosts`).
    network: Option<&'a TwoHosts>,
    source_host: Host,
    target_host: Host,
    children: Children,
    report: Report,
    /// The connection to the target agent (its status, and its health).
    target_channel: Option<Channel>,
    /// The run's certificates; `None` with `--plaintext`.
    tls: Option<DemoTls>,
    /// How the source agent was started (a chaos event starts it again).
    source_agent_args: Vec<String>,
    source_addrs: Option<AgentAddrs>,
    /// How the target agent was started, with the addresses it bound.
    target_agent_args: Vec<String>,
    /// The target agent's pid and resources before the first chaos event.
    target_agent_before_chaos: Option<(u32, crate::resources::ProcessResources)>,
    /// Whether the source VM was told to pause.
    source_paused: bool,
    /// Whether its snapshot at pause was seen written (an event read while
    /// waiting for another).
    snapshot_written: bool,
}

impl Migration<'_> {
    async fn execute(&mut self) -> Result<(), MigrationError> {
        self.describe_network()?;
        let source_addr = self.start_source().await?;
        let client = self.start_target(&source_addr).await?;
        let watch = StatusWatch::start(client.clone());
        match self.precopy(&watch).await {
            Ok(()) => {}
            Err(MigrationError::Status(StatusError::Failed(Failure::MigrationFailed { error }))) => {
                // Nothing was installed and the source VM still runs: the
                // report says why; there is nothing of the guest to verify.
                self.progress.say(format!("the target agent's migration FAILED in pre-copy: {error}"));
                self.report.failure = Some(error);
                let status = get_status(&mut client.clone()).await?;
                self.apply_final_status(&status);
                self.report.target_health = self.target_health().await;
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        let paused = if self.opts.switchover_before_pause() {
            self.switch_over_before_pause(&client).await?
        } else {
            self.pause_and_switch_over(&client).await?
        };
        self.fire_chaos(ChaosPhase::Switchover, &watch).await?;
        match self.postcopy(&watch, &client, paused).await {
            Ok(()) => {}
            Err(MigrationError::Status(StatusError::Failed(Failure::MigrationFailed { error }))) => {
                self.failed_after_switchover(client, error).await?;
            }
            Err(error) => return Err(error),
        }
        self.sample_agents_at_end();
        self.dump_metrics().await
    }

    /// The guest runs on the target, every page is verified, post-copy
    /// completes.
    async fn postcopy(
        &mut self,
        watch: &StatusWatch,
        client: &MigrationTargetClient<Channel>,
        paused: Instant,
    ) -> Result<(), MigrationError> {
        self.run_target_guest(watch, client).await?;
        if let Some(observer) = &self.opts.observer {
            observer.before_verify.notified().await;
        }
        self.verify(watch).await?;
        self.complete(watch, client.clone(), paused).await?;
        self.report.target_health = self.target_health().await;
        Ok(())
    }

    /// The target agent failed after the switchover: records why, its health
    /// and final status, and verifies the pages the frozen guest can see.
    async fn failed_after_switchover(
        &mut self,
        mut client: MigrationTargetClient<Channel>,
        error: String,
    ) -> Result<(), MigrationError> {
        self.progress.say(format!("the target agent's migration FAILED: {error}"));
        self.report.failure = Some(error);
        if !self.source_paused {
            // The comparison needs the source's memory frozen.
            self.pause_source().await?;
        }
        let status = get_status(&mut client).await?;
        self.apply_final_status(&status);
        self.report.target_health = self.target_health().await;
        let (mapped, mismatched) = self.compare_with_snapshot(Scope::Mapped).await?;
        self.progress.say(format!(
            "the guest is frozen; verified the {mapped} pages it can see: {mismatched} mismatched; target agent \
             health {}",
            self.report.target_health
        ));
        Ok(())
    }

    /// Waits until the source VM has written its snapshot at pause (once).
    async fn wait_for_snapshot(&mut self) -> Result<(), MigrationError> {
        if !self.snapshot_written {
            let timeout = self.timeout();
            let source_vm = running(&mut self.children.source_vm, "source VM")?;
            let written = |e: &StandinEvent| matches!(e, StandinEvent::SnapshotWritten { .. }).then_some(());
            wait_for(source_vm, "snapshot-written", deadline(timeout), written).await?;
            self.snapshot_written = true;
        }
        Ok(())
    }

    /// Has the target stand-in compare its memory with the source's snapshot
    /// (once the source has written it), into the report. Returns the pages
    /// compared and how many differed.
    async fn compare_with_snapshot(&mut self, scope: Scope) -> Result<(u64, u64), MigrationError> {
        let timeout = self.timeout();
        let snapshot = self.path("snapshot");
        self.wait_for_snapshot().await?;
        let started = Instant::now();
        let target_vm = running(&mut self.children.target_vm, "target VM")?;
        let (command, answer) = match scope {
            Scope::All => ("verify", "verified"),
            Scope::Mapped => ("verify-mapped", "verified-mapped"),
        };
        target_vm.send(&format!("{command} {snapshot}")).await?;
        let (pages, mismatched, first, holes) = wait_for(target_vm, answer, deadline(timeout), |e| match e {
            StandinEvent::Verified { verified_pages: pages, hole_pages, mismatched_pages, first_mismatches } => {
                Some((*pages, *mismatched_pages, first_mismatches.clone(), *hole_pages))
            }
            StandinEvent::VerifiedMapped { mapped_pages: pages, mismatched_pages, first_mismatches } => {
                Some((*pages, *mismatched_pages, first_mismatches.clone(), 0))
            }
            _ => None,
        })
        .await?;
        self.report.verify_seconds = started.elapsed().as_secs_f64();
        self.report.verified_hole_pages = holes;
        self.report.verified_pages = pages;
        self.report.mismatched_pages = mismatched;
        self.report.first_mismatches = first;
        Ok((pages, mismatched))
    }

    /// The target agent's gRPC health for the server as a whole (`SERVING`,
    /// `NOT_SERVING`), or why it could not be asked.
    async fn target_health(&self) -> String {
        let Some(channel) = self.target_channel.clone() else { return "unknown (not connected)".to_owned() };
        match HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await {
            Ok(reply) => reply.into_inner().status().as_str_name().to_owned(),
            Err(status) => format!("unknown ({})", status.message()),
        }
    }

    /// The target agent's final status into the report (the stand-in's
    /// geometry is authoritative; the rest is the agent's).
    fn apply_final_status(&mut self, status: &MigrationStatus) {
        let (page_size, total_pages) = (self.report.page_size, self.report.total_pages);
        self.report.apply_status(status);
        self.report.page_size = page_size;
        self.report.total_pages = total_pages;
    }

    /// Saves each agent's final `/metrics` text, if asked to.
    async fn dump_metrics(&mut self) -> Result<(), MigrationError> {
        let Some(dir) = &self.opts.metrics_dump else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(|source| MigrationError::MetricsDump { path: dir.clone(), source })?;
        for (agent, addr, host) in [
            ("source", &self.report.source_metrics_addr, &self.source_host),
            ("target", &self.report.target_metrics_addr, &self.target_host),
        ] {
            let text = host.scrape(agent, addr).await?;
            let path = dir.join(format!("{agent}.prom"));
            std::fs::write(&path, text).map_err(|source| MigrationError::MetricsDump { path, source })?;
        }
        self.progress.say(format!("final metrics of both agents written to {}", dir.display()));
        Ok(())
    }

    fn path(&self, name: &str) -> String {
        self.work.join(name).display().to_string()
    }

    fn timeout(&self) -> Duration {
        self.opts.phase_timeout
    }

    /// The arguments both stand-ins share.
    fn vm_args(&self, role: &str, socket: &str) -> Vec<String> {
        let opts = self.opts;
        let mut args = vec![
            format!("--role={role}"),
            format!("--memory={}", opts.memory_bytes),
            format!("--vcpus={}", opts.vcpus),
            format!("--seed={}", opts.seed),
            format!("--handoff-socket={socket}"),
            format!("--vm={}", opts.vm_name),
        ];
        if opts.hugetlb {
            args.push("--hugetlb".to_owned());
        }
        if let Some(written) = opts.written_bytes {
            args.push(format!("--written={written}"));
        }
        args
    }

    /// Starts the source agent, then the source VM; returns the agent's
    /// gRPC address.
    async fn start_source(&mut self) -> Result<String, MigrationError> {
        let socket = self.path("source.sock");
        self.source_agent_args = vec![format!("--handoff-socket={socket}"), format!("--vm={}", self.opts.vm_name)];
        self.source_agent_args.extend(self.tls_args(DemoTls::source_args));
        self.source_agent_args.extend(self.opts.source_agent_flags.iter().cloned());
        let mut args = self.source_agent_args.clone();
        args.extend([
            format!("--listen={}", self.source_host.on_link()),
            format!("--metrics-listen={}", self.opts.metrics_listen.0),
        ]);
        let agent = self.source_host.spawn("source-agent", &self.binaries.source_agent, &args, self.log_dir)?;
        let agent = self.children.source_agent.insert(agent);
        let addrs = agent.wait_listening(deadline(self.opts.phase_timeout)).await?;
        if let (Some(observer), Some(pid)) = (&self.opts.observer, agent.id()) {
            let started = StartedAgent { pid, grpc: addrs.grpc.clone(), metrics: addrs.metrics.clone() };
            let _ = observer.source_agent.send(started);
        }
        self.source_addrs = Some(addrs.clone());
        self.progress.say(format!(
            "source agent serving on {} (metrics: http://{}/metrics){}",
            addrs.grpc,
            addrs.metrics,
            self.source_host.in_namespace()
        ));
        self.report.source_metrics_addr = addrs.metrics;
        let addr = addrs.grpc;

        let mut args = self.vm_args("source", &socket);
        args.push(format!("--dirty-rate={}", self.opts.dirty_rate));
        if let Some(ms) = self.opts.hot_sweep_ms {
            args.push(format!("--hot-sweep-ms={ms}"));
        }
        args.push(format!("--snapshot={}", self.path("snapshot")));
        if let Some(marker) = &self.opts.guest_marker {
            args.push(format!("--marker={marker}"));
        }
        let vm = self.source_host.spawn("vmm-standin-source", &self.binaries.vmm_standin, &args, self.log_dir)?;
        let vm = self.children.source_vm.insert(vm);
        let (page_size, total_pages, zero_pages, tracking) =
            wait_for(vm, "ready", deadline(self.opts.phase_timeout), |e| match e {
                StandinEvent::Ready { page_size, total_pages, zero_pages, tracking, .. } => {
                    Some((*page_size, *total_pages, zero_pages.clone(), *tracking))
                }
                _ => None,
            })
            .await?;
        self.report.page_size = page_size;
        self.report.total_pages = total_pages;
        self.report.zero_pages = zero_pages;
        if let Some(tracking) = tracking {
            self.report.tracking_setup_ms = tracking.handoff_us as f64 / 1e3;
            self.report.source_vmm_pte_kib_before_tracking = tracking.vm_pte_kib_before;
            self.report.source_vmm_pte_kib_after_tracking = tracking.vm_pte_kib_after;
        }
        self.progress.say(format!(
            "source VM running: {total_pages} pages of {page_size} bytes, {} vCPUs writing {} pages/s",
            self.opts.vcpus, self.opts.dirty_rate
        ));
        Ok(addr)
    }

    /// An agent's TLS flags (`args` of the run's certificates), none with
    /// `--plaintext`.
    fn tls_args(&self, args: fn(&DemoTls) -> Vec<String>) -> Vec<String> {
        self.tls.as_ref().map(args).unwrap_or_default()
    }

    /// Starts the target agent (pointed at the source agent), then the
    /// target VM; returns a client of the target agent.
    async fn start_target(&mut self, source_addr: &str) -> Result<MigrationTargetClient<Channel>, MigrationError> {
        let socket = self.path("target.sock");
        let mut args = vec![
            format!("--listen={}", hosts::LOOPBACK),
            format!("--metrics-listen={}", self.opts.metrics_listen.1),
            format!("--source={}", crate::tls::url(self.tls.as_ref(), source_addr)),
            format!("--handoff-socket={socket}"),
            format!("--vm={}", self.opts.vm_name),
            format!("--max-precopy-rounds={}", self.opts.max_precopy_rounds),
        ];
        if let Some(timeout) = self.opts.source_unreachable_timeout {
            args.push(format!("--source-unreachable-timeout={}ms", timeout.as_millis()));
        }
        if let Some(timeout) = self.opts.pause_timeout {
            args.push(format!("--pause-timeout={}ms", timeout.as_millis()));
        }
        if let Some(delay) = self.opts.pull_delay {
            args.push(format!("--pull-delay={}ms", delay.as_millis()));
        }
        if let Some(order) = self.opts.pull_order {
            args.push(format!("--pull-order={}", order.arg()));
        }
        args.extend(self.opts.hooks.args());
        args.extend(self.tls_args(DemoTls::target_args));
        let agent = self.target_host.spawn("target-agent", &self.binaries.target_agent, &args, self.log_dir)?;
        let agent = self.children.target_agent.insert(agent);
        let addrs = agent.wait_listening(deadline(self.opts.phase_timeout)).await?;
        args.retain(|arg| !arg.starts_with("--listen=") && !arg.starts_with("--metrics-listen="));
        args.extend([format!("--listen={}", addrs.grpc), format!("--metrics-listen={}", addrs.metrics)]);
        self.target_agent_args = args;
        let channel = self.target_host.channel(&addrs.grpc, self.tls.as_ref()).await?;
        self.target_channel = Some(channel.clone());
        let client = MigrationTargetClient::new(channel);
        self.progress.say(format!(
            "target agent serving on {} (metrics: http://{}/metrics){}",
            addrs.grpc,
            addrs.metrics,
            self.target_host.in_namespace()
        ));
        self.report.target_metrics_addr = addrs.metrics;

        let mut args = self.vm_args("target", &socket);
        args.push(format!("--run-ms={}", self.opts.run_ms));
        args.push(format!("--max-written-pages={}", self.opts.max_written_pages));
        let vm = self.target_host.spawn("vmm-standin-target", &self.binaries.vmm_standin, &args, self.log_dir)?;
        let vm = self.children.target_vm.insert(vm);
        wait_for(vm, "ready", deadline(self.opts.phase_timeout), |e| {
            matches!(e, StandinEvent::Ready { .. }).then_some(())
        })
        .await?;
        self.progress.say("target VM handed its memory to the target agent");
        self.report.setup_seconds = self.progress.seconds();
        Ok(client)
    }

    async fn precopy(&mut self, watch: &StatusWatch) -> Result<(), MigrationError> {
        let started = Instant::now();
        if !self.opts.chaos_in(ChaosPhase::Precopy).is_empty() {
            let precopy = |s: &crate::status_watch::PollState| {
                s.latest.as_ref().is_some_and(|status| status.phase >= MigrationPhase::Precopy as i32)
            };
            watch.wait_until("pre-copy to start", self.timeout(), precopy).await?;
            self.fire_chaos(ChaosPhase::Precopy, watch).await?;
        }
        let progress = &self.progress;
        let round_done = |round, dirty| progress.say(format!("pre-copy round {round}: {dirty} dirty pages"));
        watch.wait_precopy_converged(self.timeout(), round_done).await?;
        self.report.precopy_seconds = started.elapsed().as_secs_f64();
        self.progress.say(format!("pre-copy converged after {:.2} s", self.report.precopy_seconds));
        Ok(())
    }

    /// The optional source writes, the pause, and `Switchover`; returns when
    /// the pause was seen.
    async fn pause_and_switch_over(
        &mut self,
        client: &MigrationTargetClient<Channel>,
    ) -> Result<Instant, MigrationError> {
        let timeout = self.timeout();
        let vm = running(&mut self.children.source_vm, "source VM")?;
        for &page in &self.opts.write_before_pause {
            vm.send(&format!("write {page}")).await?;
            wait_for(vm, "written", deadline(timeout), |e| {
                matches!(e, StandinEvent::Written { page: p } if *p == page).then_some(())
            })
            .await?;
        }
        if !self.opts.write_before_pause.is_empty() {
            self.progress.say(format!("source wrote pages {:?} just before the pause", self.opts.write_before_pause));
        }
        if let Some((first, count)) = self.opts.write_range_before_pause {
            vm.send(&format!("write-range {first} {count}")).await?;
            wait_for(vm, "written-range", deadline(timeout), |e| {
                matches!(e, StandinEvent::WrittenRange { .. }).then_some(())
            })
            .await?;
            self.progress.say(format!("source wrote pages {first}..{} just before the pause", first + count));
        }
        if !self.opts.discard_before_pause.is_empty() {
            let pages: Vec<String> = self.opts.discard_before_pause.iter().map(u64::to_string).collect();
            vm.send(&format!("discard {}", pages.join(" "))).await?;
            wait_for(vm, "discarded", deadline(timeout), |e| matches!(e, StandinEvent::Discarded { .. }).then_some(()))
                .await?;
            self.progress
                .say(format!("the source VMM discarded pages {:?} before the pause", self.opts.discard_before_pause));
        }
        let paused = self.pause_source().await?;
        self.switchover(client, paused).await?;
        Ok(paused)
    }

    /// Pauses the source VM; returns when the pause was seen.
    async fn pause_source(&mut self) -> Result<Instant, MigrationError> {
        let vm = running(&mut self.children.source_vm, "source VM")?;
        vm.send("pause").await?;
        let at_ns = wait_for(vm, "paused", deadline(self.opts.phase_timeout), |e| match e {
            StandinEvent::Paused { at_ns } => Some(*at_ns),
            _ => None,
        })
        .await?;
        self.source_paused = true;
        self.report.paused_at_ns = at_ns;
        self.progress.say("source VM paused");
        Ok(Instant::now())
    }

    /// `Switchover`, timed from `paused`.
    async fn switchover(
        &mut self,
        client: &MigrationTargetClient<Channel>,
        paused: Instant,
    ) -> Result<(), MigrationError> {
        let reply = client
            .clone()
            .switchover(SwitchoverRequest {})
            .await
            .map_err(|status| MigrationError::Rpc { call: "Switchover", status: Box::new(status) })?
            .into_inner();
        self.report.switchover_rpc_ms = paused.elapsed().as_secs_f64() * 1e3;
        self.progress.say(format!(
            "switchover: target agent in phase {} ({:.2} ms)",
            reply.phase().label(),
            self.report.switchover_rpc_ms
        ));
        Ok(())
    }

    /// The optional concurrent touches, then the guest's run.
    async fn run_target_guest(
        &mut self,
        watch: &StatusWatch,
        client: &MigrationTargetClient<Channel>,
    ) -> Result<(), MigrationError> {
        let timeout = self.timeout();
        if self.opts.touch_after_final_bitmap {
            let applied = |s: &crate::status_watch::PollState| {
                s.latest.as_ref().is_some_and(|status| status.final_bitmap_applied)
            };
            watch.wait_until("the final bitmap", timeout, applied).await?;
        }
        let vm = running(&mut self.children.target_vm, "target VM")?;
        if !self.opts.discard_after_switchover.is_empty() {
            let pages: Vec<String> = self.opts.discard_after_switchover.iter().map(u64::to_string).collect();
            vm.send(&format!("discard {}", pages.join(" "))).await?;
            let discarded = wait_for(vm, "discarded", deadline(timeout), |e| {
                matches!(e, StandinEvent::Discarded { .. }).then_some(())
            });
            watch.unless_failed(discarded).await?;
            self.progress.say(format!("the target VMM discarded pages {:?}", self.opts.discard_after_switchover));
        }
        if !self.opts.touch_after_resume.is_empty() {
            let pages: Vec<String> = self.opts.touch_after_resume.iter().map(u64::to_string).collect();
            vm.send(&format!("touch {}", pages.join(" "))).await?;
            let touched =
                wait_for(vm, "touched", deadline(timeout), |e| matches!(e, StandinEvent::Touched { .. }).then_some(()));
            watch.unless_failed(touched).await?;
            let status = get_status(&mut client.clone()).await?;
            self.report.status_after_touch = Some(crate::report::StatusAfterTouch::from(&status));
            self.progress
                .say(format!("{} target vCPUs touched pages {:?}", self.opts.vcpus, self.opts.touch_after_resume));
        }
        // Reads spread over the vCPUs: a range, or listed pages shared in order.
        let shared = &self.opts.touch_shared_after_resume;
        let spreads = [
            self.opts
                .touch_spread_after_resume
                .map(|(first, count)| (format!("touch-spread {first} {count}"), "pages")),
            (!shared.is_empty()).then(|| {
                let pages: Vec<String> = shared.iter().map(u64::to_string).collect();
                (format!("touch-shared {}", pages.join(" ")), "listed pages")
            }),
        ];
        for (command, what) in spreads.into_iter().flatten() {
            vm.send(&command).await?;
            let touched = wait_for(vm, "touched-spread", deadline(timeout), |e| match e {
                StandinEvent::TouchedSpread { pages, nanos } => Some((*pages, *nanos)),
                _ => None,
            });
            let (pages, nanos) = watch.unless_failed(touched).await?;
            let seconds = nanos as f64 / 1e9;
            self.report.touch_spread = Some(crate::report::TouchSpread { pages, seconds });
            self.progress.say(format!(
                "{} target vCPUs read {pages} {what} in {:.1} ms",
                self.opts.vcpus,
                seconds * 1e3
            ));
        }
        if self.opts.idle_until_complete {
            watch.wait_until("phase complete", timeout, |s| s.complete_at.is_some()).await?;
            self.progress.say("the target guest stayed idle until the migration was complete");
        }
        // `resumed` comes at once; `guest-done` when the run is over.
        let vm = running(&mut self.children.target_vm, "target VM")?;
        vm.send("resume").await?;
        let run_deadline = deadline(timeout + Duration::from_millis(self.opts.run_ms));
        let resumed = wait_for(vm, "resumed", run_deadline, |e| matches!(e, StandinEvent::Resumed).then_some(()));
        watch.unless_failed(resumed).await?;
        self.fire_chaos(ChaosPhase::Postcopy, watch).await?;
        let vm = running(&mut self.children.target_vm, "target VM")?;
        let run = async {
            wait_for(vm, "guest-done", run_deadline, |e| match e {
                StandinEvent::GuestDone { first_access_done_ns, accesses, pages_written, pages_touched } => {
                    Some((*first_access_done_ns, *accesses, *pages_written, *pages_touched))
                }
                _ => None,
            })
            .await
        };
        let (first_access_done_ns, accesses, pages_written, pages_touched) = watch.unless_failed(run).await?;
        let report = &mut self.report;
        report.first_access_done_ns = first_access_done_ns;
        report.downtime_ms = first_access_done_ns.saturating_sub(report.paused_at_ns) as f64 / 1e6;
        report.guest_accesses = accesses;
        report.guest_pages_written = pages_written;
        report.guest_pages_touched = pages_touched;
        self.progress.say(format!(
            "target guest ran {} ms: {accesses} accesses, {pages_written} pages written; downtime {:.3} ms",
            self.opts.run_ms, self.report.downtime_ms
        ));
        Ok(())
    }

    /// Compares every page of the target with the source's snapshot.
    async fn verify(&mut self, watch: &StatusWatch) -> Result<(), MigrationError> {
        let (pages, mismatched) = watch.unless_failed(self.compare_with_snapshot(Scope::All)).await?;
        self.progress.say(format!("verified {pages} pages: {mismatched} mismatched"));
        Ok(())
    }

    /// Waits for "complete" and takes the final status.
    async fn complete(
        &mut self,
        watch: &StatusWatch,
        mut client: MigrationTargetClient<Channel>,
        paused: Instant,
    ) -> Result<(), MigrationError> {
        let state = watch.wait_until("phase complete", self.timeout(), |s| s.complete_at.is_some()).await?;
        let complete_at = state.complete_at.unwrap_or_else(Instant::now);
        self.report.postcopy_seconds = complete_at.saturating_duration_since(paused).as_secs_f64();
        self.progress.say(format!("post-copy complete {:.2} s after the pause", self.report.postcopy_seconds));
        let status = get_status(&mut client).await?;
        self.apply_final_status(&status);
        Ok(())
    }
}
