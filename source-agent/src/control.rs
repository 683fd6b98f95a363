//! `pageserver.v1.MigrationSource`: the orchestrator tells the agent that
//! the VM is paused or running, for VMMs that cannot say so themselves over
//! the hand-off connection (an unmodified QEMU behind the LD_PRELOAD shim).
//! The VMM stand-in reports its pause as a hand-off event instead; both end
//! in the same [`DirtyTracker`](crate::dirty::DirtyTracker) calls.
//!
//! Only the orchestrator may say so ([`ControlAccess`]): a client that
//! declared a running VM paused would let its target install pages that
//! still change. Everyone else gets PERMISSION_DENIED.
#![forbid(unsafe_code)]

use std::sync::Arc;

use pageserver_agent_shell::ControlAccess;
use pageserver_proto::v1::migration_source_server::MigrationSource;
use pageserver_proto::v1::{SetPausedReply, SetPausedRequest};
use tonic::{Request, Response, Status};

use crate::agent::SourceAgent;

#[derive(Debug, Clone)]
pub struct ControlService {
    agent: Arc<SourceAgent>,
    access: ControlAccess,
}

impl ControlService {
    pub fn new(agent: Arc<SourceAgent>, access: ControlAccess) -> Self {
        Self { agent, access }
    }
}

#[tonic::async_trait]
impl MigrationSource for ControlService {
    async fn set_paused(&self, req: Request<SetPausedRequest>) -> Result<Response<SetPausedReply>, Status> {
        self.access.authorize(&req, "MigrationSource/SetPaused")?;
        self.set_paused_inner(req.into_inner().paused).await.map(Response::new)
    }
}

impl ControlService {
    async fn set_paused_inner(&self, paused: bool) -> Result<SetPausedReply, Status> {
        let memory = self.agent.memory_or_reason().map_err(Status::unavailable)?.clone();
        if memory.source_kind() == "file" {
            if !paused {
                return Err(Status::failed_precondition("a memory file never runs: it stays paused"));
            }
            return Ok(SetPausedReply { paused: true, epoch: memory.dirty().epoch() });
        }
        let epoch = tokio::task::spawn_blocking(move || {
            let dirty = memory.dirty();
            if paused {
                dirty.vm_paused().map_err(|e| Status::internal(format!("pause scan: {e}")))
            } else {
                dirty.vm_resumed();
                Ok(dirty.epoch())
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(paused, epoch, "the orchestrator reported the VM {}", if paused { "paused" } else { "running" });
        Ok(SetPausedReply { paused, epoch })
    }
}
