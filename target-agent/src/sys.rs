//! The target agent's only `unsafe` code: registering the userfaultfd with
//! tokio's reactor (tokio's safe constructor is deprecated as unsound for
//! descriptors it cannot prove open).

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
