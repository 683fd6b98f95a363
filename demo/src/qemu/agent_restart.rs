//! `--chaos kill-target-agent@PHASE` with QEMU: the target agent is
//! SIGKILLed at PHASE and a new one started on the same hand-off socket; the
//! VMM shim in the target QEMU notices the hand-off connection's end and
//! hands the guest's memory, uffd and pagemap over again, with the dead
//! agent's checkpoint (see `docs/ARCHITECTURE.md`, "Recovery").

use std::path::Path;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use tonic::transport::Channel;

use super::Qemus;
use super::error::QemuError;
use crate::chaos::{ChaosEvent, ChaosKind, ChaosPhase, ChaosRecord};
use crate::process::ChildProcess;

/// What the shim prints on QEMU's stderr once a new agent has the memory
/// (`vmm-shim/src/handoff.rs`), followed by `(hand-off N)`.
const HANDED_OVER_AGAIN: &str = "memory handed over again to a new Target agent (hand-off ";
/// How often QEMU's log is read while waiting for the hand-off.
const LOG_POLL: Duration = Duration::from_millis(10);

/// The chaos kinds a QEMU migration can rehearse.
pub fn supported(event: &ChaosEvent) -> bool {
    event.kind == ChaosKind::KillTargetAgent
}

/// The target agent a QEMU migration talks to; replaced by [`Qemus::fire_chaos`].
pub(super) struct TargetAgent {
    pub client: MigrationTargetClient<Channel>,
    /// Its position in the children (for the kill).
    pub child: usize,
}

impl Qemus<'_> {
    /// Fires the chaos events of `phase`: each kills the target agent and
    /// waits until a new one has the guest's memory from the shim. Whether
    /// any fired (the agent, and so its address, changed).
    pub(super) async fn fire_chaos(
        &self,
        phase: ChaosPhase,
        agent: &mut TargetAgent,
        agent_args: &[String],
        children: &mut Vec<ChildProcess>,
        records: &mut Vec<ChaosRecord>,
        handoffs: &mut Option<u64>,
    ) -> Result<bool, QemuError> {
        let mut fired = false;
        for event in self.opts.chaos.iter().filter(|e| e.phase == phase) {
            let fired_at_s = self.progress.seconds();
            self.progress.say(format!("CHAOS {event}"));
            children[agent.child].kill().await;
            let started = Instant::now();
            let name = format!("target-agent-{}", records.len() + 2);
            let addr = self.start_agent(&name, &self.binaries.target_agent, agent_args, children).await?;
            let handed_off = self.wait_handed_over_again(*handoffs).await?;
            *handoffs = Some(handed_off);
            let client = self.target_client(&addr).await?;
            *agent = TargetAgent { client, child: children.len() - 1 };
            let outcome = format!(
                "SIGKILLed the target agent; a new one took the guest's memory over from the shim (hand-off \
                 {handed_off}) {:.0} ms later",
                started.elapsed().as_secs_f64() * 1e3
            );
            self.progress.say(format!("CHAOS {event}: {outcome}"));
            records.push(ChaosRecord {
                event: event.to_string(),
                fired_at_s,
                target_phase: phase.name().to_owned(),
                outcome,
                ..ChaosRecord::default()
            });
            fired = true;
        }
        Ok(fired)
    }

    /// Waits for the shim's "handed over again" line beyond hand-off
    /// `after` in the target QEMU's log; returns its hand-off count.
    async fn wait_handed_over_again(&self, after: Option<u64>) -> Result<u64, QemuError> {
        let log = self.work.join("qemu-target.log");
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if let Some(handoffs) = last_handoff(&log)
                && Some(handoffs) > after
            {
                return Ok(handoffs);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::NotHandedOverAgain { log, after: self.opts.timeout });
            }
            tokio::time::sleep(LOG_POLL).await;
        }
    }
}

/// The hand-off count of the shim's last "handed over again" line in `log`.
fn last_handoff(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|line| line.contains(HANDED_OVER_AGAIN))?;
    let rest = &line[line.find(HANDED_OVER_AGAIN)? + HANDED_OVER_AGAIN.len()..];
    rest.split(')').next()?.parse().ok()
}
