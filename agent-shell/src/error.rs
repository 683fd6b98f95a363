//! What can go wrong in the shell. Each error says what was being done and
//! carries its cause as its `source`, so that a report of the whole chain
//! (anyhow's `{:?}`, the target agent's status) reads
//! "binding the gRPC listener 0.0.0.0:50051: Address already in use".
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

/// Why an agent's shell did not run to a graceful shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("binding the {what} listener {address}")]
    Bind {
        what: &'static str,
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the address the {what} listener is bound to")]
    LocalAddress {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("writing the listening event to stdout")]
    Announce(#[source] io::Error),
    #[error("serving gRPC")]
    Serve(#[source] ServeError),
}

/// Why a gRPC server could not be built or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("the gRPC transport failed")]
    Transport(#[source] tonic::transport::Error),
    #[error("binding the health port {address} (--health-listen)")]
    HealthPort {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a hand-off socket could not be bound (see
/// [`HandoffSocket::bind`](crate::HandoffSocket::bind) for the policy).
#[derive(Debug, thiserror::Error)]
pub enum HandoffSocketError {
    #[error("{path} exists and is not a socket; refusing to replace it", path = path.display())]
    NotASocket { path: PathBuf },
    #[error("{path} is in use: another process (an agent?) listens on it; refusing to take it over", path = path.display())]
    InUse { path: PathBuf },
    #[error(
        "giving {path} to group {group} (--handoff-group): the agent must be a member of that group, or root",
        path = path.display()
    )]
    Group {
        path: PathBuf,
        group: String,
        #[source]
        source: io::Error,
    },
    #[error("{doing} {path}", path = path.display())]
    Io {
        /// What was being done to the path, e.g. "binding".
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// For callers whose own errors hold an `io::Error`: the kind says what
/// happened (`AlreadyExists`, `AddrInUse`, or the cause's), the message is
/// this error's, and the cause stays the `source`.
impl From<HandoffSocketError> for io::Error {
    fn from(error: HandoffSocketError) -> Self {
        let kind = match &error {
            HandoffSocketError::NotASocket { .. } => io::ErrorKind::AlreadyExists,
            HandoffSocketError::InUse { .. } => io::ErrorKind::AddrInUse,
            HandoffSocketError::Group { source, .. } | HandoffSocketError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, error)
    }
}

/// Why a hand-off connection's peer is refused (see
/// [`PeerAllowList::check`](crate::PeerAllowList::check)). The message is
/// the reply the peer gets.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    #[error(
        "hand-off refused: peer uid {uid} (pid {pid}) is not allowed; this agent accepts uids {allowed:?} \
         (--handoff-allow-uid)"
    )]
    NotAllowed { uid: u32, pid: i32, allowed: Vec<u32> },
    #[error("hand-off refused: the peer's credentials (SO_PEERCRED) cannot be read")]
    Unknown(#[source] io::Error),
}

/// Why a `--handoff-allow-uid` value is not a list of uids.
#[derive(Debug, thiserror::Error)]
pub enum PeerAllowListError {
    #[error("{uid:?} is not a uid (a number from 0 to 4294967295) in the list {list:?} (UID[,UID...])")]
    NotAUid {
        uid: String,
        list: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// Why a `--handoff-group` value names no group.
#[derive(Debug, thiserror::Error)]
pub enum HandoffGroupError {
    #[error("an empty group (give a group name or a numeric gid)")]
    Empty,
    #[error("{given:?} is not a gid (a number from 0 to 4294967295)")]
    NotAGid {
        given: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("no group named {name:?} in the system's group database (give a group name or a numeric gid)")]
    NoSuchGroup { name: String },
    #[error("looking up the group {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
}
