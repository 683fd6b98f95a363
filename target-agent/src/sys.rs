//! The target agent's only `unsafe` code: registering the userfaultfd with
//! tokio's reactor.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use guest_memory::Userfaultfd;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A reactor registration for reading faults from `uffd` (through a
/// duplicate of its descriptor: same open file, same fault queue).
pub fn async_uffd(uffd: &Userfaultfd) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = uffd.as_fd().try_clone_to_owned()?;
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and
    // refers to the same file description until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Raises the calling thread's scheduling priority to `nice` (e.g. -10), so
/// that the fault loop is not starved by busy vCPUs on a loaded host.
/// Needs CAP_SYS_NICE; returns the error otherwise.
pub fn raise_thread_priority(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id changes only its nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
