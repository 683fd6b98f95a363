//! The fault loop: reads the guest's userfaultfd and resolves each fault.
//!
//! It runs on its own thread with a single-threaded tokio runtime that also
//! drives its own connection to the source, so a demand fetch goes from the
//! fault to the socket and back to UFFDIO_CONTINUE without a thread hop (a
//! hop costs ~20 µs here). Background transfers use another connection on
//! another runtime and cannot hold anything this loop waits for, except a
//! page the background has already claimed (then the fault waits for that
//! page's reply, bounded by the background's small window).
//!
//! Per fault, by the page's state (see `page_state`):
//! - `Fresh` / `Installed`: UFFDIO_CONTINUE at once (a fresh hole, raised as
//!   MISSING, is zero-filled first);
//! - `Unknown` / `Stale`: claim it, send a one-page request on the demand
//!   stream; the reply is written and continued by [`DemandReplies`];
//! - `Fetching*`: someone is fetching it; the fault is noted and the
//!   fetcher's CONTINUE wakes it.
//!
//! Faults read before switchover are held until then: the source may still
//! be running, and nothing may be installed from it before it is paused.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use guest_memory::sys::{self, UffdEvent};
use pageserver_proto::v1::PagesRequest;
use tokio::sync::{mpsc, watch};

use crate::guest::{FetchOrigin, GuestMemory};
use crate::page_state::PageState;
use crate::source;
use crate::stats::FaultKind;

/// Nice value of the fault-loop thread: a vCPU waits on every fault it
/// handles, so it must not queue behind other vCPUs for a CPU.
const FAULT_LOOP_NICE: i32 = -10;

/// Shared with the background puller: where the guest faulted last.
#[derive(Debug, Default)]
pub struct FaultHint {
    pub last_fault_page: AtomicU64,
}

/// Send times of demand requests, by page number modulo its size: a fixed
/// table (no allocation per fault); a collision only loses a latency sample.
struct SentTimes(RefCell<Box<[(u64, u64)]>>);

impl SentTimes {
    const SLOTS: usize = 4096;

    fn new() -> Self {
        Self(RefCell::new(vec![(u64::MAX, 0); Self::SLOTS].into_boxed_slice()))
    }

    fn sent(&self, page: u64, at_ns: u64) {
        self.0.borrow_mut()[page as usize % Self::SLOTS] = (page, at_ns);
    }

    /// When the request for `page` was sent, if its slot still holds it.
    fn take(&self, page: u64) -> Option<u64> {
        let mut slots = self.0.borrow_mut();
        let slot = &mut slots[page as usize % Self::SLOTS];
        (slot.0 == page).then(|| std::mem::replace(slot, (u64::MAX, 0)).1)
    }
}

#[derive(Debug)]
pub struct FaultLoop {
    guest: Arc<GuestMemory>,
    source_url: String,
    /// Becomes true at switchover.
    postcopy: watch::Receiver<bool>,
    hint: Arc<FaultHint>,
}

impl FaultLoop {
    pub fn new(
        guest: Arc<GuestMemory>,
        source_url: String,
        postcopy: watch::Receiver<bool>,
        hint: Arc<FaultHint>,
    ) -> Self {
        Self { guest, source_url, postcopy, hint }
    }

    /// Starts the loop on its own thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("fault-loop".into()).spawn(move || {
            if let Err(e) = crate::sys::raise_thread_priority(FAULT_LOOP_NICE) {
                tracing::warn!("fault loop keeps normal priority ({e}): busy vCPUs may delay it");
            }
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    self.guest.stats.fail(format!("fault loop runtime: {e}"));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            if let Err(e) = local.block_on(&rt, self.run()) {
                tracing::error!("fault loop stopped: {e}");
                // Faults stay unresolved (the guest freezes) rather than be
                // resolved wrongly.
            }
        })
    }

    async fn run(mut self) -> Result<(), String> {
        sys::set_nonblocking(std::os::fd::AsFd::as_fd(&self.guest.uffd))
            .map_err(|e| format!("uffd O_NONBLOCK: {e}"))?;
        let afd =
            crate::sys::async_uffd(&self.guest.uffd).map_err(|e| format!("registering the uffd with epoll: {e}"))?;
        let (req_tx, req_rx) = mpsc::unbounded_channel::<PagesRequest>();
        tokio::task::spawn_local(DemandReplies { guest: self.guest.clone(), url: self.source_url.clone() }.run(req_rx));
        let mut held: Vec<(sys::PageFault, u64)> = Vec::new();
        let mut postcopy = *self.postcopy.borrow();
        let mut events = [UffdEvent::Other { event: 0 }; 64];
        loop {
            tokio::select! {
                changed = self.postcopy.changed(), if !postcopy => {
                    if changed.is_err() { return Ok(()); }
                    postcopy = *self.postcopy.borrow();
                    if postcopy {
                        for (fault, started) in held.drain(..) {
                            self.handle(fault, started, &req_tx);
                        }
                    }
                }
                guard = afd.readable() => {
                    let mut guard = guard.map_err(|e| format!("polling the uffd: {e}"))?;
                    loop {
                        let n = self.guest.uffd.read_events(&mut events).map_err(|e| format!("reading the uffd: {e}"))?;
                        if n == 0 {
                            guard.clear_ready();
                            break;
                        }
                        let now = sys::monotonic_ns();
                        for ev in &events[..n] {
                            match *ev {
                                UffdEvent::PageFault(fault) if postcopy => self.handle(fault, now, &req_tx),
                                UffdEvent::PageFault(fault) => held.push((fault, now)),
                                other => tracing::warn!("ignoring userfaultfd event {other:?}"),
                            }
                        }
                    }
                }
            }
        }
    }

    fn handle(&self, fault: sys::PageFault, started: u64, req_tx: &mpsc::UnboundedSender<PagesRequest>) {
        let guest = &self.guest;
        let Some(page) = guest.layout.page_at_host_addr(fault.address) else {
            tracing::error!("fault at {:#x} outside every region", fault.address);
            return;
        };
        self.hint.last_fault_page.store(page, Ordering::Relaxed);
        let stats = &guest.stats;
        loop {
            match guest.install_fresh(page) {
                Ok(Some(kind)) => {
                    stats.record_fault(kind, true, Some(sys::monotonic_ns().saturating_sub(started)));
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("fault on page {page}: {e}");
                    return;
                }
            }
            // Needs the source. Claim it, or join whoever has.
            let claimed = guest.states.claim_for_demand(page);
            let state = match claimed {
                Some(from) => from,
                None => match guest.states.state(page) {
                    s @ (PageState::FetchingUnknown | PageState::FetchingStale) => s,
                    _ => continue, // became fresh/installed meanwhile
                },
            };
            let known = matches!(state, PageState::Stale | PageState::FetchingStale);
            if !known {
                stats.faults_unknown.fetch_add(1, Ordering::Relaxed);
            }
            if !fault.is_minor() {
                stats.faults_missing_fetched.fetch_add(1, Ordering::Relaxed);
            }
            // Latency is recorded by the installer, from this start time.
            guest.note_waiting_fault(page, started);
            stats.record_fault(FaultKind::Fetched, known, None);
            if claimed.is_some() {
                let (region, index) = guest.layout.locate(page);
                let _ = req_tx.send(PagesRequest { request_id: page, region, first_index: index, count: 1 });
            } else if guest.states.state(page) == PageState::Installed {
                // Installed between our look and our note: settle it here
                // (the installer has already cleared the notes it saw).
                let _ = guest.install_fresh(page);
                guest.settle_waiting_fault(page, known);
            }
            return;
        }
    }
}

/// Sends demand requests and installs their replies, reconnecting to the
/// source (and re-asking for every unanswered page) if the stream breaks.
struct DemandReplies {
    guest: Arc<GuestMemory>,
    url: String,
}

impl DemandReplies {
    async fn run(self, mut requests: mpsc::UnboundedReceiver<PagesRequest>) {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.serve(&mut requests).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("demand stream to the source broke: {e}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One connection's life. Returns Ok when the fault loop is gone.
    async fn serve(&self, requests: &mut mpsc::UnboundedReceiver<PagesRequest>) -> Result<(), source::SourceError> {
        let result = self.serve_connection(requests).await;
        self.guest.stats.note_source_call(&result);
        result
    }

    async fn serve_connection(
        &self,
        requests: &mut mpsc::UnboundedReceiver<PagesRequest>,
    ) -> Result<(), source::SourceError> {
        let stats = &self.guest.stats;
        let connected = source::connect(&self.url).await;
        stats.note_source_call(&connected);
        let mut client = connected?;
        let (tx, rx) = mpsc::unbounded_channel::<PagesRequest>();
        // Re-ask for everything claimed and still unanswered.
        for page in self.guest.states.demand_claims() {
            let (region, index) = self.guest.layout.locate(page);
            let _ = tx.send(PagesRequest { request_id: page, region, first_index: index, count: 1 });
        }
        let sent_ns = SentTimes::new();
        let mut replies = client
            .get_pages(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|status| source::SourceError::Rpc { rpc: "GetPages", status })?
            .into_inner();
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else { return Ok(()) };
                    sent_ns.sent(req.request_id, sys::monotonic_ns());
                    if tx.send(req).is_err() {
                        return Err(source::SourceError::StreamEnded(self.guest.states.demand_claims().len()));
                    }
                }
                reply = replies.message() => {
                    let reply = reply.map_err(|status| source::SourceError::Rpc { rpc: "GetPages", status })?
                        .ok_or_else(|| source::SourceError::StreamEnded(self.guest.states.demand_claims().len()))?;
                    stats.source_up.store(true, Ordering::Relaxed);
                    if let Some(err) = reply.error {
                        // Freeze rather than guess: the page stays claimed.
                        tracing::error!("source refused demand request {}: {} {}", reply.request_id, err.code, err.message);
                        continue;
                    }
                    if let Some(t) = sent_ns.take(reply.request_id) {
                        stats.record_fetch_latency(sys::monotonic_ns().saturating_sub(t));
                    }
                    for p in &reply.pages {
                        let page = match self.guest.layout.global_page(p.region, p.index) {
                            Ok(page) => page,
                            Err(e) => { tracing::error!("demand reply: {e}"); continue; }
                        };
                        if let Err(e) = self.guest.install_fetched(page, p.zero, &p.data, FetchOrigin::Demand) {
                            tracing::error!("installing page {page}: {e}");
                        }
                    }
                }
            }
        }
    }
}
