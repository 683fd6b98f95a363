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
//! (source) the pagemap, so that it can pass them again whatever the rest of
//! the stand-in does with its own copies.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use guest_memory::RegionLayout;
use guest_memory::handoff::{
    AgentMessage, HANDOFF_VERSION, HandoffError, HandoffMessage, Role, VmmEvent, send_event, send_handoff,
};

use crate::error::{VmmError, io_context};
use crate::protocol::{EventSink, StandinEvent};
use crate::ram::{HANDOFF_CONNECT_TIMEOUT, connect_handoff};

/// How often a VM whose agent went away tries the socket for a new one.
const RECONNECT_EVERY: Duration = Duration::from_millis(50);

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
#[derive(Debug)]
pub struct HandoffLink {
    socket: PathBuf,
    role: Role,
    vm: String,
    region: RegionLayout,
    /// Duplicates of the descriptors the role hands over, in its order.
    fds: Vec<OwnedFd>,
    state: Mutex<LinkState>,
    events: Arc<EventSink>,
}

impl HandoffLink {
    /// Hands the memory to the agent on `socket` (waiting a while for it to
    /// listen), then follows the connection on a thread of its own.
    pub fn establish(
        socket: PathBuf,
        role: Role,
        vm: &str,
        region: RegionLayout,
        fds: &[&dyn AsFd],
        events: Arc<EventSink>,
    ) -> Result<Arc<Self>, VmmError> {
        let fds = fds
            .iter()
            .map(|fd| fd.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_context("duplicating the hand-off descriptors"))?;
        let link = Arc::new(Self {
            socket,
            role,
            vm: vm.to_owned(),
            region,
            fds,
            state: Mutex::new(LinkState { connection: None, paused_at_ns: None, handoffs: 0, checkpoint: None }),
            events,
        });
        let stream = connect_handoff(&link.socket, HANDOFF_CONNECT_TIMEOUT)?;
        link.hand_off(&stream, 0)?;
        let watched = stream.try_clone().map_err(io_context("cloning the hand-off connection"))?;
        link.lock().connection = Some(stream);
        link.lock().handoffs = 1;
        let follower = link.clone();
        std::thread::Builder::new()
            .name("handoff-link".into())
            .spawn(move || follower.follow(watched))
            .map_err(io_context("starting the hand-off thread"))?;
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
                    Err(error) => eprintln!("vmm-standin: the agent sent {line:?}, which is not a message ({error})"),
                }
            }
            let handoffs = {
                let mut state = self.lock();
                state.connection = None;
                state.handoffs
            };
            eprintln!(
                "vmm-standin: the agent on {} went away; handing the memory over again to the next one",
                self.socket.display()
            );
            self.events.emit(&StandinEvent::AgentGone { handoffs });
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
                eprintln!("vmm-standin: hand-off to the new agent failed ({error}); trying again");
                continue;
            }
            let Ok(watched) = stream.try_clone() else { continue };
            let mut state = self.lock();
            if let Some(at_ns) = state.paused_at_ns
                && let Err(error) = send_event(&stream, VmmEvent::Paused { at_ns })
            {
                eprintln!("vmm-standin: telling the new agent about the pause failed ({error}); trying again");
                continue;
            }
            state.connection = Some(stream);
            state.handoffs += 1;
            let handoffs = state.handoffs;
            drop(state);
            eprintln!("vmm-standin: memory handed over again (hand-off {handoffs})");
            self.events.emit(&StandinEvent::HandedOff { handoffs });
            return watched;
        }
    }
}
