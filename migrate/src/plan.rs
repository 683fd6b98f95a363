//! What one migration is given ([`MigrationPlan`]) and the steps it takes
//! ([`Step`]), in order: what `--dry-run` prints and what the progress
//! lines and errors name.
#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use crate::qmp::QmpAddress;

/// Where everything is.
#[derive(Debug, Clone)]
pub struct MigrationPlan {
    /// The source agent's gRPC URL (`https://NAME:PORT`, or `http://` in
    /// plaintext).
    pub source_agent: String,
    /// The target agent's gRPC URL.
    pub target_agent: String,
    /// The source QEMU's QMP.
    pub source_qmp: QmpAddress,
    /// The target QEMU's QMP; that QEMU was started with `-incoming defer`
    /// and the VMM shim (role `target`).
    pub target_qmp: QmpAddress,
    /// QEMU's own migration stream (the device state), as the source QEMU
    /// dials it: `tcp:HOST:PORT`.
    pub migration_uri: String,
    /// What the target QEMU listens on (`migrate-incoming`), if not
    /// `migration_uri` (e.g. `tcp:0.0.0.0:4445` behind a Service's name).
    pub incoming_uri: Option<String>,
    /// The longest each step may take.
    pub step_timeout: Duration,
    /// Wait, after the VM runs on the target, until the target agent holds
    /// every page (post-copy complete) before reporting.
    pub wait_postcopy: bool,
}

impl MigrationPlan {
    /// The target QEMU's `migrate-incoming` URI.
    pub fn incoming(&self) -> &str {
        self.incoming_uri.as_deref().unwrap_or(&self.migration_uri)
    }
}

/// The steps, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Both QMPs answer; the source VM runs, the target QEMU waits for an
    /// incoming migration.
    CheckVmms,
    /// Both agents answer; the target agent has the target VM's memory.
    CheckAgents,
    /// Target QEMU: `x-ignore-shared`, `migrate-incoming`.
    StartIncoming,
    /// The target agent pre-copies the guest's memory until it converges.
    AwaitPrecopy,
    /// Source QEMU: `x-ignore-shared`, `pause-before-switchover`, `migrate`.
    StartMigrate,
    /// Source QEMU: status `pre-switchover` (its vCPUs stopped).
    AwaitPreSwitchover,
    /// The source agent is told the VM is paused (`SetPaused`).
    PauseSource,
    /// The target agent switches over (`Switchover`): from here on it
    /// resolves the target guest's faults.
    Switchover,
    /// Source QEMU: `migrate-continue`; the device state moves and the
    /// target VM runs.
    Continue,
    /// The target agent holds every page (post-copy complete).
    AwaitPostcopy,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::CheckVmms,
        Step::CheckAgents,
        Step::StartIncoming,
        Step::AwaitPrecopy,
        Step::StartMigrate,
        Step::AwaitPreSwitchover,
        Step::PauseSource,
        Step::Switchover,
        Step::Continue,
        Step::AwaitPostcopy,
    ];

    /// A short name, for progress lines, errors and the report.
    pub fn name(self) -> &'static str {
        match self {
            Step::CheckVmms => "check-vmms",
            Step::CheckAgents => "check-agents",
            Step::StartIncoming => "start-incoming",
            Step::AwaitPrecopy => "await-precopy",
            Step::StartMigrate => "start-migrate",
            Step::AwaitPreSwitchover => "await-pre-switchover",
            Step::PauseSource => "pause-source",
            Step::Switchover => "switchover",
            Step::Continue => "continue",
            Step::AwaitPostcopy => "await-postcopy",
        }
    }

    /// What the step does, with the plan's addresses.
    pub fn describe(self, plan: &MigrationPlan) -> String {
        let (sq, tq) = (&plan.source_qmp, &plan.target_qmp);
        let (sa, ta, uri) = (&plan.source_agent, &plan.target_agent, &plan.migration_uri);
        let incoming = plan.incoming();
        match self {
            Step::CheckVmms => {
                format!("QMP {sq}: the source VM is running; QMP {tq}: the target QEMU waits for an incoming migration")
            }
            Step::CheckAgents => format!("GetStatus on the target agent {ta} and the source agent {sa}"),
            Step::StartIncoming => {
                format!("QMP {tq}: migrate-set-capabilities x-ignore-shared; migrate-incoming {incoming}")
            }
            Step::AwaitPrecopy => format!("wait until the target agent {ta} reports pre-copy converged"),
            Step::StartMigrate => {
                format!("QMP {sq}: migrate-set-capabilities x-ignore-shared, pause-before-switchover; migrate {uri}")
            }
            Step::AwaitPreSwitchover => {
                format!("QMP {sq}: wait for migration status pre-switchover (the source vCPUs are stopped)")
            }
            Step::PauseSource => format!("SetPaused(true) on the source agent {sa}"),
            Step::Switchover => format!("Switchover on the target agent {ta}, until its status shows it"),
            Step::Continue => {
                format!("QMP {sq}: migrate-continue; wait for status completed (the target VM runs)")
            }
            Step::AwaitPostcopy if plan.wait_postcopy => {
                format!("wait until the target agent {ta} reports post-copy complete (every page on the target)")
            }
            Step::AwaitPostcopy => "(--no-wait-postcopy: not waiting for post-copy to complete)".to_owned(),
        }
    }

    /// Whether the source VM may still be resumed when this step fails:
    /// until the source QEMU sends the device state, the target VM cannot
    /// have run, and the source's memory is still the VM's.
    pub fn before_device_state(self) -> bool {
        self < Step::Continue
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--dry-run` text: every step, numbered, with the plan's addresses,
/// and what a failure at each point would leave.
pub fn dry_run(plan: &MigrationPlan, transport: &str) -> String {
    let mut text = format!(
        "pageserver-migrate --dry-run: nothing is contacted; a migration would take these steps ({transport}, at \
         most {:?} each):\n",
        plan.step_timeout
    );
    for (number, step) in Step::ALL.iter().enumerate() {
        text.push_str(&format!("{:2}. {:<21} {}\n", number + 1, step.name(), step.describe(plan)));
    }
    text.push_str(
        "On a failure up to pause-source the migration is cancelled and the VM runs on the source again; from \
         switchover on, before continue, the same; from continue on the source stays paused (the VM runs on the \
         target, or is paused on both if it does not).\n",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> MigrationPlan {
        MigrationPlan {
            source_agent: "https://source.example:50051".into(),
            target_agent: "https://target.example:50051".into(),
            source_qmp: "/run/vm/source.qmp".parse().expect("a path"),
            target_qmp: "tls:target.example:4444".parse().expect("tls:HOST:PORT"),
            migration_uri: "tcp:10.0.0.2:4445".into(),
            incoming_uri: Some("tcp:0.0.0.0:4445".into()),
            step_timeout: Duration::from_secs(60),
            wait_postcopy: true,
        }
    }

    #[test]
    fn the_steps_are_in_order_and_only_the_last_two_come_after_the_device_state() {
        let mut sorted = Step::ALL;
        sorted.sort();
        assert_eq!(sorted, Step::ALL);
        let after: Vec<Step> = Step::ALL.into_iter().filter(|step| !step.before_device_state()).collect();
        assert_eq!(after, [Step::Continue, Step::AwaitPostcopy]);
    }

    #[test]
    fn the_dry_run_names_every_step_and_address() {
        let text = dry_run(&plan(), "mutual TLS");
        for step in Step::ALL {
            assert!(text.contains(step.name()), "{step} missing from:\n{text}");
        }
        for needle in [
            "/run/vm/source.qmp",
            "tls:target.example:4444",
            "migrate tcp:10.0.0.2:4445",
            "migrate-incoming tcp:0.0.0.0:4445",
            "https://target.example:50051",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
