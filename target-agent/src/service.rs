//! The target agent's gRPC server: `pageserver.v1.MigrationTarget` (status
//! and switchover), gRPC health, and reflection (v1 and v1alpha).
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use pageserver_proto::v1::migration_target_server::{MigrationTarget, MigrationTargetServer};
use pageserver_proto::v1::{GetStatusRequest, LatencySummary, MigrationStatus, SwitchoverReply, SwitchoverRequest};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::agent::TargetAgent;
use crate::page_state::PageState;
use crate::stats::FaultKind;

#[derive(Debug, Clone)]
pub struct TargetService {
    agent: Arc<TargetAgent>,
}

/// The agent's status as the protocol reports it.
pub fn status(agent: &TargetAgent) -> MigrationStatus {
    let s = &agent.stats;
    let ld = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut st = MigrationStatus {
        phase: s.phase().name().to_string(),
        error: s.error.lock().map(|e| e.clone()).unwrap_or_default(),
        precopy_rounds: ld(&s.precopy_rounds) as u32,
        pages_sent_precopy: ld(&s.pages_sent_precopy),
        dirty_pages_per_round: s.dirty_pages_per_round.lock().map(|v| v.clone()).unwrap_or_default(),
        stale_pages_at_switchover: ld(&s.stale_pages_at_switchover),
        pages_marked_stale: ld(&s.pages_marked_stale),
        final_bitmap_applied: s.final_bitmap_applied.load(Ordering::Acquire),
        faults_total: ld(&s.faults_total),
        faults_fresh: ld(&s.faults_fresh),
        faults_fetched: ld(&s.faults_fetched),
        faults_missing: ld(&s.faults_missing),
        faults_missing_fetched: ld(&s.faults_missing_fetched),
        faults_unknown: ld(&s.faults_unknown),
        pages_fetched_on_demand: ld(&s.pages_fetched_on_demand),
        pages_fetched_background: ld(&s.pages_fetched_background),
        pages_fetched_unknown: ld(&s.pages_fetched_unknown),
        pages_fetched_twice: ld(&s.pages_fetched_twice),
        pages_installed_bulk: ld(&s.pages_installed_bulk),
        bytes_received: ld(&s.bytes_received),
        ..Default::default()
    };
    if let Some(guest) = agent.guest.get() {
        st.page_size = guest.page_size();
        st.total_pages = guest.layout.total_pages();
        let counts = guest.states.counts();
        for state in PageState::ALL {
            st.pages_by_state.insert(state.name().to_string(), counts[state as usize]);
        }
    }
    for kind in FaultKind::ALL {
        let sum = s.fault_latency[kind as usize].summary();
        st.fault_latency.insert(
            kind.name().to_string(),
            LatencySummary { count: sum.count, p50_us: sum.p50_us, p99_us: sum.p99_us, max_us: sum.max_us },
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
        match self.agent.request_switchover(req.into_inner()) {
            Ok(phase) => Ok(Response::new(SwitchoverReply { phase: phase.name().to_string() })),
            Err(why) => Err(Status::failed_precondition(why)),
        }
    }
}

/// Serves the target agent's gRPC API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<TargetAgent>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<MigrationTargetServer<TargetService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pageserver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pageserver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(MigrationTargetServer::new(TargetService { agent }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
