//! The target agent's gRPC server: `pageserver.v1.MigrationTarget` (status
//! and switchover), gRPC health, and reflection (v1 and v1alpha).
//!
//! Health follows the migration: the server (`""`) and
//! `pageserver.v1.MigrationTarget` are SERVING until the migration fails,
//! then NOT_SERVING for good (a Kubernetes probe, an orchestrator or an
//! operator with grpcurl sees it without reading the status).
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use pageserver_agent_shell::{ControlAccess, GrpcLimits, GrpcSecurity};
use pageserver_proto::v1::migration_target_server::{MigrationTarget, MigrationTargetServer};
use pageserver_proto::v1::{
    FaultsBlocked, GetStatusRequest, LatencySummary, MigrationPhase, MigrationStatus, PageCounts, SwitchoverReply,
    SwitchoverRequest,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::agent::TargetAgent;
use crate::phase::Phase;
use crate::stats::{BlockReason, FaultKind};

/// The MigrationTarget's full name, as the health service knows it.
pub const MIGRATION_TARGET_SERVICE: &str = "pageserver.v1.MigrationTarget";

#[derive(Debug, Clone)]
pub struct TargetService {
    agent: Arc<TargetAgent>,
    /// Who may call Switchover: the orchestrator only.
    access: ControlAccess,
}

/// The agent's status as the protocol reports it.
pub fn status(agent: &TargetAgent) -> MigrationStatus {
    let s = &agent.stats;
    let ld = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut st = MigrationStatus {
        phase: MigrationPhase::from(agent.phase.get()) as i32,
        error: agent.phase.error().unwrap_or_default(),
        precopy_rounds: ld(&s.precopy_rounds) as u32,
        pages_sent_precopy: ld(&s.pages_sent_precopy),
        dirty_pages_per_round: s.dirty_pages_per_round.lock().map(|v| v.clone()).unwrap_or_default(),
        precopy_round_seconds: s.precopy_round_seconds.lock().map(|v| v.clone()).unwrap_or_default(),
        bulk_install_seconds: s.bulk_install_seconds.lock().map(|v| *v).unwrap_or_default(),
        background_pull_seconds: s.background_pull_seconds.lock().map(|v| *v).unwrap_or_default(),
        final_bitmap_seconds: s.final_bitmap_seconds.lock().map(|v| *v).unwrap_or_default(),
        stale_pages_at_switchover: ld(&s.stale_pages_at_switchover),
        pages_marked_stale: ld(&s.pages_marked_stale),
        final_bitmap_applied: s.final_bitmap_applied.load(Ordering::Acquire),
        faults_total: s.faults_total(),
        faults_fresh: s.faults_of(FaultKind::Fresh),
        faults_fetched: s.faults_of(FaultKind::Fetched),
        faults_missing: s.faults_of(FaultKind::Missing),
        faults_missing_fetched: ld(&s.faults_missing_fetched),
        faults_unknown: ld(&s.faults_unknown),
        pages_fetched_on_demand: ld(&s.pages_fetched_on_demand),
        pages_fetched_background: ld(&s.pages_fetched_background),
        pages_fetched_unknown: ld(&s.pages_fetched_unknown),
        pages_installed_bulk: ld(&s.pages_installed_bulk),
        pull_order: agent.config.pull_order.name().to_owned(),
        hot_pages_hinted: ld(&s.hot_pages_hinted),
        hot_pages_pulled_first: ld(&s.hot_pages_pulled_first),
        bytes_received: ld(&s.bytes_received),
        faults_blocked: Some(FaultsBlocked {
            outside_regions: s.faults_blocked(BlockReason::OutsideRegions),
            install_failed: s.faults_blocked(BlockReason::InstallFailed),
            source_refused: s.faults_blocked(BlockReason::SourceRefused),
            fault_loop_stopped: s.faults_blocked(BlockReason::FaultLoopStopped),
            migration_failed: s.faults_blocked(BlockReason::MigrationFailed),
            source_unreachable: s.faults_blocked(BlockReason::SourceUnreachable),
        }),
        source_reconnects: ld(&s.source_reconnects),
        source_restarts: ld(&s.source_restarts),
        source_replies_refused: ld(&s.source_replies_refused),
        source_up: s.source_up(),
        seconds_since_progress: agent.stalled_for().as_secs_f64(),
        ..Default::default()
    };
    if let Some(guest) = agent.guest.get() {
        st.page_size = guest.page_size();
        st.total_pages = guest.layout.total_pages();
        let [unknown, fresh, stale, fetching_unknown, fetching_stale, installed] = guest.states.counts();
        st.pages_by_state = Some(PageCounts { unknown, fresh, stale, fetching_unknown, fetching_stale, installed });
    }
    for kind in FaultKind::ALL {
        let sum = s.fault_latency_of(kind).summary();
        st.fault_latency.insert(
            kind.name().to_string(),
            LatencySummary {
                count: sum.count,
                p50_us: sum.p50_us,
                p99_us: sum.p99_us,
                max_us: sum.max_us,
                sum_us: sum.sum_us,
            },
        );
    }
    st
}

#[tonic::async_trait]
impl MigrationTarget for TargetService {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<MigrationStatus>, Status> {
        Ok(Response::new(status(&self.agent)))
    }

    async fn switchover(&self, req: Request<SwitchoverRequest>) -> Result<Response<SwitchoverReply>, Status> {
        self.access.authorize(&req, "MigrationTarget/Switchover")?;
        match self.agent.request_switchover() {
            Ok(phase) => Ok(Response::new(SwitchoverReply { phase: MigrationPhase::from(phase) as i32 })),
            Err(why) => Err(Status::failed_precondition(why)),
        }
    }
}

/// Serves the target agent's gRPC API on `listener`, under `limits`, until
/// `shutdown`, then finishes the calls under way.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<TargetAgent>,
    limits: &GrpcLimits,
    security: GrpcSecurity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), pageserver_agent_shell::ServeError> {
    use pageserver_agent_shell::{ServerLimits, grpc_router, serve_router, set_health};

    let health_of = |phase: &Phase| match phase {
        Phase::Failed => ServingStatus::NotServing,
        _ => ServingStatus::Serving,
    };
    let mut phase = agent.phase.subscribe();
    let initial = health_of(&phase.borrow_and_update());
    let limits = ServerLimits::new(limits);
    let (router, health) =
        grpc_router(tonic::transport::Server::builder(), &limits, MIGRATION_TARGET_SERVICE, initial).await?;
    let following_the_phase = async move {
        while phase.changed().await.is_ok() {
            let serving = health_of(&phase.borrow_and_update());
            set_health(&health, MIGRATION_TARGET_SERVICE, serving).await;
        }
    };
    let router = router.add_service(MigrationTargetServer::new(TargetService { agent, access: security.control }));
    let health_listen = security.health_listen.as_deref();
    serve_router(router, listener, &limits, security.tls, health_listen, shutdown, following_the_phase).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_state::PageState;

    /// The status and the metrics name page states and block reasons alike
    /// (and in the order `status` fills them in).
    #[test]
    fn status_names_are_the_metric_labels() {
        let states = PageCounts::default().by_state().map(|(name, _)| name);
        assert_eq!(states, PageState::ALL.map(PageState::name));
        let reasons = FaultsBlocked::default().by_reason().map(|(name, _)| name);
        assert_eq!(reasons, BlockReason::ALL.map(BlockReason::name));
    }
}
