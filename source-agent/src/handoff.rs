//! Accepting the VMM's hand-off on a Unix socket.
//!
//! The agent binds the socket by the shell's policy
//! ([`HandoffSocket`]: a path that is not a socket, or a socket in use, is
//! refused; a stale socket is replaced; mode 0600, or 0660 for its
//! `--handoff-group`) and accepts connections
//! on a dedicated thread, handling each on a thread of its own, at most
//! [`MAX_CONCURRENT_HANDOFFS`] at once (the rest wait in the listen backlog):
//! a peer that connects and says nothing does not hold up the VMM behind it.
//! A peer whose uid is not on the allow-list ([`PeerAllowList`],
//! `--handoff-allow-uid`) is refused before anything is read: it gets the
//! refusal's reason as its reply, the agent logs a warning naming its uid
//! and pid, and goes on waiting. Each connection gets
//! [`HANDOFF_READ_TIMEOUT`] to deliver its hand-off message, which
//! `guest_memory::handoff::receive_handoff_with` validates. Of a valid one
//! the memory file is reopened read-only, dirty tracking starts (the initial write-protecting
//! scan, which also proves the uffd is registered WP-async), and the memory
//! is attached to the agent; only then is the VMM answered `ok`, so an `ok`
//! means the agent is serving. Any failure on the way is sent to the VMM as
//! the refusal's message, logged, and the agent keeps waiting. After a
//! success, further connections are told that this agent already has its
//! VM's memory (of two valid hand-offs at once, the first to attach wins).
//!
//! The accepted connection then carries the VMM's events, followed on a
//! second thread: `paused` / `resumed` switch the VM's paused flag (a pause
//! also triggers a dirty scan), and end-of-file or a malformed event means
//! the VMM is gone: its memory can no longer change, so the VM counts as
//! paused from then on (see [`crate::dirty`] for what that does to epochs).
#![forbid(unsafe_code)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guest_memory::handoff::{self, EventReader, Handoff, HandoffError, Role, VmmEvent};
use pageserver_agent_shell::exit::describe;
use pageserver_agent_shell::{HANDOFF_READ_TIMEOUT, HandoffGroup, HandoffSocket, HandoffSocketError, PeerAllowList};

use crate::agent::SourceAgent;
use crate::memory::{MemoryError, SourceMemory};

/// Hand-off connections handled at once.
pub const MAX_CONCURRENT_HANDOFFS: usize = 4;

/// Why one hand-off connection did not give the agent its memory.
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error("{0}")]
    Handoff(#[from] HandoffError),
    #[error("setting the socket timeout: {0}")]
    Timeout(#[source] std::io::Error),
    #[error("its memory cannot be served: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    AlreadyAttached(#[from] crate::agent::AlreadyAttached),
}

/// The listening hand-off socket. Dropping it stops accepting and removes the
/// socket file.
#[derive(Debug)]
pub struct HandoffListener {
    socket: HandoffSocket,
    stop: Arc<AtomicBool>,
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept thread so that it sees the flag; then `socket` goes,
        // and the file with it.
        let _ = UnixStream::connect(self.socket.path());
    }
}

/// Binds `path` (shared with `group`, if given) and accepts the VMM's
/// hand-off for `agent` on a new thread, from peers whose uid is on `peers`
/// only.
pub fn listen_for_handoff(
    path: &Path,
    peers: PeerAllowList,
    group: Option<&HandoffGroup>,
    agent: Arc<SourceAgent>,
) -> Result<HandoffListener, HandoffSocketError> {
    let socket = HandoffSocket::bind(path, group)?;
    let listener = socket.try_clone_listener()?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepting_stop = stop.clone();
    std::thread::Builder::new()
        .name("handoff-accept".into())
        .spawn(move || accept_loop(listener, &peers, agent, accepting_stop))
        .map_err(|source| HandoffSocketError::Io {
            doing: "starting the accept thread for",
            path: path.into(),
            source,
        })?;
    tracing::info!(socket = %path.display(), "waiting for the VMM hand-off");
    Ok(HandoffListener { socket, stop })
}

fn accept_loop(listener: UnixListener, peers: &PeerAllowList, agent: Arc<SourceAgent>, stop: Arc<AtomicBool>) {
    // One token per connection being handled.
    let (release, tokens) = std::sync::mpsc::sync_channel::<()>(MAX_CONCURRENT_HANDOFFS);
    for _ in 0..MAX_CONCURRENT_HANDOFFS {
        let _ = release.send(());
    }
    for connection in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match connection {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a hand-off connection failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if tokens.recv().is_err() {
            break;
        }
        let (agent, peers, done) = (agent.clone(), peers.clone(), release.clone());
        let handler = std::thread::Builder::new().name("handoff-connection".into()).spawn(move || {
            handle_connection(stream, &peers, &agent);
            let _ = done.send(());
        });
        if let Err(error) = handler {
            // The connection went with the closure: the peer sees it closed.
            tracing::error!(%error, "cannot start a thread for a hand-off connection; dropped it");
            let _ = release.send(());
        }
    }
}

fn handle_connection(stream: UnixStream, peers: &PeerAllowList, agent: &SourceAgent) {
    // Before anything else: a peer not allowed learns nothing of this agent.
    if let Err(refused) = peers.check(&stream) {
        tracing::warn!(error = %describe(&refused), "refusing a hand-off from a peer not allowed");
        handoff::refuse_handoff(stream, &refused.to_string(), HANDOFF_READ_TIMEOUT);
        return;
    }
    if let Some(memory) = agent.memory() {
        let reason = format!("this agent already serves the memory of {}", memory.origin());
        tracing::warn!(reason, "refusing a second hand-off");
        handoff::refuse_handoff(stream, &reason, HANDOFF_READ_TIMEOUT);
        return;
    }
    if let Err(error) = accept_one(stream, agent) {
        tracing::error!(%error, "hand-off failed; still waiting for one");
    }
}

fn accept_one(stream: UnixStream, agent: &SourceAgent) -> Result<(), AcceptError> {
    // The timeout is a socket option: setting it through a clone sets it on
    // `stream` too, and lets us clear it once the hand-off is in.
    let control = stream.try_clone().map_err(AcceptError::Timeout)?;
    control.set_read_timeout(Some(HANDOFF_READ_TIMEOUT)).map_err(AcceptError::Timeout)?;
    // The VMM is told "ok" only once the memory is mapped, tracked and
    // attached; a failure on the way is its refusal message.
    let (memory, events) = handoff::receive_handoff_with(stream, Role::Source, |handoff| {
        let Handoff { message, layout, memory, uffd, pagemap, events } = handoff;
        if message.vm != agent.vm() {
            tracing::warn!(handoff_vm = %message.vm, agent_vm = %agent.vm(), "the VMM names its VM differently");
        }
        let memory = SourceMemory::from_handoff(&message, layout, memory, uffd, pagemap)?;
        let memory = agent.attach(memory)?;
        tracing::info!(
            vm = %message.vm,
            pid = message.pid,
            regions = memory.layout().regions().len(),
            pages = memory.layout().total_pages(),
            page_size = memory.page_size(),
            "VMM memory handed off; serving"
        );
        Ok::<_, AcceptError>((memory, events))
    })?;
    if let Err(error) = control.set_read_timeout(None) {
        // A timeout would end the event stream early: the VMM would count as gone.
        tracing::error!(%error, "cannot clear the hand-off socket's timeout; treating the VMM as gone");
        memory.dirty().vmm_gone();
        return Ok(());
    }
    let events_memory = memory.clone();
    if let Err(error) =
        std::thread::Builder::new().name("vmm-events".into()).spawn(move || follow_vmm_events(events, &events_memory))
    {
        // Without the events we cannot know when the VM pauses: treat the VMM
        // as gone rather than never allow a final bitmap.
        tracing::error!(%error, "cannot start the VMM event thread; treating the VMM as gone");
        memory.dirty().vmm_gone();
    }
    Ok(())
}

fn follow_vmm_events(mut events: EventReader, memory: &SourceMemory) {
    let dirty = memory.dirty();
    loop {
        match events.next_event() {
            Ok(Some(VmmEvent::Paused { at_ns })) => {
                tracing::info!(at_ns, "the VM is paused");
                match dirty.vm_paused() {
                    Ok(epoch) => tracing::info!(epoch, "scanned dirty pages at the pause"),
                    Err(error) => tracing::warn!(%error, "dirty scan at the pause failed"),
                }
            }
            Ok(Some(VmmEvent::Resumed)) => {
                tracing::info!("the VM resumed");
                dirty.vm_resumed();
            }
            Ok(None) => {
                tracing::warn!("the VMM closed the hand-off connection: its memory no longer changes");
                dirty.vmm_gone();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "reading the VMM's events failed; treating the VMM as gone");
                dirty.vmm_gone();
                return;
            }
        }
    }
}
