//! The hand-off socket's binding policy, one for both agents.
//!
//! A VMM hands its guest memory to an agent over a Unix socket the agent
//! listens on; the descriptors it sends give full control of the guest's
//! memory. So the agent binds that socket carefully:
//!
//! - a path that exists and is not a socket is refused (a mistyped flag must
//!   not delete a file);
//! - a socket that some process still listens on is refused (two agents must
//!   not fight over one VMM);
//! - a stale socket (nothing listens on it: a previous agent died) is
//!   removed and bound again;
//! - the new socket is mode 0600: only the agent's user (the VMM runs as it,
//!   or as root) may connect; with a group ([`crate::handoff_group`],
//!   `--handoff-group`) it is given to that group and made 0660 (in that
//!   order, so it is never open to the agent's own group), and members of
//!   the group may connect too; whoever connects is checked against the
//!   allow-list of peer uids ([`crate::handoff_peers`]) by the agent, on
//!   each connection;
//! - dropping the [`HandoffSocket`] removes the socket file, unless it is no
//!   longer the one bound here (another agent replaced it meanwhile).
//!
//! How connections are accepted is each agent's business: the source agent
//! accepts on a thread ([`HandoffSocket::try_clone_listener`]), the target
//! agent on its runtime ([`HandoffSocket::async_listener`]). Both give a
//! connection [`HANDOFF_READ_TIMEOUT`] to deliver its hand-off.
#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::HandoffSocketError;
use crate::handoff_group::HandoffGroup;

/// How long a connection may take to deliver its hand-off message.
pub const HANDOFF_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket file's mode.
const SOCKET_MODE: u32 = 0o600;
/// The socket file's mode when it is given to a group.
const GROUP_SOCKET_MODE: u32 = 0o660;

/// A bound, listening hand-off socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct HandoffSocket {
    path: PathBuf,
    listener: UnixListener,
    /// Device and inode of the socket file bound here.
    identity: (u64, u64),
}

impl HandoffSocket {
    /// Binds `path` by the policy of the module docs, shared with `group`
    /// if one is given.
    pub fn bind(path: impl Into<PathBuf>, group: Option<&HandoffGroup>) -> Result<Self, HandoffSocketError> {
        let path = path.into();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(HandoffSocketError::NotASocket { path }),
            Ok(_) => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(HandoffSocketError::InUse { path });
                }
                std::fs::remove_file(&path).map_err(io_error("removing the stale socket", &path))?;
                tracing::info!(socket = %path.display(), "replaced a stale hand-off socket");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspecting", &path)(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io_error("binding", &path))?;
        let identity = match std::fs::symlink_metadata(&path) {
            Ok(meta) => (meta.dev(), meta.ino()),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(io_error("inspecting the new socket", &path)(e));
            }
        };
        // From here on, an error drops `socket`, which removes the file.
        let socket = Self { path, listener, identity };
        std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_error("restricting the permissions of", &socket.path))?;
        if let Some(group) = group {
            std::os::unix::fs::lchown(&socket.path, None, Some(group.gid())).map_err(|source| {
                HandoffSocketError::Group { path: socket.path.clone(), group: group.to_string(), source }
            })?;
            std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(GROUP_SOCKET_MODE))
                .map_err(io_error("opening to its group the permissions of", &socket.path))?;
            tracing::info!(socket = %socket.path.display(), %group, "the hand-off socket is shared with its group (0660)");
        }
        Ok(socket)
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle on the listener, for an accept thread; the socket file
    /// still goes away when `self` is dropped.
    pub fn try_clone_listener(&self) -> Result<UnixListener, HandoffSocketError> {
        self.listener.try_clone().map_err(io_error("duplicating the listener of", &self.path))
    }

    /// The listener on the current tokio runtime (which must have I/O
    /// enabled). It shares its open file with every other handle on the
    /// listener, which therefore become non-blocking too: accept either
    /// here or on a thread, not both.
    pub fn async_listener(&self) -> Result<tokio::net::UnixListener, HandoffSocketError> {
        let listener = self.try_clone_listener()?;
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
            .map_err(io_error("registering with the runtime the listener of", &self.path))
    }
}

fn io_error(doing: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HandoffSocketError {
    let path = path.to_owned();
    move |source| HandoffSocketError::Io { doing, path, source }
}

impl Drop for HandoffSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
