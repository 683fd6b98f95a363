//! The VMM's side of the hand-off, kept alive: when the agent at the other
//! end goes away (its end of the connection closes), the same memory and
//! descriptors are handed over again to the next agent that listens on the
//! socket, for as long as the VM lives.
//!
//! A paused VM says so again to each new agent, right after its hand-off.
//! Events go to whichever agent holds the memory at the moment; the
//! connection and the paused state share one lock, so a pause that races a
//! new hand-off reaches the new agent exactly once.
//!
//! An agent may send checkpoints on the connection; the last one goes to
//! the next agent with its hand-off (a target agent taking over a migration
//! under way needs it).
//!
//! Descriptors: the link owns duplicates of the memory file, the uffd and
//! the pagemap, so that it can pass them again whatever the rest of the VMM
//! does with its own copies.
//!
//! The VMM stand-in and the VMM shim (inside QEMU) both use it.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handoff::{
    AgentMessage, HANDOFF_VERSION, HandoffError, HandoffMessage, Role, VmmEvent, send_event, send_handoff,
};
use crate::layout::RegionLayout;

/// How often a VM whose agent went away tries the socket for a new one, and
/// how often the first hand-off tries a socket that is not there yet.
const RECONNECT_EVERY: Duration = Duration::from_millis(50);

/// What happens to the link, for the VMM to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// The agent holding the memory went away (after `handoffs` hand-offs).
    AgentGone { handoffs: u32 },
    /// A new agent took the memory over.
    HandedOff { handoffs: u32 },
}

/// Why the first hand-off did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no agent listening on {socket} after {waited:.1?}: {source}")]
    Connect {
        socket: PathBuf,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    // The shim prints errors by their Display alone: the cause is in it.
    #[error("hand-off to the agent on {socket} failed: {source}")]
    Handoff {
        socket: PathBuf,
        #[source]
        source: HandoffError,
    },
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
}

/// Connects to an agent's hand-off socket, retrying while it is not there
/// yet (the agent may start after the VMM), for at most `timeout`.
pub fn connect_with_retry(socket: &Path, timeout: Duration) -> Result<UnixStream, LinkError> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if started.elapsed() < timeout
                    && matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
            {
                std::thread::sleep(RECONNECT_EVERY);
            }
            Err(source) => {
                return Err(LinkError::Connect { socket: socket.to_owned(), waited: started.elapsed(), source });
            }
        }
    }
}

/// Who hands over, and what.
#[allow(missing_debug_implementations, reason = "descriptors as trait objects")]
pub struct LinkConfig<'a> {
    pub socket: PathBuf,
    pub role: Role,
    pub vm: String,
    pub region: RegionLayout,
    /// The descriptors the role hands over, in its order.
    pub fds: &'a [&'a dyn AsFd],
    /// How long the first hand-off waits for the socket to appear.
    pub connect_timeout: Duration,
    /// How long a hand-off waits for the agent's verdict.
    pub reply_timeout: Duration,
}

#[derive(Debug)]
struct LinkState {
    /// The connection to the agent holding the memory (None between agents).
    connection: Option<UnixStream>,
    /// When the VM paused (None while it runs).
    paused_at_ns: Option<u64>,
    /// Hand-offs accepted so far.
    handoffs: u32,
    /// The last checkpoint an agent sent, for the next one.
    checkpoint: Option<serde_json::Value>,
}

/// The hand-off connection of one VM; see the module docs.
pub struct HandoffLink {
    socket: PathBuf,
    role: Role,
    vm: String,
    region: RegionLayout,
    /// Duplicates of the descriptors the role hands over, in its order.
    fds: Vec<OwnedFd>,
    state: Mutex<LinkState>,
    on_change: Box<dyn Fn(LinkChange) + Send + Sync>,
}

impl std::fmt::Debug for HandoffLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffLink").field("socket", &self.socket).field("role", &self.role).finish_non_exhaustive()
    }
}

impl HandoffLink {
    /// Hands the memory to the agent on the socket (waiting a while for it
    /// to listen), then follows the connection on a thread of its own;
    /// `on_change` hears of agents going and coming.
    pub fn establish(
        config: LinkConfig<'_>,
        on_change: impl Fn(LinkChange) + Send + Sync + 'static,
    ) -> Result<Arc<Self>, LinkError> {
        let fds = config
            .fds
            .iter()
            .map(|fd| fd.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LinkError::Io("duplicating the hand-off descriptors", e))?;
        let link = Arc::new(Self {
            socket: config.socket,
            role: config.role,
            vm: config.vm,
            region: config.region,
            fds,
            state: Mutex::new(LinkState { connection: None, paused_at_ns: None, handoffs: 0, checkpoint: None }),
            on_change: Box::new(on_change),
        });
        let stream = connect_with_retry(&link.socket, config.connect_timeout)?;
        let io = |context| move |e| LinkError::Io(context, e);
        stream.set_read_timeout(Some(config.reply_timeout)).map_err(io("setting the hand-off reply timeout"))?;
        link.hand_off(&stream, 0).map_err(|source| LinkError::Handoff { socket: link.socket.clone(), source })?;
        stream.set_read_timeout(None).map_err(io("clearing the hand-off reply timeout"))?;
        let watched = stream.try_clone().map_err(io("cloning the hand-off connection"))?;
        {
            let mut state = link.lock();
            state.connection = Some(stream);
            state.handoffs = 1;
        }
        let follower = link.clone();
        std::thread::Builder::new()
            .name("handoff-link".into())
            .spawn(move || follower.follow(watched))
            .map_err(io("starting the hand-off thread"))?;
        Ok(link)
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hand_off(&self, stream: &UnixStream, previous_handoffs: u32) -> Result<(), HandoffError> {
        let checkpoint = self.lock().checkpoint.clone();
        let message = HandoffMessage {
            version: HANDOFF_VERSION,
            role: self.role,
            vm: self.vm.clone(),
            pid: std::process::id(),
            regions: vec![self.region],
            fds: self.role.fds().to_vec(),
            previous_handoffs,
            checkpoint,
        };
        let fds: Vec<_> = self.fds.iter().map(|fd| fd.as_fd()).collect();
        send_handoff(stream, &message, &fds)
    }

    /// Records the event and tells the agent holding the memory, if any (a
    /// new agent hears of a pause at its hand-off).
    pub fn send_event(&self, event: VmmEvent) -> Result<(), HandoffError> {
        let mut state = self.lock();
        state.paused_at_ns = match event {
            VmmEvent::Paused { at_ns } => Some(at_ns),
            VmmEvent::Resumed => None,
        };
        match &state.connection {
            Some(connection) => send_event(connection, event),
            None => Ok(()),
        }
    }

    /// Hand-offs accepted so far.
    pub fn handoffs(&self) -> u32 {
        self.lock().handoffs
    }

    /// Waits for the agent to go away, then hands the memory to the next one;
    /// for ever (the process's exit ends it).
    fn follow(&self, mut watched: UnixStream) {
        loop {
            // The agent's messages (checkpoints), until its end (EOF, or an
            // error when it died).
            for line in BufReader::new(&watched).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<AgentMessage>(&line) {
                    Ok(AgentMessage::Checkpoint(checkpoint)) => self.lock().checkpoint = Some(checkpoint),
                    Err(error) => eprintln!("{}: the agent sent {line:?}, which is not a message ({error})", self.vm),
                }
            }
            let handoffs = {
                let mut state = self.lock();
                state.connection = None;
                state.handoffs
            };
            eprintln!(
                "{}: the agent on {} went away; handing the memory over again to the next one",
                self.vm,
                self.socket.display()
            );
            (self.on_change)(LinkChange::AgentGone { handoffs });
            watched = self.hand_off_again(handoffs);
        }
    }

    /// Tries the socket until an agent takes the memory; returns the new
    /// connection (already recorded, the pause already sent).
    fn hand_off_again(&self, previous_handoffs: u32) -> UnixStream {
        loop {
            std::thread::sleep(RECONNECT_EVERY);
            let Ok(stream) = UnixStream::connect(&self.socket) else { continue };
            if let Err(error) = self.hand_off(&stream, previous_handoffs) {
                eprintln!("{}: hand-off to the new agent failed ({error}); trying again", self.vm);
                continue;
            }
            let Ok(watched) = stream.try_clone() else { continue };
            let mut state = self.lock();
            if let Some(at_ns) = state.paused_at_ns
                && let Err(error) = send_event(&stream, VmmEvent::Paused { at_ns })
            {
                eprintln!("{}: telling the new agent about the pause failed ({error}); trying again", self.vm);
                continue;
            }
            state.connection = Some(stream);
            state.handoffs += 1;
            let handoffs = state.handoffs;
            drop(state);
            eprintln!("{}: memory handed over again (hand-off {handoffs})", self.vm);
            (self.on_change)(LinkChange::HandedOff { handoffs });
            return watched;
        }
    }
}
