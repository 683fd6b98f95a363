//! Firing the chaos events of a migration ([`crate::chaos`]) at their
//! phase's point, and recording what each did.

use std::path::PathBuf;
use std::time::Instant;

use pageserver_proto::v1::GetStatusRequest;
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use rustix::process::Signal;
use tonic::transport::Channel;
use vmm_standin::StandinEvent;

use super::waits::{deadline, wait_for};
use super::{Migration, MigrationError, running};
use crate::chaos::{ChaosEvent, ChaosKind, ChaosPhase, ChaosRecord};
use crate::process::ChildProcess;
use crate::resources::ProcessResources;
use crate::status_watch::StatusWatch;
use crate::tls::DemoTls;

/// What firing an event did.
pub(super) struct Fired {
    pub outcome: String,
    /// See [`ChaosRecord::source_down_seen`].
    pub source_down_seen: Option<bool>,
}

impl From<String> for Fired {
    fn from(outcome: String) -> Self {
        Self { outcome, source_down_seen: None }
    }
}

impl Migration<'_> {
    /// Fires every event of `phase`, in the order given.
    pub(super) async fn fire_chaos(&mut self, phase: ChaosPhase, watch: &StatusWatch) -> Result<(), MigrationError> {
        for event in self.opts.chaos_in(phase) {
            if self.report.chaos.is_empty() {
                self.target_agent_before_chaos = self.sample_target_agent();
            }
            let record = ChaosRecord {
                event: event.to_string(),
                fired_at_s: self.progress.seconds(),
                target_phase: self.target_phase_now(watch).await,
                ..ChaosRecord::default()
            };
            self.progress.say(format!("CHAOS {event} (target agent in phase {})", record.target_phase));
            let Fired { outcome, source_down_seen } = self.fire(event, watch).await?;
            self.progress.say(format!("CHAOS {event}: {outcome}"));
            self.report.chaos.push(ChaosRecord { outcome, source_down_seen, ..record });
        }
        Ok(())
    }

    /// The target agent's resources now, with its pid.
    fn sample_target_agent(&self) -> Option<(u32, ProcessResources)> {
        let pid = self.children.target_agent.as_ref()?.id()?;
        ProcessResources::of(pid).ok().map(|r| (pid, r))
    }

    /// Samples the target agent at the end; into the report if it is the
    /// same process as before the first chaos event.
    pub(super) fn sample_agents_at_end(&mut self) {
        for (side, agent) in [("source", &self.children.source_agent), ("target", &self.children.target_agent)] {
            if let Some(resources) =
                agent.as_ref().and_then(ChildProcess::id).and_then(|pid| ProcessResources::of(pid).ok())
            {
                self.report.agent_resources.insert(side.to_owned(), resources);
            }
        }
        self.sample_target_agent_at_end();
    }

    fn sample_target_agent_at_end(&mut self) {
        if let (Some((pid, before)), Some((now_pid, after))) =
            (self.target_agent_before_chaos, self.sample_target_agent())
            && pid == now_pid
        {
            self.report.target_agent_resources = Some([before, after]);
        }
    }

    /// The target agent's phase right now (the watch's last poll if it
    /// cannot be asked).
    async fn target_phase_now(&self, watch: &StatusWatch) -> String {
        let Some(channel) = self.target_channel.clone() else { return watch.current().phase().to_owned() };
        match MigrationTargetClient::new(channel).get_status(GetStatusRequest {}).await {
            Ok(status) => status.into_inner().phase().label().to_owned(),
            Err(_) => watch.current().phase().to_owned(),
        }
    }

    async fn fire(&mut self, event: ChaosEvent, watch: &StatusWatch) -> Result<Fired, MigrationError> {
        let failed = |why: String| MigrationError::Chaos { event: event.to_string(), why };
        let outcome = match event.kind {
            ChaosKind::KillSourceAgent => {
                running(&mut self.children.source_agent, "source agent")?.kill().await;
                let started = Instant::now();
                self.start_source_agent_again(None).await?;
                let handoffs = self.wait_for_source_handoff().await?;
                format!(
                    "SIGKILLed the source agent; a new one took the VM's memory over (hand-off {handoffs}) {:.0} ms \
                     later",
                    started.elapsed().as_secs_f64() * 1e3
                )
            }
            ChaosKind::StopSourceAgent { stopped } => {
                let agent = running(&mut self.children.source_agent, "source agent")?;
                agent.signal(Signal::STOP)?;
                tokio::time::sleep(stopped).await;
                agent.signal(Signal::CONT)?;
                format!("SIGSTOPped the source agent for {} ms, then SIGCONT", stopped.as_millis())
            }
            ChaosKind::ImpostorSourceAgent => {
                running(&mut self.children.source_agent, "source agent")?.kill().await;
                let other_vm = self.work.join("another-vm.mem");
                let file =
                    std::fs::File::create(&other_vm).map_err(|e| failed(format!("creating {other_vm:?}: {e}")))?;
                file.set_len(self.opts.memory_bytes).map_err(|e| failed(format!("sizing {other_vm:?}: {e}")))?;
                self.start_source_agent_again(Some(other_vm)).await?;
                "SIGKILLed the source agent; another VM's memory (same name, same layout) is served on its \
                 address: the target must refuse it"
                    .to_owned()
            }
            ChaosKind::KillTargetAgent => {
                running(&mut self.children.target_agent, "target agent")?.kill().await;
                let started = Instant::now();
                let name = format!("target-agent-{}", self.report.chaos.len() + 2);
                let args = self.target_agent_args.clone();
                let agent = self.target_host.spawn(&name, &self.binaries.target_agent, &args, self.log_dir)?;
                let agent = self.children.target_agent.insert(agent);
                agent.wait_listening(deadline(self.opts.phase_timeout)).await?;
                let vm = running(&mut self.children.target_vm, "target VM")?;
                let handoffs = wait_for(vm, "handed-off", deadline(self.opts.phase_timeout), |e| match e {
                    StandinEvent::HandedOff { handoffs } => Some(*handoffs),
                    _ => None,
                })
                .await?;
                self.report.handoffs.insert("target".to_owned(), u64::from(handoffs));
                format!(
                    "SIGKILLed the target agent; a new one took the guest's memory over (hand-off {handoffs}) {:.0} \
                     ms later",
                    started.elapsed().as_secs_f64() * 1e3
                )
            }
            ChaosKind::KillSourceVmm => {
                // The snapshot the verification compares with is the VMM's.
                self.wait_for_snapshot().await?;
                running(&mut self.children.source_vm, "source VM")?.kill().await;
                "SIGKILLed the paused source VMM; its agent keeps the VM's memory, which can no longer change"
                    .to_owned()
            }
            ChaosKind::KillSourceSide => {
                self.wait_for_snapshot().await?;
                running(&mut self.children.source_vm, "source VM")?.kill().await;
                running(&mut self.children.source_agent, "source agent")?.kill().await;
                "SIGKILLed the source VMM and the source agent: the stale pages are gone; the target must fail and \
                 freeze the guest"
                    .to_owned()
            }
            ChaosKind::SwitchoverBeforePause => "Switchover was called before the source VM paused".to_owned(),
            ChaosKind::LinkDown { down } => return self.link_down(watch, down).await,
            ChaosKind::LinkLoss { percent, lasting } => self.link_loss(watch, percent, lasting).await?,
            ChaosKind::LinkReset => self.link_reset(watch).await?,
            ChaosKind::RotateCertificates => {
                let tls = self.tls.as_ref().ok_or_else(|| failed("the agents run without TLS".to_owned()))?;
                tls.rotate().map_err(|e| failed(pageserver_agent_shell::exit::describe(&e)))?;
                running(&mut self.children.source_agent, "source agent")?.signal(Signal::HUP)?;
                running(&mut self.children.target_agent, "target agent")?.signal(Signal::HUP)?;
                "replaced both agents' certificates and keys with new ones from the same CA, then SIGHUP: new \
                 connections use them, the ones made go on"
                    .to_owned()
            }
        };
        Ok(outcome.into())
    }

    /// Starts a source agent on the address and socket of the first one:
    /// for the same VMM, or serving `memory_file` (another VM's memory).
    async fn start_source_agent_again(&mut self, memory_file: Option<PathBuf>) -> Result<(), MigrationError> {
        let addrs = self.source_addrs.clone().ok_or(MigrationError::NotStarted("source agent"))?;
        let mut args = vec![format!("--listen={}", addrs.grpc), format!("--metrics-listen={}", addrs.metrics)];
        let is_impostor = memory_file.is_some();
        match memory_file {
            None => args.extend(self.source_agent_args.iter().cloned()),
            Some(path) => args.extend([
                format!("--memory-file={}", path.display()),
                format!("--page-size={}", self.opts.page_size()),
                format!("--vm={}", self.opts.vm_name),
            ]),
        }
        if is_impostor {
            // An impostor with a certificate from the same CA: only the
            // target's fence on the memory's identity stops it.
            args.extend(self.tls_args(DemoTls::source_args));
        }
        let name = format!("source-agent-{}", self.report.chaos.len() + 2);
        let agent = self.source_host.spawn(&name, &self.binaries.source_agent, &args, self.log_dir)?;
        let agent = self.children.source_agent.insert(agent);
        agent.wait_listening(deadline(self.opts.phase_timeout)).await?;
        Ok(())
    }

    /// Waits until the source VM has handed its memory to a new agent;
    /// returns its hand-off count.
    async fn wait_for_source_handoff(&mut self) -> Result<u32, MigrationError> {
        let vm = running(&mut self.children.source_vm, "source VM")?;
        let mut snapshot_written = false;
        let handoffs = wait_for(vm, "handed-off", deadline(self.opts.phase_timeout), |e| match e {
            StandinEvent::HandedOff { handoffs } => Some(*handoffs),
            StandinEvent::SnapshotWritten { .. } => {
                snapshot_written = true;
                None
            }
            _ => None,
        })
        .await?;
        self.snapshot_written |= snapshot_written;
        self.report.handoffs.insert("source".to_owned(), u64::from(handoffs));
        Ok(handoffs)
    }

    /// `Switchover` while the source VM still runs (chaos
    /// `switchover-before-pause`); the pause comes only if the migration
    /// fails (for the comparison). Returns when `Switchover` was called.
    pub(super) async fn switch_over_before_pause(
        &mut self,
        client: &MigrationTargetClient<Channel>,
    ) -> Result<Instant, MigrationError> {
        let called = Instant::now();
        self.progress.say("CHAOS: Switchover before the source VM is paused");
        self.switchover(client, called).await?;
        Ok(called)
    }
}
