//! The hand-off: how a VMM gives its guest memory to an agent.
//!
//! An agent cannot register userfaultfd on another process's memory, so the
//! VMM does it and passes the descriptors over a Unix stream socket that the
//! agent listens on, in the shape of Firecracker's page-fault-handler
//! hand-off:
//!
//! 1. VMM → agent, one `sendmsg`: a JSON [`HandoffMessage`] ending in `\n`,
//!    with the descriptors attached (SCM_RIGHTS) in the order its `fds` names
//!    them:
//!    - source: `memory` (the guest-memory file; the agent reads it with
//!      `pread` through a read-only descriptor), `uffd` (registered WP with WP_ASYNC over the VMM's
//!      mapping), `pagemap` (the VMM's own `/proc/self/pagemap`, on which
//!      PAGEMAP_SCAN scans the VMM's address space);
//!    - target: `memory` (mapped read-write by the agent), `uffd`
//!      (registered MINOR + MISSING over the VMM's mapping) and `pagemap`
//!      (from which an agent taking over a migration learns what is
//!      installed).
//! 2. agent → VMM: a [`HandoffReply`] line, `{"ok":true}` or
//!    `{"ok":false,"error":"..."}`. A refused hand-off leaves the agent
//!    waiting for another; an agent that already has its VM's memory
//!    refuses every later one ([`refuse_handoff`]).
//! 3. VMM → agent, for as long as the connection lives: [`VmmEvent`] lines,
//!    e.g. `{"event":"paused","at_ns":...}` once the vCPUs are stopped, and
//!    `{"event":"resumed"}` *before* they run again (a source agent serves
//!    pages as the content at the pause until it reads it). EOF means the VMM
//!    is gone.
//! 4. If the agent goes away instead (the VMM reads EOF), the VMM may hand
//!    the same memory and descriptors over again, to the next agent that
//!    listens on the socket, with `previous_handoffs` counting the earlier
//!    ones and `checkpoint` carrying the last [`AgentMessage::Checkpoint`]
//!    the old agent sent (agent → VMM lines on the same connection); a
//!    paused VMM then sends `paused` again at once.
//!
//! The agent reads at most [`MAX_MESSAGE_BYTES`] of a message; every rule a
//! message must follow is checked in [`validate`] ([`parse_message`] is the
//! pure part, fuzzed in `tests/fuzz_handoff.rs`).
#![forbid(unsafe_code)]

mod refuse;
mod validate;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::fd_passing::{recv_with_fds, send_with_fds};
use crate::layout::{GuestLayout, LayoutError, RegionLayout};
use crate::uffd::Userfaultfd;

pub use refuse::refuse_handoff;
pub use validate::{MAX_MESSAGE_BYTES, parse_message};

pub const HANDOFF_VERSION: u32 = 1;
/// What the agent reads at once while waiting for the message's newline.
const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FdKind {
    Memory,
    Uffd,
    Pagemap,
}

impl Role {
    /// The descriptors a hand-off for this role carries, in order.
    pub fn fds(self) -> &'static [FdKind] {
        match self {
            Role::Source => &[FdKind::Memory, FdKind::Uffd, FdKind::Pagemap],
            Role::Target => &[FdKind::Memory, FdKind::Uffd, FdKind::Pagemap],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffMessage {
    pub version: u32,
    pub role: Role,
    /// The VM's name, for logs and metrics.
    pub vm: String,
    /// The VMM's process id.
    pub pid: u32,
    pub regions: Vec<RegionLayout>,
    pub fds: Vec<FdKind>,
    /// How many times the VMM handed this memory over before, to agents
    /// that have since gone away (0: the first hand-off). A target agent
    /// given memory handed over before takes over a migration under way: it
    /// must not clear the memory, and rebuilds what is installed from the
    /// VMM's page tables.
    #[serde(default)]
    pub previous_handoffs: u32,
    /// The last [`AgentMessage::Checkpoint`] the previous agent sent, given
    /// back to the agent that takes over (absent on a first hand-off, or if
    /// the previous agent sent none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
}

/// What an agent may tell the VMM after the hand-off, on the same
/// connection (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentMessage {
    /// Opaque to the VMM: what a later agent needs to take over from this
    /// one (the VMM keeps the last one and passes it in the next hand-off's
    /// `checkpoint`).
    Checkpoint(serde_json::Value),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the VMM reports after the hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum VmmEvent {
    /// The vCPUs are stopped: guest memory no longer changes.
    Paused {
        at_ns: u64,
    },
    Resumed,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed hand-off message: {0}")]
    Json(#[source] serde_json::Error),
    #[error("hand-off message larger than {MAX_MESSAGE_BYTES} bytes (no newline in its first {MAX_MESSAGE_BYTES})")]
    TooLarge,
    #[error("hand-off message ends after {len} bytes without a newline")]
    Unterminated { len: usize },
    #[error("no complete hand-off message arrived in time (the agent's read timeout)")]
    Silent,
    #[error("hand-off version {got} is not supported (this agent speaks {HANDOFF_VERSION})")]
    Version { got: u32 },
    #[error("hand-off is for the {got:?} role, this agent is the {expected:?}")]
    WrongRole { expected: Role, got: Role },
    #[error("hand-off names descriptors {named:?} but {expected:?} are required")]
    FdKinds { named: Vec<FdKind>, expected: &'static [FdKind] },
    #[error("hand-off names {named} descriptors but {attached} are attached")]
    FdCount { named: usize, attached: usize },
    #[error("descriptor {kind:?} is not what it claims to be (it is {actual})")]
    FdType { kind: FdKind, actual: String },
    #[error("invalid layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("memory file has {have} bytes, the layout needs {need}")]
    MemoryTooSmall { need: u64, have: u64 },
    #[error("memory file's page size is {file} bytes, the layout says {layout}")]
    PageSizeMismatch { file: u64, layout: u64 },
    #[error("agent refused the hand-off: {0}")]
    Refused(String),
    #[error("connection closed")]
    Closed,
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> HandoffError {
    move |source| HandoffError::Io { context, source }
}

/// Guest memory received from a VMM, validated.
#[derive(Debug)]
pub struct Handoff {
    pub message: HandoffMessage,
    pub layout: GuestLayout,
    pub memory: OwnedFd,
    pub uffd: Userfaultfd,
    pub pagemap: Option<OwnedFd>,
    /// The connection, for [`VmmEvent`]s.
    pub events: EventReader,
}

// ---------------------------------------------------------------------------
// VMM side.

/// Sends the hand-off and waits for the agent's verdict.
pub fn send_handoff(stream: &UnixStream, message: &HandoffMessage, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
    let mut line = serde_json::to_vec(message).map_err(HandoffError::Json)?;
    line.push(b'\n');
    let sent = send_with_fds(stream.as_fd(), &line, fds).map_err(io("sending hand-off"))?;
    (&*stream).write_all(&line[sent..]).map_err(io("sending hand-off"))?;
    // Byte by byte up to the newline: what the agent sends after its reply
    // (a checkpoint) is the connection's next reader's, not ours to drop.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let read = match (&*stream).read(&mut byte) {
            // A signal (QEMU takes many) is not an answer: read on.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => read.map_err(io("reading hand-off reply"))?,
        };
        match read {
            0 if reply.is_empty() => return Err(HandoffError::Closed),
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ if reply.len() >= MAX_MESSAGE_BYTES => return Err(HandoffError::TooLarge),
            _ => reply.push(byte[0]),
        }
    }
    let reply: HandoffReply = serde_json::from_slice(&reply).map_err(HandoffError::Json)?;
    if reply.ok { Ok(()) } else { Err(HandoffError::Refused(reply.error.unwrap_or_default())) }
}

/// Reports an event to the agent.
pub fn send_event(mut stream: &UnixStream, event: VmmEvent) -> Result<(), HandoffError> {
    let mut line = serde_json::to_vec(&event).map_err(HandoffError::Json)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io("sending event"))
}

// ---------------------------------------------------------------------------
// Agent side.

/// Reads and validates a hand-off for `role`, then answers the VMM. On error
/// the VMM is told why (best effort) and the error is returned.
pub fn receive_handoff(stream: UnixStream, role: Role) -> Result<Handoff, HandoffError> {
    let result = read_and_validate(&stream, role);
    let reply = match &result {
        Ok(_) => HandoffReply { ok: true, error: None },
        Err(e) => HandoffReply { ok: false, error: Some(e.to_string()) },
    };
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = (&stream).write_all(&line);
    }
    let (message, layout, memory, uffd, pagemap) = result?;
    Ok(Handoff { message, layout, memory, uffd, pagemap, events: EventReader { reader: BufReader::new(stream) } })
}

/// Like [`receive_handoff`], but the VMM is answered only after `accept` has
/// taken the validated hand-off: `{"ok":true}` once the agent really serves
/// it, or `accept`'s error as the refusal (also returned, as `Refused`).
pub fn receive_handoff_with<T, E: std::fmt::Display>(
    stream: UnixStream,
    role: Role,
    accept: impl FnOnce(Handoff) -> Result<T, E>,
) -> Result<T, HandoffError> {
    let replies = stream.try_clone().map_err(io("duplicating the hand-off socket"))?;
    let result = read_and_validate(&stream, role).and_then(|(message, layout, memory, uffd, pagemap)| {
        let events = EventReader { reader: BufReader::new(stream) };
        accept(Handoff { message, layout, memory, uffd, pagemap, events })
            .map_err(|e| HandoffError::Refused(e.to_string()))
    });
    let reply = match &result {
        Ok(_) => HandoffReply { ok: true, error: None },
        Err(HandoffError::Refused(reason)) => HandoffReply { ok: false, error: Some(reason.clone()) },
        Err(e) => HandoffReply { ok: false, error: Some(e.to_string()) },
    };
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = (&replies).write_all(&line);
    }
    result
}

type Parts = (HandoffMessage, GuestLayout, OwnedFd, Userfaultfd, Option<OwnedFd>);

/// A read error, or [`HandoffError::Silent`] when the socket's read timeout
/// expired.
fn receive_error(source: std::io::Error) -> HandoffError {
    match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HandoffError::Silent,
        _ => HandoffError::Io { context: "receiving hand-off", source },
    }
}

/// Reads the message line (at most [`MAX_MESSAGE_BYTES`]) and the
/// descriptors attached to its first bytes. The stream's read timeout, if
/// any, bounds the whole message (checked after each read), not each read:
/// a peer trickling bytes is cut off like a silent one.
fn read_message(stream: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoffError> {
    let deadline = stream.read_timeout().ok().flatten().map(|timeout| Instant::now() + timeout);
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut len, fds) = recv_with_fds(stream.as_fd(), &mut buf).map_err(receive_error)?;
    if len == 0 {
        return Err(HandoffError::Closed);
    }
    // The JSON may arrive in more than one read; the fds come with the first.
    // Each byte is searched for the newline once.
    let mut searched = 0;
    while len < MAX_MESSAGE_BYTES && !buf[searched..len].contains(&b'\n') {
        searched = len;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(HandoffError::Silent);
        }
        if len == buf.len() {
            buf.resize((buf.len() * 2).min(MAX_MESSAGE_BYTES), 0);
        }
        let n = (&*stream).read(&mut buf[len..]).map_err(receive_error)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    Ok((buf, fds))
}

fn read_and_validate(stream: &UnixStream, role: Role) -> Result<Parts, HandoffError> {
    let (received, fds) = read_message(stream)?;
    let (message, layout) = parse_message(&received, fds.len(), role)?;
    let validate::Descriptors { memory, uffd, pagemap } = validate::sort_descriptors(&message, fds)?;
    validate::check_memory_file(&memory, &layout)?;
    Ok((message, layout, memory, uffd, pagemap))
}

/// Reads [`VmmEvent`]s from the hand-off connection.
#[derive(Debug)]
pub struct EventReader {
    reader: BufReader<UnixStream>,
}

impl EventReader {
    /// Tells the VMM `message` (agent → VMM, on the same connection).
    pub fn send(&self, message: &AgentMessage) -> Result<(), HandoffError> {
        let mut line = serde_json::to_vec(message).map_err(HandoffError::Json)?;
        line.push(b'\n');
        let mut connection: &UnixStream = self.reader.get_ref();
        connection.write_all(&line).map_err(io("sending to the VMM"))
    }

    /// The next event; `Ok(None)` when the VMM closed the connection.
    pub fn next_event(&mut self) -> Result<Option<VmmEvent>, HandoffError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(io("reading VMM event"))?;
            if n == 0 {
                return Ok(None);
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line).map(Some).map_err(HandoffError::Json);
            }
        }
    }
}
