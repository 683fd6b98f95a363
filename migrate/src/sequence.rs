//! The migration itself: the [`Step`]s in order, each bounded by the
//! plan's timeout and by the stop signal, and on any failure the VM put
//! in the safest state there is ([`crate::settle`]).
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_source_client::MigrationSourceClient;
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, GetStatusRequest, MigrationPhase, SetPausedRequest, SwitchoverRequest};
use pageserver_tls::ClientTls;
use serde_json::json;
use tonic::transport::Channel;

use crate::error::{MigrateError, StepError, qmp, rpc};
use crate::plan::{MigrationPlan, Step};
use crate::progress::Progress;
use crate::qmp::Qmp;
use crate::report::Report;
use crate::status_watch::{PollState, StatusError, StatusWatch, phase};

/// What the caller may do between steps: the demo's chaos events kill the
/// target agent there and start a new one.
pub trait Hooks {
    /// Runs after `step` succeeded. A new target agent client replaces the
    /// one in use (the agent was replaced); an error fails the step.
    fn after(&mut self, step: Step) -> impl Future<Output = Result<Option<MigrationTargetClient<Channel>>, String>>;
}

/// No hooks: what `pageserver-migrate` runs.
#[derive(Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    async fn after(&mut self, _: Step) -> Result<Option<MigrationTargetClient<Channel>>, String> {
        Ok(None)
    }
}

/// A completed migration.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The target agent's final status, and the phases' timings.
    pub report: Report,
    /// From the target's `migrate-incoming` to the target agent's
    /// post-copy complete (or the end, without waiting for it), s.
    pub migration_seconds: f64,
    /// The target QEMU's run state after the migration (`running`, or
    /// `paused` for a QEMU started with `-S`).
    pub target_run_state: String,
}

/// What the stop future looks like: completes with what stopped the run.
pub type Stop = Pin<Box<dyn Future<Output = String> + Send>>;

/// How long the target agent has to report a Switchover in its status
/// before it is asked again (the call is idempotent).
const SWITCHOVER_SEEN_WITHIN: Duration = Duration::from_secs(2);

/// How long a QMP socket may take to appear (a QEMU just started).
const QMP_SOCKET_PATIENCE: Duration = Duration::from_secs(10);

/// A gRPC channel to an agent at `url`, as the orchestrator (`tls`) or in
/// the clear; connects now, so an unreachable agent fails the step that
/// needs it.
pub async fn agent_channel(url: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let endpoint = pageserver_tls::endpoint(url)?;
    let connector = pageserver_tls::connector(tls.cloned(), pageserver_tls::client::dial_tcp());
    endpoint.connect_with_connector(connector).await
}

/// What has been done so far: what [`crate::settle`] needs to undo it.
#[derive(Debug, Default)]
pub(crate) struct Done {
    pub source_qmp: Option<Qmp>,
    pub target_qmp: Option<Qmp>,
    pub source: Option<MigrationSourceClient<Channel>>,
    /// The source VM's run state at the start (`running` or `paused`).
    pub source_run_state_before: Option<String>,
    /// `migrate` was sent to the source QEMU (perhaps without a reply).
    pub migrate_sent: bool,
    /// `SetPaused(true)` was sent to the source agent.
    pub source_agent_paused: bool,
}

/// Runs the migration `plan` describes; see the module docs.
pub async fn migrate(
    plan: &MigrationPlan,
    tls: Option<&ClientTls>,
    progress: &Progress,
    hooks: &mut impl Hooks,
    stop: Stop,
) -> Result<Migrated, MigrateError> {
    let mut done = Done::default();
    let mut stop = stop;
    match run(plan, tls, progress, hooks, &mut stop, &mut done).await {
        Ok(migrated) => Ok(migrated),
        Err((step, cause)) => {
            progress.say(format!("step {step} failed: {}", pageserver_agent_shell::exit::describe(&cause)));
            let vm = crate::settle::settle(step, &mut done, plan.step_timeout, progress).await;
            Err(MigrateError { step, cause, vm })
        }
    }
}

/// `step` bounded by `timeout` and by `stop`.
async fn bounded<T>(
    step: Step,
    timeout: Duration,
    stop: &mut Stop,
    work: impl Future<Output = Result<T, StepError>>,
) -> Result<T, (Step, StepError)> {
    tokio::select! {
        result = tokio::time::timeout(timeout, work) => match result {
            Ok(result) => result.map_err(|cause| (step, cause)),
            Err(_) => Err((step, StepError::Timeout { step, after: timeout })),
        },
        by = stop => Err((step, StepError::Interrupted(by))),
    }
}

async fn run(
    plan: &MigrationPlan,
    tls: Option<&ClientTls>,
    progress: &Progress,
    hooks: &mut impl Hooks,
    stop: &mut Stop,
    done: &mut Done,
) -> Result<Migrated, (Step, StepError)> {
    let t = plan.step_timeout;
    let say = |step: Step, what: String| progress.say(format!("{:<21} {what}", step.name()));

    // The two VMMs.
    let step = Step::CheckVmms;
    // A QEMU just started may not have made its socket yet; one that will
    // never make it fails with the socket's error, not the step's timeout.
    let patience = (t / 4).min(QMP_SOCKET_PATIENCE);
    let (source_state, target_state) = bounded(step, t, stop, async {
        let mut source = Qmp::connect(&plan.source_qmp, tls, patience).await.map_err(qmp("source"))?;
        let source_state = source.run_state().await.map_err(qmp("source"))?;
        done.source_qmp = Some(source);
        let mut target = Qmp::connect(&plan.target_qmp, tls, patience).await.map_err(qmp("target"))?;
        let target_state = target.run_state().await.map_err(qmp("target"))?;
        done.target_qmp = Some(target);
        Ok((source_state, target_state))
    })
    .await?;
    if source_state != "running" && source_state != "paused" {
        return Err((step, StepError::VmmState { vmm: "source", state: source_state, wanted: "running or paused" }));
    }
    if target_state != "inmigrate" {
        let wanted = "inmigrate (started with -incoming defer)";
        return Err((step, StepError::VmmState { vmm: "target", state: target_state, wanted }));
    }
    done.source_run_state_before = Some(source_state.clone());
    say(step, format!("source QEMU {source_state}, target QEMU {target_state}"));

    // The two agents.
    let step = Step::CheckAgents;
    let (mut target, layout) = bounded(step, t, stop, async {
        let connect = |agent, url: &str| {
            let url = url.to_owned();
            async move { agent_channel(&url, tls).await.map_err(|source| StepError::Connect { agent, url, source }) }
        };
        let source_channel = connect("source", &plan.source_agent).await?;
        let layout = PageServerClient::new(source_channel.clone())
            .get_layout(GetLayoutRequest {})
            .await
            .map_err(rpc("source", "GetLayout"))?
            .into_inner();
        done.source = Some(MigrationSourceClient::new(source_channel));
        let target = MigrationTargetClient::new(connect("target", &plan.target_agent).await?);
        Ok((target, layout))
    })
    .await?;
    let mut watch = StatusWatch::start(target.clone());
    // Pre-copying, or further (refused below): past waiting for the hand-off.
    let copying = |s: &PollState| s.latest.as_ref().is_some_and(|status| phase::of(status) >= MigrationPhase::Precopy);
    let state =
        bounded(step, t, stop, async { Ok(watch.wait_until("the target agent's pre-copy", t, copying).await?) })
            .await?;
    let target_phase = state.latest.as_ref().map(phase::of).unwrap_or(MigrationPhase::Unspecified);
    if target_phase > MigrationPhase::PrecopyConverged {
        let wanted = "pre-copying (an agent that switched over already belongs to another migration)";
        return Err((step, StepError::AgentPhase { phase: target_phase.label().to_owned(), wanted }));
    }
    say(
        step,
        format!(
            "source agent serves {} pages of {} bytes; target agent is {}",
            layout.total_pages,
            layout.page_size,
            target_phase.label()
        ),
    );

    // Incoming side.
    let step = Step::StartIncoming;
    bounded(step, t, stop, async {
        let target_qmp = done.target_qmp.as_mut().expect("connected in check-vmms");
        target_qmp.set_capabilities(&[("x-ignore-shared", true)]).await.map_err(qmp("target"))?;
        target_qmp.execute("migrate-incoming", json!({ "uri": plan.incoming() })).await.map_err(qmp("target"))?;
        Ok(())
    })
    .await?;
    let incoming_at = Instant::now();
    say(step, format!("the target QEMU listens on {}", plan.incoming()));
    if let Some(client) = hooks.after(step).await.map_err(|message| (step, StepError::Hook { step, message }))? {
        (target, watch) = (client.clone(), StatusWatch::start(client));
    }

    let step = Step::AwaitPrecopy;
    let round_done = |round, dirty| say(step, format!("pre-copy round {round}: {dirty} dirty pages"));
    bounded(step, t, stop, async { Ok(watch.wait_precopy_converged(t, round_done).await?) }).await?;
    let precopy_seconds = incoming_at.elapsed().as_secs_f64();
    say(step, "pre-copy converged".to_owned());

    // The source's side.
    let step = Step::StartMigrate;
    bounded(step, t, stop, async {
        let source_qmp = done.source_qmp.as_mut().expect("connected in check-vmms");
        source_qmp
            .set_capabilities(&[("x-ignore-shared", true), ("pause-before-switchover", true)])
            .await
            .map_err(qmp("source"))?;
        done.migrate_sent = true;
        source_qmp.execute("migrate", json!({ "uri": plan.migration_uri })).await.map_err(qmp("source"))?;
        Ok(())
    })
    .await?;
    say(step, "the source QEMU migrates its device state".to_owned());

    let step = Step::AwaitPreSwitchover;
    bounded(step, t, stop, async {
        let source_qmp = done.source_qmp.as_mut().expect("connected in check-vmms");
        let pre_switchover = source_qmp.wait_migration_status("pre-switchover", t);
        watch.unless_failed(async { pre_switchover.await.map_err(qmp("source")) }).await
    })
    .await?;
    let paused_at = Instant::now();
    say(step, "the source vCPUs are stopped".to_owned());

    let step = Step::PauseSource;
    bounded(step, t, stop, async {
        let source = done.source.as_mut().expect("connected in check-agents");
        // Paused unless the agent answered that it refused: a call that
        // failed on the way may have reached it.
        done.source_agent_paused = true;
        let reply = source.set_paused(SetPausedRequest { paused: true }).await;
        if let Err(status) = &reply
            && refused(status.code())
        {
            done.source_agent_paused = false;
        }
        reply.map_err(rpc("source", "SetPaused"))?;
        Ok(())
    })
    .await?;
    say(step, "the source agent knows the VM is paused".to_owned());
    if let Some(client) = hooks.after(step).await.map_err(|message| (step, StepError::Hook { step, message }))? {
        (target, watch) = (client.clone(), StatusWatch::start(client));
    }

    let step = Step::Switchover;
    let switchover_started = Instant::now();
    bounded(step, t, stop, switch_over(&mut target, &watch, t, progress)).await?;
    let switchover_rpc_ms = switchover_started.elapsed().as_secs_f64() * 1e3;
    say(step, format!("the target agent switched over in {switchover_rpc_ms:.1} ms"));
    if let Some(client) = hooks.after(step).await.map_err(|message| (step, StepError::Hook { step, message }))? {
        (target, watch) = (client.clone(), StatusWatch::start(client));
    }

    let step = Step::Continue;
    let target_run_state = bounded(step, t, stop, async {
        let source_qmp = done.source_qmp.as_mut().expect("connected in check-vmms");
        source_qmp.execute("migrate-continue", json!({ "state": "pre-switchover" })).await.map_err(qmp("source"))?;
        let completed = source_qmp.wait_migration_status("completed", t);
        watch.unless_failed(async { completed.await.map_err(qmp("source")) }).await?;
        let target_qmp = done.target_qmp.as_mut().expect("connected in check-vmms");
        target_qmp.run_state().await.map_err(qmp("target"))
    })
    .await?;
    // QEMU gives no "first guest access" event: downtime here runs from
    // the source's pre-switchover pause to the migration's completion.
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    say(
        step,
        format!("migration completed {downtime_ms:.1} ms after the pause; the target QEMU is {target_run_state}"),
    );

    let step = Step::AwaitPostcopy;
    if plan.wait_postcopy {
        bounded(step, t, stop, async {
            Ok(watch.wait_until("post-copy to complete", t, |s| s.complete_at.is_some()).await?)
        })
        .await?;
        say(step, "the target agent holds every page".to_owned());
    }
    let end = watch.current().complete_at.unwrap_or_else(Instant::now);
    let status = bounded(step, t, stop, async {
        Ok(target.get_status(GetStatusRequest {}).await.map_err(rpc("target", "GetStatus"))?.into_inner())
    })
    .await?;
    let mut report = Report::default();
    report.apply_status(&status);
    report.guest_bytes = layout.total_pages * layout.page_size;
    report.downtime_ms = downtime_ms;
    report.precopy_seconds = precopy_seconds;
    report.switchover_rpc_ms = switchover_rpc_ms;
    report.postcopy_seconds = end.saturating_duration_since(paused_at).as_secs_f64();
    report.total_seconds = progress.seconds();
    report.transport = if tls.is_some() { "mutual TLS" } else { "plaintext" }.to_owned();
    let migration_seconds = end.saturating_duration_since(incoming_at).as_secs_f64();
    Ok(Migrated { report, migration_seconds, target_run_state })
}

/// Whether a call that failed with `code` was refused by the server
/// (nothing done), rather than lost on the way or cut short.
fn refused(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        PermissionDenied | Unauthenticated | InvalidArgument | FailedPrecondition | Unimplemented | ResourceExhausted
    )
}

/// `Switchover` until the target agent's status says it switched over (at
/// least once: the call is idempotent), each call bounded, all of it within
/// `timeout`. Once, in CI, a Switchover to a target agent that had just
/// taken over from a killed one left the agent waiting for it for minutes;
/// the agent logs each Switchover it gets, so a repeat shows where it
/// went, and this never waits unbounded.
async fn switch_over(
    client: &mut MigrationTargetClient<Channel>,
    watch: &StatusWatch,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), StepError> {
    let deadline = Instant::now() + timeout;
    let switched =
        |s: &PollState| s.latest.as_ref().is_some_and(|status| phase::of(status) >= MigrationPhase::Postcopy);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.switchover(SwitchoverRequest::default())).await {
            Ok(reply) => drop(reply.map_err(rpc("target", "Switchover"))?),
            Err(_) => return Err(StepError::SwitchoverUnseen { after: timeout }),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match watch.wait_until("the switchover", SWITCHOVER_SEEN_WITHIN.min(left), switched).await {
            Ok(_) => return Ok(()),
            Err(StatusError::Timeout { .. }) if Instant::now() < deadline => {
                progress.say("the target agent does not report the switchover yet: asking again");
            }
            Err(StatusError::Timeout { .. }) => return Err(StepError::SwitchoverUnseen { after: timeout }),
            Err(other) => return Err(other.into()),
        }
    }
}
