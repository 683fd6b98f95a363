//! A target agent's life: hand-off → pre-copy → switchover → post-copy.
//!
//! 1. Wait for the target VMM's hand-off (memory fd + MINOR|MISSING uffd).
//! 2. Check the source's layout against ours; start the fault loop (it holds
//!    faults until switchover).
//! 3. Pre-copy rounds into the target's file.
//! 4. On `Switchover` (the source is paused): faults are served at once;
//!    the guest resumes before the final bitmap is in, and faults on pages
//!    of unknown state are fetched from the paused source.
//! 5. The final bitmap: stale pages marked, fresh ones installed in bulk,
//!    stale ones pulled in the background. Once nothing is being fetched,
//!    phase `complete`.
//!
//! Every connection to the source is checked to reach this migration's
//! source, and every page installed after switchover to have been read while
//! it was paused ([`crate::fence`]). A source agent restarted on the same VMM
//! is followed: pre-copy starts over, or, before the final bitmap, every page
//! not known fresh becomes stale. A source unreachable for longer than
//! `source_unreachable_timeout` fails the migration.
//!
//! From step 2 on, every step races the fault loop's exit event: if the
//! fault loop stops, the migration fails at once with its reason, whatever
//! step it was in, and never reports `complete`. After `complete` the fault
//! loop still serves the guest (the VMM may drop and re-fault pages), so its
//! exit is still awaited: a loop that stops before the VMM closes its uffd
//! fails the migration then.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pageserver_agent_shell::{HandoffGroup, PeerAllowList};
use tokio::sync::{oneshot, watch};

use crate::fault_loop::{FaultHint, FaultLoop, FaultLoopError, FaultLoopExit, GUEST_FROZEN, describe_stop};
use crate::fence::{Incarnation, SourceEpoch, SourceFence};
use crate::guest::{GuestMemory, InstallError};
use crate::handoff::{HandoffEndpoint, HandoffEndpointError};
use crate::phase::{Phase, PhaseTracker};
use crate::pull_order::PullOrder;
use crate::source::{self, SourceAddress, SourceError, SourceLink};
use crate::stats::TargetStats;
use crate::takeover::{self, Checkpoint, TakeoverError};
use crate::test_hooks::TestHooks;
use crate::transfer::{self, TransferError};

/// How often the completion wait looks at the page states.
const COMPLETION_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The source agent, e.g. `http://127.0.0.1:50051`.
    pub source_url: String,
    /// This agent's client certificate towards the source (`Some` exactly
    /// when `source_url` is https).
    pub source_tls: Option<pageserver_tls::ClientTls>,
    pub handoff_socket: PathBuf,
    /// The uids whose processes may hand memory over ([`crate::handoff`]).
    pub handoff_peers: PeerAllowList,
    /// The group the hand-off socket is shared with (mode 0660), if any.
    pub handoff_group: Option<HandoffGroup>,
    pub vm: String,
    pub max_precopy_rounds: u32,
    /// How long the migration waits for an unreachable source (or for the
    /// right one, while another answers) before it fails.
    pub source_unreachable_timeout: Duration,
    /// How long post-copy waits for a source that says its VM is not paused
    /// (its VMM's "paused" event may reach it a moment after the
    /// orchestrator's Switchover reaches us) before it fails.
    pub pause_timeout: Duration,
    /// How long after the switchover the background pull waits before it
    /// starts (demand faults are served meanwhile).
    pub pull_delay: Duration,
    /// Which stale pages the background pull fetches first.
    pub pull_order: PullOrder,
    pub hooks: TestHooks,
}

impl TargetConfig {
    /// The defaults the `target-agent` binary has too.
    pub const DEFAULT_MAX_PRECOPY_ROUNDS: u32 = 8;
    pub const DEFAULT_SOURCE_UNREACHABLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

    /// A configuration with the defaults and no test hooks.
    pub fn new(source_url: &str, handoff_socket: impl Into<PathBuf>, vm: &str) -> Self {
        Self {
            source_url: source_url.to_owned(),
            source_tls: None,
            handoff_socket: handoff_socket.into(),
            handoff_peers: PeerAllowList::own_uid(),
            handoff_group: None,
            vm: vm.to_owned(),
            max_precopy_rounds: Self::DEFAULT_MAX_PRECOPY_ROUNDS,
            source_unreachable_timeout: Self::DEFAULT_SOURCE_UNREACHABLE_TIMEOUT,
            pause_timeout: Self::DEFAULT_PAUSE_TIMEOUT,
            pull_delay: Duration::ZERO,
            pull_order: PullOrder::default(),
            hooks: TestHooks::default(),
        }
    }
}

/// Where an agent starts the migration.
#[derive(Debug)]
enum Start {
    /// From the beginning: a first hand-off, or a takeover before pre-copy
    /// converged.
    Precopy,
    /// A takeover after pre-copy converged: the file is current to this
    /// epoch; waiting for switchover.
    Converged(SourceEpoch),
    /// A takeover after switchover: the guest runs here.
    SwitchedOver(SourceEpoch),
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("the VMM hand-off")]
    Handoff(#[from] HandoffEndpointError),
    #[error("the source agent")]
    Source(#[from] SourceError),
    #[error("moving guest memory")]
    Transfer(#[from] TransferError),
    #[error("setting up guest memory")]
    Guest(#[from] InstallError),
    #[error("starting the fault loop")]
    Thread(#[source] std::io::Error),
    #[error("the source has been unreachable for {waited:?}")]
    Unreachable {
        waited: Duration,
        #[source]
        last: SourceError,
    },
    #[error("taking over the migration")]
    Takeover(#[from] TakeoverError),
    #[error("the fault loop stopped")]
    FaultLoop(#[from] FaultLoopError),
    #[error("the fault loop thread vanished without reporting its end")]
    FaultLoopVanished,
    #[error("internal: {0}")]
    Internal(String),
}

impl TargetError {
    /// The whole chain of causes, for the status and the log; a stopped
    /// fault loop says what it means for the guest.
    pub fn describe(&self) -> String {
        match self {
            TargetError::FaultLoop(error) => describe_stop(error),
            other => pageserver_agent_shell::exit::describe(other),
        }
    }

    /// [`TargetError::describe`], with what the failure means for the guest
    /// in `phase`.
    pub fn describe_in(&self, phase: Phase) -> String {
        let reason = self.describe();
        match (self, phase) {
            (TargetError::FaultLoop(_), _) => reason,
            (_, Phase::Postcopy | Phase::Complete) => format!("{reason}. {GUEST_FROZEN}"),
            _ => format!("{reason}. Nothing was installed: the guest has not run here"),
        }
    }
}

/// The shared state of a target agent (the gRPC service reads it).
#[derive(Debug)]
pub struct TargetAgent {
    pub config: TargetConfig,
    pub stats: Arc<TargetStats>,
    pub phase: PhaseTracker,
    pub guest: OnceLock<Arc<GuestMemory>>,
    /// The hand-off socket ([`crate::handoff`]).
    pub handoff: HandoffEndpoint,
    /// Becomes true at the (first) Switchover call.
    switchover: watch::Sender<bool>,
}

impl TargetAgent {
    pub fn new(config: TargetConfig) -> Arc<Self> {
        if config.hooks.any() {
            tracing::warn!("TEST HOOKS ARE SET: this agent misbehaves on purpose ({:?})", config.hooks);
        }
        Arc::new(Self {
            handoff: HandoffEndpoint::new(
                &config.handoff_socket,
                config.handoff_peers.clone(),
                config.handoff_group.clone(),
            ),
            config,
            stats: Arc::new(TargetStats::default()),
            phase: PhaseTracker::default(),
            guest: OnceLock::new(),
            switchover: watch::Sender::new(false),
        })
    }

    /// How long the migration has made no progress while it should (in
    /// pre-copy and post-copy; zero while it waits for the hand-off or the
    /// switchover, and once it is over).
    pub fn stalled_for(&self) -> Duration {
        match self.phase.get() {
            Phase::Precopy | Phase::Postcopy => self.stats.since_progress(),
            _ => Duration::ZERO,
        }
    }

    /// Starts the switchover (idempotent). Returns the phase after it.
    ///
    /// Refused before a VMM has handed its memory over. From the moment the
    /// hand-off is taken (before the VMM hears so) it is accepted, although
    /// the phase says `waiting_for_handoff` until the source is reached: an
    /// orchestrator that restarted this agent mid-migration and saw the VMM
    /// hand over again may switch over at once (the request waits for the
    /// agent to be ready).
    pub fn request_switchover(&self) -> Result<Phase, &'static str> {
        match self.phase.get() {
            Phase::WaitingForHandoff if self.handoff.handed_over().is_none() => {
                return Err("no guest memory yet: waiting for the VMM hand-off");
            }
            Phase::Failed => return Err("the migration has failed (see GetStatus)"),
            _ => {}
        }
        let first = self.switchover.send_if_modified(|requested| !std::mem::replace(requested, true));
        tracing::info!(phase = ?self.phase.get(), first, "Switchover requested");
        // A stop that abandoned the migration meanwhile wins: it decided
        // under the phase's lock, before this request was seen
        // (`crate::shutdown`).
        match self.phase.get() {
            Phase::Failed => Err("the migration has failed (see GetStatus)"),
            phase => Ok(phase.max(Phase::Postcopy)),
        }
    }

    /// Whether `Switchover` has been called.
    pub fn switchover_requested(&self) -> bool {
        *self.switchover.borrow()
    }

    /// Runs the migration to its end, and then for as long as the fault loop
    /// serves the guest; on error the phase becomes `failed`.
    pub async fn run(self: Arc<Self>) -> Result<(), TargetError> {
        let result = self.clone().migrate().await;
        if let Err(e) = &result {
            self.fail(&e.describe_in(self.phase.get()));
        }
        result
    }

    /// Fails the migration: first nothing more is installed (the gate closes
    /// once the installs under way are done), then the phase says `failed`.
    fn fail(&self, reason: &str) {
        if let Some(guest) = self.guest.get() {
            guest.gate.close();
        }
        self.phase.fail(reason.to_owned());
    }

    async fn migrate(self: Arc<Self>) -> Result<(), TargetError> {
        let handoff = self.handoff.accept().await?;
        tracing::info!(
            "hand-off from pid {} (vm {:?}): {} pages of {} bytes",
            handoff.message.pid,
            handoff.message.vm,
            handoff.layout.total_pages(),
            handoff.layout.page_size()
        );
        let address = SourceAddress { url: self.config.source_url.clone(), tls: self.config.source_tls.clone() };
        let stats = &self.stats;
        let (client, layout) = self.first_contact(&address, &handoff.layout).await?;
        let takeover = handoff.message.previous_handoffs > 0;
        let checkpoint = takeover::checkpoint_of(handoff.message.checkpoint.as_ref())?;
        if let Some(checkpoint) = &checkpoint
            && checkpoint.source_memory_id != layout.memory_id
        {
            return Err(SourceError::WrongSource(format!(
                "it serves memory {:?}, but the migration this agent takes over reads memory {:?}",
                layout.memory_id, checkpoint.source_memory_id
            ))
            .into());
        }
        let link = Arc::new(SourceLink {
            address,
            fence: SourceFence::learn(&layout, stats.clone())?,
            unreachable_timeout: self.config.source_unreachable_timeout,
            pause_timeout: self.config.pause_timeout,
            stats: stats.clone(),
        });

        let guest = Arc::new(GuestMemory::new(handoff, self.stats.clone())?);
        let _ = self.guest.set(guest.clone());
        let start = self.prepare(&guest, takeover, checkpoint)?;
        let hint = Arc::new(FaultHint::default());
        let (postcopy_tx, postcopy_rx) = watch::channel(false);
        let (complete_tx, complete_rx) = watch::channel(false);
        let fault_loop = FaultLoop::new(
            guest.clone(),
            link.clone(),
            postcopy_rx,
            complete_rx,
            hint.clone(),
            self.config.hooks.clone(),
        );
        let mut exit = fault_loop.spawn().map_err(TargetError::Thread)?;
        if takeover {
            // The faults the dead agent read died with it: their vCPUs fault
            // again, and this agent reads them.
            takeover::wake_all(&guest)?;
        }

        tokio::select! {
            result = self.move_memory(start, &guest, client, &link, &postcopy_tx, hint) => result?,
            stopped = &mut exit => return Err(fault_loop_stopped(stopped)),
        }
        let _ = complete_tx.send(true);
        self.phase.advance(Phase::Complete);
        tracing::info!("post-copy complete: nothing left to fetch from the source");
        match exit.await {
            // The VMM closed its uffd after the migration: the normal end.
            Ok(Ok(())) => Ok(()),
            stopped => Err(fault_loop_stopped(stopped)),
        }
    }

    /// The first connection to the source and its layout, checked against
    /// the VMM's; tried again (the source agent may be starting, or waiting
    /// for its own VMM) until the source has been unreachable for the
    /// configured deadline. A source that answers with a layout that does
    /// not match fails at once.
    async fn first_contact(
        &self,
        address: &SourceAddress,
        expected: &guest_memory::GuestLayout,
    ) -> Result<(source::Client, pageserver_proto::v1::Layout), TargetError> {
        let stats = &self.stats;
        let mut backoff = crate::demand::RECONNECT.start();
        loop {
            let attempt = async {
                let mut client = source::connect(address).await?;
                let (layout, _) = source::get_layout(&mut client, None).await?;
                source::check_layout(&layout, expected)?;
                Ok::<_, SourceError>((client, layout))
            }
            .await;
            stats.note_source_call(&attempt);
            let error = match attempt {
                Ok(contact) => return Ok(contact),
                Err(error) if error.source_answered() => return Err(error.into()),
                Err(error) => error,
            };
            let waited = stats.source_outage().unwrap_or_default();
            if waited > self.config.source_unreachable_timeout {
                return Err(TargetError::Unreachable { waited, last: error });
            }
            let delay = backoff.next_delay().unwrap_or(crate::demand::RECONNECT.max);
            tracing::warn!("the source is not reachable yet ({error}); trying again in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }

    /// Where this agent starts: a first hand-off empties the file and starts
    /// with pre-copy; a takeover rebuilds the page states
    /// ([`crate::takeover`]) and goes on from the checkpoint.
    fn prepare(
        &self,
        guest: &GuestMemory,
        takeover: bool,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Start, TargetError> {
        if !takeover {
            guest.clear()?;
            return Ok(Start::Precopy);
        }
        let pagemap = guest.pagemap().ok_or(TakeoverError::NoPagemap)?;
        let mapped = takeover::mapped_pages(pagemap, &guest.layout)?;
        let Some(checkpoint) = checkpoint else {
            if !mapped.is_empty() {
                return Err(TakeoverError::InstalledWithoutCheckpoint { installed: mapped.len() as u64 }.into());
            }
            tracing::warn!("taking over a migration that had not converged: pre-copy starts over");
            guest.clear()?;
            return Ok(Start::Precopy);
        };
        guest.states.take_over(&mapped);
        let epoch =
            SourceEpoch { incarnation: Incarnation(checkpoint.source_incarnation), epoch: checkpoint.precopy_epoch };
        tracing::warn!(
            installed = mapped.len(),
            epoch = epoch.epoch,
            switched_over = checkpoint.switched_over,
            "taking over a migration from an agent that died"
        );
        Ok(if checkpoint.switched_over {
            self.switchover.send_replace(true);
            Start::SwitchedOver(epoch)
        } else {
            Start::Converged(epoch)
        })
    }

    /// Tells the VMM where the migration is (for a takeover).
    fn checkpoint(&self, guest: &GuestMemory, link: &SourceLink, epoch: &SourceEpoch, switched_over: bool) {
        guest.send_checkpoint(&Checkpoint {
            source_memory_id: link.fence.memory_id().to_owned(),
            source_incarnation: epoch.incarnation.0.clone(),
            precopy_epoch: epoch.epoch,
            switched_over,
        });
    }

    /// Pre-copy, switchover, the final bitmap, bulk install and the stale
    /// pull, up to the moment nothing is left to fetch; from wherever
    /// `start` says.
    async fn move_memory(
        &self,
        start: Start,
        guest: &Arc<GuestMemory>,
        mut client: source::Client,
        link: &SourceLink,
        postcopy: &watch::Sender<bool>,
        hint: Arc<FaultHint>,
    ) -> Result<(), TargetError> {
        let (epoch, switched_over) = match start {
            Start::Precopy => {
                self.phase.advance(Phase::Precopy);
                self.stats.note_progress();
                (transfer::precopy(guest, &mut client, link, self.config.max_precopy_rounds).await?, false)
            }
            Start::Converged(epoch) => (epoch, false),
            Start::SwitchedOver(epoch) => (epoch, true),
        };
        if !switched_over {
            self.phase.advance(Phase::PrecopyConverged);
            self.checkpoint(guest, link, &epoch, false);
            tracing::info!("pre-copy converged at epoch {}; waiting for switchover", epoch.epoch);
            let mut switchover = self.switchover.subscribe();
            if switchover.wait_for(|requested| *requested).await.is_err() {
                return Err(TargetError::Internal("switchover channel closed".into()));
            }
        }
        // Before any install: an agent taking over after this knows the
        // guest runs here.
        self.checkpoint(guest, link, &epoch, true);
        self.phase.advance(Phase::Postcopy);
        self.stats.note_progress();
        let _ = postcopy.send(true);
        let switched = Instant::now();
        tracing::info!("switchover: serving faults");

        self.hold_bitmap_if_hooked().await;
        let dirty = final_bitmap(&mut client, guest, link, &epoch).await?;
        let withheld = (self.config.hooks.withheld_stale_pages() as usize).min(dirty.pages.len());
        if withheld > 0 {
            tracing::warn!("TEST HOOK: treating {withheld} stale pages as fresh; the guest will see stale data");
        }
        let stale = guest.states.apply_final_bitmap(&dirty.pages[withheld..]);
        let stats = &self.stats;
        stats.stale_pages_at_switchover.store(dirty.pages.len() as u64, Ordering::Relaxed);
        stats.pages_marked_stale.store(stale.len() as u64, Ordering::Relaxed);
        set_seconds(&stats.final_bitmap_seconds, switched);
        stats.final_bitmap_applied.store(true, Ordering::Release);
        tracing::info!(
            "final bitmap: {} stale pages ({} still to pull), applied {:.1} ms after the switchover",
            dirty.pages.len(),
            stale.len(),
            switched.elapsed().as_secs_f64() * 1e3
        );

        let installer = guest.clone();
        let bulk = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let installed = installer.bulk_install();
            set_seconds(&installer.stats.bulk_install_seconds, started);
            installed
        });
        let (pull_delay, order) = (self.config.pull_delay, self.config.pull_order);
        let pull = async {
            tokio::time::sleep(pull_delay).await;
            let started = Instant::now();
            let pulled = transfer::pull_stale(guest.clone(), &mut client, link, stale, order, &dirty.hot, hint).await;
            set_seconds(&guest.stats.background_pull_seconds, started);
            pulled
        };
        let (bulk, pull) = tokio::join!(bulk, pull);
        let installed = bulk.map_err(|e| TargetError::Internal(format!("the bulk install task: {e}")))??;
        pull?;
        tracing::info!("bulk-installed {installed} fresh pages; background pull done");

        // Demand fetches still in flight finish on the fault loop.
        while guest.states.fetching() > 0 {
            tokio::time::sleep(COMPLETION_POLL).await;
        }
        Ok(())
    }

    /// TEST HOOK: holds the bitmap request back (so faults hit pages of
    /// unknown state), until enough faults or the time is up.
    async fn hold_bitmap_if_hooked(&self) {
        let Some((wait, faults)) = self.config.hooks.bitmap_hold() else { return };
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline && self.stats.faults_total() < faults {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Records the time since `started` in `slot`.
fn set_seconds(slot: &std::sync::Mutex<f64>, started: Instant) {
    if let Ok(mut seconds) = slot.lock() {
        *seconds = started.elapsed().as_secs_f64();
    }
}

/// The error a fault-loop exit means while the migration is under way (the
/// loop ends without an error only once the migration is complete).
fn fault_loop_stopped(exit: Result<FaultLoopExit, oneshot::error::RecvError>) -> TargetError {
    match exit {
        Ok(Ok(())) => TargetError::FaultLoop(FaultLoopError::VmmGone),
        Ok(Err(error)) => TargetError::FaultLoop(error),
        Err(_) => TargetError::FaultLoopVanished,
    }
}

/// The final bitmap: the pages written since `since`, from the paused
/// source, with its heat hint. From a restarted source (another incarnation
/// than `since`'s) it is every page that may hold data there, and every page
/// our file holds content for (the source may have zeros there now): each
/// one not yet installed becomes stale.
async fn final_bitmap(
    client: &mut source::Client,
    guest: &GuestMemory,
    link: &SourceLink,
    since: &SourceEpoch,
) -> Result<source::DirtyPages, TargetError> {
    let dirty = transfer::dirty_pages(guest, client, link, since, true, "the final dirty bitmap").await?;
    if dirty.epoch.incarnation != since.incarnation {
        let mut dirty = dirty;
        let ours = guest.states.present_pages_not_in(&dirty.pages);
        dirty.pages.extend(ours);
        dirty.pages.sort_unstable();
        tracing::warn!(
            "the final bitmap comes from a restarted source agent: all {} pages that may hold data count as dirty",
            dirty.pages.len()
        );
        return Ok(dirty);
    }
    Ok(dirty)
}
