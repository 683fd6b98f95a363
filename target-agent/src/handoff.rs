//! The target agent's hand-off socket, for the agent's whole life.
//!
//! The socket is bound by the agent shell's policy
//! ([`HandoffSocket`]: a path that exists and is not a socket is refused
//! and left alone, a socket some process listens on is refused ("in use"),
//! a stale one replaced, mode 0600, or 0660 for its `--handoff-group`). The binary binds it at start
//! ([`HandoffEndpoint::bind`]), before it says it is listening, so that a
//! bad path fails the agent then and not after a VMM has come.
//!
//! Every connection's peer is checked first against the allow-list of uids
//! ([`PeerAllowList`], `--handoff-allow-uid`): a peer not on it is refused
//! before anything is read, gets the refusal's reason as its reply, and the
//! agent logs a warning naming its uid and pid and goes on accepting.
//!
//! Connections are accepted until one valid target hand-off arrives (a
//! refused one is logged and the next awaited). From then on the socket
//! stays bound, and every later connection is refused with
//! `{"ok":false,"error":"this agent already has its VM's memory ..."}`, as
//! the source agent does: a second target agent started on the same path
//! finds it in use and stops, rather than take the path over while this
//! one serves the guest.
//!
//! The socket file goes when the agent exits cleanly. An agent that dies
//! (SIGKILL, a crash) leaves it behind, stale: nothing listens on it, so a
//! new agent binds it again, and the VMM, which saw its hand-off connection
//! close, hands its memory over to that one.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use guest_memory::handoff::{Handoff, Role, receive_handoff_with, refuse_handoff};
use pageserver_agent_shell::exit::describe;
use pageserver_agent_shell::{HANDOFF_READ_TIMEOUT, HandoffGroup, HandoffSocket, HandoffSocketError, PeerAllowList};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Connections refused at once (peers not allowed, and every connection
/// after the hand-off; the rest wait in the backlog): a peer that connects
/// and says nothing holds up no one for long.
const CONCURRENT_REFUSALS: usize = 4;

/// The pause after a failed accept.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Whose memory the agent has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOver {
    pub vm: String,
    pub pid: u32,
}

/// Why the hand-off socket failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffEndpointError {
    #[error("hand-off socket")]
    Socket(#[from] HandoffSocketError),
    #[error("receiving a hand-off on {path}: the receiving task failed", path = path.display())]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The hand-off socket of one target agent; see the module docs.
#[derive(Debug)]
pub struct HandoffEndpoint {
    path: PathBuf,
    /// Whose connections are read at all.
    peers: PeerAllowList,
    /// The group the socket is shared with (mode 0660), if any.
    group: Option<HandoffGroup>,
    /// Bound at start, until the accepting begins.
    bound: Mutex<Option<HandoffSocket>>,
    /// Set before the VMM is told its hand-off was taken: once a VMM (or
    /// an orchestrator watching it) knows, this agent says so too, and a
    /// `Switchover` sent right after is not refused as "no memory yet".
    handed_over: Arc<OnceLock<HandedOver>>,
}

impl HandoffEndpoint {
    /// The endpoint for `path` (shared with `group`, if given), taking
    /// hand-offs from `peers` only.
    pub fn new(path: impl Into<PathBuf>, peers: PeerAllowList, group: Option<HandoffGroup>) -> Self {
        Self { path: path.into(), peers, group, bound: Mutex::new(None), handed_over: Arc::new(OnceLock::new()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Binds the socket now (idempotent).
    pub fn bind(&self) -> Result<(), HandoffSocketError> {
        let mut bound = self.bound.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if bound.is_none() {
            *bound = Some(HandoffSocket::bind(&self.path, self.group.as_ref())?);
        }
        Ok(())
    }

    /// Whose memory the agent has, once a hand-off was accepted.
    pub fn handed_over(&self) -> Option<&HandedOver> {
        self.handed_over.get()
    }

    /// Accepts connections until one valid target hand-off arrives (binding
    /// the socket first if [`HandoffEndpoint::bind`] was not called); then
    /// refuses every later connection, for as long as the runtime runs.
    pub async fn accept(&self) -> Result<Handoff, HandoffEndpointError> {
        self.bind()?;
        let socket = self.bound.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let socket = match socket {
            Some(socket) => socket,
            None => HandoffSocket::bind(&self.path, self.group.as_ref())?,
        };
        let listener = socket.async_listener()?;
        tracing::info!(allowed_uids = %self.peers, "waiting for the VMM hand-off on {}", self.path.display());
        let refusals = Arc::new(Semaphore::new(CONCURRENT_REFUSALS));
        loop {
            let Some(stream) = accept_one(&listener).await else { continue };
            if let Err(refused) = self.peers.check(&stream) {
                tracing::warn!(error = %describe(&refused), "refusing a hand-off from a peer not allowed");
                refuse(stream, refused.to_string(), &refusals).await;
                continue;
            }
            let handed_over = self.handed_over.clone();
            let received = tokio::task::spawn_blocking(move || {
                receive_handoff_with(stream, Role::Target, |handoff| {
                    let owner = HandedOver { vm: handoff.message.vm.clone(), pid: handoff.message.pid };
                    let _ = handed_over.set(owner.clone());
                    Ok::<_, std::convert::Infallible>((handoff, owner))
                })
            })
            .await
            .map_err(|source| HandoffEndpointError::Task { path: self.path.clone(), source })?;
            match received {
                Ok((handoff, owner)) => {
                    let peers = self.peers.clone();
                    tokio::spawn(refuse_later_connections(socket, listener, peers, owner, refusals));
                    return Ok(handoff);
                }
                Err(e) => tracing::warn!("refused a hand-off: {e}"),
            }
        }
    }
}

/// The next connection, blocking with a read timeout (a peer that connects
/// and says nothing must not block us); `None` after an accept error.
async fn accept_one(listener: &UnixListener) -> Option<std::os::unix::net::UnixStream> {
    let stream = match listener.accept().await {
        Ok((stream, _)) => stream.into_std().and_then(|stream| {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(HANDOFF_READ_TIMEOUT))?;
            Ok(stream)
        }),
        Err(e) => Err(e),
    };
    match stream {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!("hand-off accept: {e}");
            // Not a busy loop on a lasting error (out of descriptors).
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            None
        }
    }
}

/// Keeps `socket` bound, answering every connection with a refusal, until
/// the runtime stops (then dropping the socket removes its file). A peer not
/// on `peers` is told only that.
async fn refuse_later_connections(
    socket: HandoffSocket,
    listener: UnixListener,
    peers: PeerAllowList,
    owner: HandedOver,
    refusals: Arc<Semaphore>,
) {
    let already_handed_over = format!(
        "this agent already has its VM's memory (VM {:?}, VMM pid {}); start another agent on another socket",
        owner.vm, owner.pid
    );
    loop {
        let Some(stream) = accept_one(&listener).await else { continue };
        let reason = match peers.check(&stream) {
            Ok(_) => {
                tracing::warn!(socket = %socket.path().display(), "refusing a second hand-off: {already_handed_over}");
                already_handed_over.clone()
            }
            Err(refused) => {
                tracing::warn!(error = %describe(&refused), "refusing a hand-off from a peer not allowed");
                refused.to_string()
            }
        };
        refuse(stream, reason, &refusals).await;
    }
}

/// Answers `stream` with a refusal naming `reason`, on a blocking thread
/// once one of the `slots` is free (the accepting waits for it meanwhile).
async fn refuse(stream: std::os::unix::net::UnixStream, reason: String, slots: &Arc<Semaphore>) {
    let Ok(slot) = slots.clone().acquire_owned().await else { return };
    tokio::task::spawn_blocking(move || {
        refuse_handoff(stream, &reason, HANDOFF_READ_TIMEOUT);
        drop(slot);
    });
}
