//! The fault loop: reads the guest's userfaultfd and resolves every fault,
//! or accounts for it as blocked, with a reason.
//!
//! It runs on its own thread, at a raised priority, with a single-threaded
//! tokio runtime that also drives its own connection to the source (the
//! [`DemandFetcher`]), so a demand fetch goes from the fault to the socket
//! and back to UFFDIO_CONTINUE without a thread hop (a hop costs ~20 µs
//! here). Background transfers use another connection on another runtime.
//!
//! Per fault, [`PageStates::on_fault`](crate::page_state::PageStates::on_fault)
//! decides, and this loop carries it out:
//! - `Local`: fresh or installed: UFFDIO_CONTINUE, or a zero fill for a
//!   hole, at once;
//! - `Fetch(claim)`: the claim goes to the demand fetcher, whose install
//!   wakes the fault;
//! - `Wait`: someone else's fetch is under way; its install wakes the fault.
//!
//! Faults read before switchover are held until then: the source may still
//! be running, and nothing may be installed from it before it is paused.
//!
//! # Events other than page faults
//!
//! The target VMM's uffd reports `Remove` (MADV_DONTNEED / MADV_REMOVE,
//! e.g. a balloon) (`Userfaultfd::for_role`; an `Unmap`, should a VMM ask
//! for it, is handled alike). Either marks the pages discarded (page_state rule 7): the background pull and
//! the bulk install leave them alone, so a page the VMM punched out is never
//! filled with the source's content behind its back. The kernel may report
//! the event before or after faults on the same pages; either order is
//! safe, because a later fault is resolved by what the kernel reports
//! (MISSING: the VMM punched it out, its content is zeros, zero-fill it;
//! MINOR: the page cache holds it, map it, or fetch it if it is still
//! stale), and a fetch under way when the event comes maps what the VMM
//! left, not what it fetched ([`GuestMemory::install_fetched`]). The VMM's
//! madvise waits until the event is read: the loop reads events promptly.
//! `Remap`, `Fork` and anything unrecognised are logged.
//!
//! # When something fails: freeze, report, never guess
//!
//! Whatever stops this loop (a uffd error, a fault outside every region,
//! an install that fails, a page the source refuses for good, a panic)
//! leaves the faults it has not resolved unresolved: the VMM holds its own
//! copy of the uffd, so its vCPUs wait on them rather than see a wrong page.
//! The loop then reports through an exit event, as Cloud Hypervisor's uffd
//! handler does: [`FaultLoopExit`] reaches the agent, which fails the
//! migration (phase `failed` with the reason, gRPC health NOT_SERVING, the
//! phase and blocked-faults metrics, a non-zero exit at shutdown). A panic
//! is caught at the thread's edge and reported the same way; the agent does
//! not abort, so that its status, health and metrics stay up to say why.
//! Every fault left blocked is counted by reason
//! ([`BlockReason`](crate::stats::BlockReason)).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::memfile::monotonic_ns;
use guest_memory::uffd::EventBuffer;
use guest_memory::{PageFault, UffdError, UffdEvent};
use tokio::sync::{mpsc, oneshot, watch};

use crate::demand::{DemandError, DemandFetcher};
use crate::guest::{GuestMemory, InstallError};
use crate::page_state::{Claim, FaultAction};
use crate::source::SourceLink;
use crate::stats::{BlockReason, FaultKind};
use crate::test_hooks::TestHooks;

/// Nice value of the fault-loop thread: a vCPU waits on every fault it
/// handles, so it must not queue behind other vCPUs for a CPU.
const FAULT_LOOP_NICE: i32 = -10;

/// uffd messages read per `read(2)`.
const EVENTS_PER_READ: usize = 64;

/// Pages a stopped fault loop names in its log line (the count is exact).
const BLOCKED_PAGES_LOGGED: usize = 16;

/// Shared with the background pull: where the guest faulted last.
#[derive(Debug, Default)]
pub struct FaultHint {
    pub last_fault_page: AtomicU64,
}

/// Why the fault loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum FaultLoopError {
    #[error("setting up the fault loop")]
    Setup(#[source] std::io::Error),
    #[error("reading the guest's userfaultfd")]
    Read(#[source] UffdError),
    #[error("the target VMM closed its userfaultfd (it exited) before the migration was complete")]
    VmmGone,
    #[error("a fault at {address:#x} (thread {thread_id}) is outside every region the VMM handed over")]
    OutsideRegions { address: u64, thread_id: u32 },
    #[error("resolving a fault on page {page}")]
    Install {
        page: u64,
        #[source]
        source: InstallError,
    },
    #[error("demand fetching failed")]
    Demand(#[from] DemandError),
    #[error("the fault loop panicked: {0}")]
    Panicked(String),
    #[error("test hook: the fault loop was told to stop after {0} faults")]
    TestHook(u64),
}

impl FaultLoopError {
    /// The reason the fault this error is about stays blocked, if it is
    /// about one.
    fn block_reason(&self) -> Option<BlockReason> {
        match self {
            FaultLoopError::OutsideRegions { .. } => Some(BlockReason::OutsideRegions),
            FaultLoopError::Install { source: InstallError::Frozen(_), .. }
            | FaultLoopError::Demand(DemandError::Install { source: InstallError::Frozen(_), .. }) => {
                Some(BlockReason::MigrationFailed)
            }
            FaultLoopError::Install { .. } | FaultLoopError::Demand(DemandError::Install { .. }) => {
                Some(BlockReason::InstallFailed)
            }
            FaultLoopError::Demand(
                DemandError::Refused { .. } | DemandError::NotPaused { .. } | DemandError::Fence { .. },
            ) => Some(BlockReason::SourceRefused),
            FaultLoopError::Demand(DemandError::Unreachable { .. }) => Some(BlockReason::SourceUnreachable),
            _ => None,
        }
    }
}

/// What the fault-loop thread reports when it ends: `Ok` only when the VMM
/// closed its uffd after the migration completed.
pub type FaultLoopExit = Result<(), FaultLoopError>;

/// The error text of a stopped fault loop, with the consequence spelled out.
pub fn describe_stop(error: &FaultLoopError) -> String {
    format!("{}. {GUEST_FROZEN}", pageserver_agent_shell::exit::describe(error))
}

/// What any failure after switchover means for the guest.
pub const GUEST_FROZEN: &str = "The guest is frozen: its faults are no longer served, and no page was installed without its content from the \
     paused source";

#[derive(Debug)]
pub struct FaultLoop {
    guest: Arc<GuestMemory>,
    link: Arc<SourceLink>,
    /// Becomes true at switchover.
    postcopy: watch::Receiver<bool>,
    /// Becomes true once every page is installed (a VMM exit is then normal).
    complete: watch::Receiver<bool>,
    hint: Arc<FaultHint>,
    hooks: TestHooks,
}

impl FaultLoop {
    pub fn new(
        guest: Arc<GuestMemory>,
        link: Arc<SourceLink>,
        postcopy: watch::Receiver<bool>,
        complete: watch::Receiver<bool>,
        hint: Arc<FaultHint>,
        hooks: TestHooks,
    ) -> Self {
        Self { guest, link, postcopy, complete, hint, hooks }
    }

    /// Starts the loop on its own thread; its exit (error or panic included)
    /// arrives on the returned channel.
    pub fn spawn(self) -> std::io::Result<oneshot::Receiver<FaultLoopExit>> {
        let (exit_tx, exit_rx) = oneshot::channel();
        std::thread::Builder::new().name("fault-loop".into()).spawn(move || {
            if let Err(e) = raise_thread_priority(FAULT_LOOP_NICE) {
                tracing::warn!(
                    "fault loop keeps its normal priority, not nice {FAULT_LOOP_NICE} ({e}): busy vCPUs may delay \
                     it; give the agent CAP_SYS_NICE or an RLIMIT_NICE of at least {} (ulimit -e)",
                    20 - FAULT_LOOP_NICE
                );
            }
            let guest = self.guest.clone();
            let mut state = LoopState::default();
            let exit =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_on_own_runtime(&mut state))) {
                    Ok(exit) => exit,
                    Err(panic) => Err(FaultLoopError::Panicked(panic_message(panic.as_ref()))),
                };
            if let Err(error) = &exit {
                account_blocked(&guest, error, &state);
            }
            let _ = exit_tx.send(exit);
        })?;
        Ok(exit_rx)
    }

    fn run_on_own_runtime(self, state: &mut LoopState) -> FaultLoopExit {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(FaultLoopError::Setup)?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, self.run(state))
    }

    async fn run(mut self, state: &mut LoopState) -> FaultLoopExit {
        let guest = self.guest.clone();
        guest.uffd.set_nonblocking().map_err(FaultLoopError::Setup)?;
        let readable = crate::sys::async_uffd(&guest.uffd).map_err(FaultLoopError::Setup)?;
        let (claims, claims_rx) = mpsc::unbounded_channel::<Claim>();
        let mut fetcher = tokio::task::spawn_local(DemandFetcher::new(guest.clone(), self.link.clone()).run(claims_rx));
        let mut held: Vec<(PageFault, u64)> = Vec::new();
        let mut postcopy = *self.postcopy.borrow();
        let mut buffer = EventBuffer::new(EVENTS_PER_READ);
        let mut events = Vec::with_capacity(EVENTS_PER_READ);
        loop {
            state.held = held.len() as u64;
            tokio::select! {
                biased;
                stopped = &mut fetcher => {
                    return match stopped {
                        Ok(Ok(())) => Err(FaultLoopError::Panicked("the demand fetcher ended on its own".into())),
                        Ok(Err(error)) => Err(error.into()),
                        Err(join) => Err(FaultLoopError::Panicked(format!("the demand fetcher: {join}"))),
                    };
                }
                changed = self.postcopy.changed(), if !postcopy => {
                    if changed.is_err() {
                        return Err(FaultLoopError::Panicked("the agent dropped the switchover signal".into()));
                    }
                    postcopy = *self.postcopy.borrow();
                    if postcopy {
                        let released = std::mem::take(&mut held);
                        let mut still_held = released.len() as u64;
                        for (fault, started) in released {
                            still_held -= 1;
                            state.held = still_held;
                            self.handle(fault, started, &claims, state)?;
                        }
                    }
                }
                guard = readable.readable() => {
                    let mut guard = guard.map_err(FaultLoopError::Setup)?;
                    loop {
                        events.clear();
                        match guest.uffd.read_events(&mut buffer, &mut events) {
                            Ok(()) => {}
                            Err(UffdError::Closed) => {
                                return if *self.complete.borrow() {
                                    tracing::info!("the target VMM closed its userfaultfd: the fault loop ends");
                                    Ok(())
                                } else {
                                    Err(FaultLoopError::VmmGone)
                                };
                            }
                            Err(error) => return Err(FaultLoopError::Read(error)),
                        }
                        if events.is_empty() {
                            guard.clear_ready();
                            break;
                        }
                        let now = monotonic_ns();
                        for event in &events {
                            match *event {
                                UffdEvent::PageFault(fault) if postcopy => self.handle(fault, now, &claims, state)?,
                                UffdEvent::PageFault(fault) => held.push((fault, now)),
                                UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                                    let pages = guest.discarded(start, end);
                                    tracing::info!(
                                        "the VMM discarded {pages} pages at {start:#x}..{end:#x} ({}): none is \
                                         filled from the source unasked",
                                        event.name()
                                    );
                                }
                                other => log_other_event(&other),
                            }
                        }
                        state.held = held.len() as u64;
                    }
                }
            }
        }
    }

    /// Carries out what the page state decides for one fault.
    fn handle(
        &mut self,
        fault: PageFault,
        started: u64,
        claims: &mpsc::UnboundedSender<Claim>,
        state: &mut LoopState,
    ) -> Result<(), FaultLoopError> {
        state.in_hand = true;
        let guest = &self.guest;
        let stats = &guest.stats;
        let Some(page) = guest.layout.page_at_host_addr(fault.address) else {
            return Err(FaultLoopError::OutsideRegions { address: fault.address, thread_id: fault.thread_id });
        };
        state.handled += 1;
        if let Some(after) = self.hooks.break_fault_loop_after(state.handled) {
            return Err(FaultLoopError::TestHook(after));
        }
        self.hint.last_fault_page.store(page, Ordering::Relaxed);
        match guest.states.on_fault(page, fault.is_minor()) {
            FaultAction::Local(resolution) => {
                let kind =
                    guest.resolve_local(resolution).map_err(|source| FaultLoopError::Install { page, source })?;
                stats.record_fault(kind, true);
                stats.record_fault_latency(kind, true, monotonic_ns().saturating_sub(started));
            }
            FaultAction::Fetch(claim) => {
                let known = claim.was_known();
                self.count_fetched_fault(&fault, known);
                guest.wait_for_fetch(page, started, known);
                // If the fetcher is gone its exit is reported by the loop;
                // the claim, dropped, leaves the page frozen.
                let _ = claims.send(claim);
            }
            FaultAction::Wait { known } => {
                self.count_fetched_fault(&fault, known);
                guest.wait_for_fetch(page, started, known);
            }
        }
        state.in_hand = false;
        Ok(())
    }

    fn count_fetched_fault(&self, fault: &PageFault, known: bool) {
        let stats = &self.guest.stats;
        stats.record_fault(FaultKind::Fetched, known);
        if !known {
            stats.faults_unknown.fetch_add(1, Ordering::Relaxed);
        }
        if !fault.is_minor() {
            stats.faults_missing_fetched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the loop has done, kept outside it so that it survives a panic.
#[derive(Debug, Default)]
struct LoopState {
    /// Faults read before switchover and not handled yet.
    held: u64,
    /// A fault is being handled (it is neither held nor waiting on a fetch).
    in_hand: bool,
    /// Faults handled after switchover.
    handled: u64,
}

/// Counts the faults a stopped loop leaves unresolved, and says so in the
/// log: the fault its error is about under that error's reason; every other
/// fault it held, had in hand, or that waits for a fetch under
/// `fault_loop_stopped` (a page several vCPUs wait on counts once).
fn account_blocked(guest: &GuestMemory, error: &FaultLoopError, state: &LoopState) {
    let stats = &guest.stats;
    let waiting = guest.faults_waiting();
    let mut others = state.held + waiting;
    match error.block_reason() {
        Some(reason) => {
            stats.block_faults(reason, 1);
            if !state.in_hand {
                // A demand fetch's fault: one of the waiting ones.
                others = others.saturating_sub(1);
            }
        }
        None => others += u64::from(state.in_hand),
    }
    stats.block_faults(BlockReason::FaultLoopStopped, others);
    let reason = error.block_reason().map_or("", BlockReason::name);
    tracing::error!(
        "{}; faults left blocked: {} ({reason}), {others} (fault_loop_stopped: {} held before switchover, the \
         others waiting on pages {:?}{})",
        describe_stop(error),
        u8::from(!reason.is_empty()),
        state.held,
        guest.pages_waiting(BLOCKED_PAGES_LOGGED),
        if waiting > BLOCKED_PAGES_LOGGED as u64 { ", …" } else { "" }
    );
}

fn log_other_event(event: &UffdEvent) {
    tracing::warn!("userfaultfd event {event:?} ({}) needs no action from the agent", event.name());
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Raises the calling thread's scheduling priority to `nice` (needs
/// CAP_SYS_NICE, or an RLIMIT_NICE of at least `20 - nice`; the agent runs
/// without it, only less well on a busy host).
fn raise_thread_priority(nice: i32) -> std::io::Result<()> {
    Ok(rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)?)
}
