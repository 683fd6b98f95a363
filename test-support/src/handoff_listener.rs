//! The agent's end of a hand-off socket, played by a test.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{PATIENCE, TestChild};

/// How often a pending connection is polled for.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// A listening hand-off socket; the socket file is removed when dropped.
#[derive(Debug)]
pub struct HandoffListener {
    path: PathBuf,
    listener: UnixListener,
}

impl HandoffListener {
    /// Listens on `path` (which must not exist).
    pub fn bind(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding the hand-off socket {}: {e}", path.display()));
        // Non-blocking, so that the wait can watch the VMM and a deadline.
        listener.set_nonblocking(true).expect("non-blocking listener");
        Self { path, listener }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection (a blocking stream), from `vmm`, within
    /// [`PATIENCE`]. Fails at once, with its stderr, if `vmm` exits first:
    /// a VMM that refused to start says why there.
    pub fn accept(&self, vmm: &mut TestChild) -> UnixStream {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    return stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    vmm.assert_running("without handing off its memory");
                    assert!(Instant::now() < deadline, "{} did not hand off within {PATIENCE:?}", vmm.name());
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) => panic!("accepting on {}: {e}", self.path.display()),
            }
        }
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
