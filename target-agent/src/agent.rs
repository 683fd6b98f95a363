//! A target agent's life: hand-off → pre-copy → switchover → post-copy.
//!
//! 1. Wait for the target VMM's hand-off (memory fd + MINOR|MISSING uffd).
//! 2. Check the source's layout against ours; start the fault loop (it holds
//!    faults until switchover).
//! 3. Pre-copy rounds into the target's file.
//! 4. On `Switchover` (the source is paused): faults are served at once —
//!    the guest resumes before the final bitmap is in, and faults on pages of
//!    unknown state are fetched from the paused source.
//! 5. The final bitmap: stale pages marked, fresh ones installed in bulk,
//!    stale ones pulled in the background. Then nothing is left that needs
//!    the source: phase `complete`.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use guest_memory::handoff::{Handoff, Role, receive_handoff};
use pageserver_proto::v1::SwitchoverRequest;
use tokio::sync::watch;

use crate::fault_loop::{FaultHint, FaultLoop};
use crate::guest::GuestMemory;
use crate::page_state::PageState;
use crate::source::{self, SourceError};
use crate::stats::{Phase, TargetStats};
use crate::transfer::{self, TransferError};

#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The source agent, e.g. `http://127.0.0.1:50051`.
    pub source_url: String,
    pub handoff_socket: PathBuf,
    pub vm: String,
    pub max_precopy_rounds: u32,
    /// FAULT INJECTION, for proving that verification catches stale pages:
    /// treat this many pages of the final bitmap as fresh, so their stale
    /// pre-copied content is installed. Never set outside such tests.
    pub withhold_stale_pages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("hand-off socket {path}: {source}")]
    HandoffSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("setting up guest memory: {0}")]
    Guest(#[from] crate::guest::InstallError),
    #[error("starting the fault loop: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the source never reported itself paused: {0}")]
    NotPaused(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// The shared state of a target agent (the gRPC service reads it).
#[derive(Debug)]
pub struct TargetAgent {
    pub config: TargetConfig,
    pub stats: Arc<TargetStats>,
    pub guest: std::sync::OnceLock<Arc<GuestMemory>>,
    switchover: watch::Sender<Option<SwitchoverRequest>>,
}

impl TargetAgent {
    pub fn new(config: TargetConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            stats: Arc::new(TargetStats::default()),
            guest: std::sync::OnceLock::new(),
            switchover: watch::Sender::new(None),
        })
    }

    /// Starts the switchover (idempotent). Returns the phase after it.
    pub fn request_switchover(&self, req: SwitchoverRequest) -> Result<Phase, &'static str> {
        match self.stats.phase() {
            Phase::WaitingForHandoff => return Err("no guest memory yet: waiting for the VMM hand-off"),
            Phase::Failed => return Err("the migration has failed"),
            _ => {}
        }
        self.switchover.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(req);
                true
            } else {
                false
            }
        });
        Ok(self.stats.phase().max(Phase::Postcopy))
    }

    /// Runs the migration to its end; on error the phase becomes `failed`.
    pub async fn run(self: Arc<Self>) -> Result<(), TargetError> {
        let result = self.clone().migrate().await;
        if let Err(e) = &result {
            tracing::error!("migration failed: {e}");
            self.stats.fail(e.to_string());
        }
        result
    }

    async fn migrate(self: Arc<Self>) -> Result<(), TargetError> {
        let handoff = accept_handoff(self.config.handoff_socket.clone()).await?;
        tracing::info!(
            "hand-off from pid {} (vm {:?}): {} pages of {} bytes",
            handoff.message.pid,
            handoff.message.vm,
            handoff.layout.total_pages(),
            handoff.layout.page_size()
        );
        let url = self.config.source_url.clone();
        let stats = &self.stats;
        let connected = source::connect(&url).await;
        stats.note_source_call(&connected);
        let mut client = connected?;
        let layout = source::get_layout(&mut client).await;
        stats.note_source_call(&layout);
        source::check_layout(&layout?, &handoff.layout)?;

        let guest = Arc::new(GuestMemory::new(handoff, self.stats.clone())?);
        let _ = self.guest.set(guest.clone());
        let hint = Arc::new(FaultHint::default());
        let (postcopy_tx, postcopy_rx) = watch::channel(false);
        FaultLoop::new(guest.clone(), url.clone(), postcopy_rx, hint.clone()).spawn().map_err(TargetError::Thread)?;

        self.stats.set_phase(Phase::Precopy);
        let epoch = transfer::precopy(&guest, &mut client, &url, self.config.max_precopy_rounds).await?;
        self.stats.set_phase(Phase::PrecopyConverged);
        tracing::info!("pre-copy converged at epoch {epoch}; waiting for switchover");

        let mut switch_rx = self.switchover.subscribe();
        let req = loop {
            if let Some(req) = *switch_rx.borrow_and_update() {
                break req;
            }
            if switch_rx.changed().await.is_err() {
                return Err(TargetError::Internal("switchover channel closed".into()));
            }
        };
        self.stats.set_phase(Phase::Postcopy);
        let _ = postcopy_tx.send(true);
        tracing::info!("switchover: serving faults");

        self.wait_before_bitmap(&req).await;
        let dirty = final_bitmap(&mut client, &guest, epoch).await?;
        let withheld = (self.config.withhold_stale_pages as usize).min(dirty.len());
        if withheld > 0 {
            tracing::warn!("FAULT INJECTION: treating {withheld} stale pages as fresh; the guest will see stale data");
        }
        let stale = guest.states.apply_final_bitmap(&dirty[withheld..]);
        self.stats.stale_pages_at_switchover.store(dirty.len() as u64, Ordering::Relaxed);
        self.stats.pages_marked_stale.store(stale.len() as u64, Ordering::Relaxed);
        self.stats.final_bitmap_applied.store(true, Ordering::Release);
        tracing::info!("final bitmap: {} stale pages ({} still to pull)", dirty.len(), stale.len());

        let g = guest.clone();
        let bulk = tokio::task::spawn_blocking(move || g.bulk_install());
        let pull = transfer::pull_stale(guest.clone(), &mut client, &url, stale, hint);
        let (bulk, pull) = tokio::join!(bulk, pull);
        let installed = bulk.map_err(|e| TargetError::Internal(e.to_string()))??;
        pull?;
        tracing::info!("bulk-installed {installed} fresh pages; background pull done");

        // Demand fetches still in flight finish on the fault loop.
        while {
            let counts = guest.states.counts();
            counts[PageState::FetchingUnknown as usize] + counts[PageState::FetchingStale as usize] > 0
        } {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.stats.set_phase(Phase::Complete);
        tracing::info!("post-copy complete: nothing left to fetch from the source");
        Ok(())
    }

    /// Holds the bitmap request back if the switchover asked for it.
    async fn wait_before_bitmap(&self, req: &SwitchoverRequest) {
        if req.bitmap_after_faults == 0 && req.bitmap_delay_ms == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(if req.bitmap_delay_ms == 0 { 10_000 } else { req.bitmap_delay_ms });
        while tokio::time::Instant::now() < deadline {
            if req.bitmap_after_faults > 0 && self.stats.faults_total.load(Ordering::Relaxed) >= req.bitmap_after_faults
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Asks for the final bitmap until the source confirms it is paused (its
/// VMM's "paused" event may reach it a moment after the orchestrator).
async fn final_bitmap(client: &mut source::Client, guest: &GuestMemory, since: u64) -> Result<Vec<u64>, TargetError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dirty = source::get_dirty_pages(client, &guest.layout, since, true).await;
        guest.stats.note_source_call(&dirty);
        match dirty {
            Ok(d) if d.paused => return Ok(d.pages),
            Ok(_) => {}
            Err(SourceError::Rpc { status, .. }) if status.code() == tonic::Code::FailedPrecondition => {
                if tokio::time::Instant::now() > deadline {
                    return Err(TargetError::NotPaused(status.message().to_string()));
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Listens on the hand-off socket until one valid target hand-off arrives.
/// A refused hand-off is logged and the next connection awaited.
async fn accept_handoff(path: PathBuf) -> Result<Handoff, TargetError> {
    let err = |source| TargetError::HandoffSocket { path: path.clone(), source };
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    tracing::info!("waiting for the VMM hand-off on {}", path.display());
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                // A peer that connects and says nothing must not block us.
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                Ok(s)
            }),
            Err(e) => Err(e),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("hand-off accept: {e}");
                continue;
            }
        };
        let received = tokio::task::spawn_blocking(move || receive_handoff(stream, Role::Target))
            .await
            .map_err(|e| TargetError::Internal(e.to_string()))?;
        match received {
            Ok(h) => return Ok(h),
            Err(e) => tracing::warn!("refused a hand-off: {e}"),
        }
    }
}
