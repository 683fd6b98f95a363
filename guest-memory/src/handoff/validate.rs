//! Checking what a VMM sent, apart from the socket it came on, so that every
//! rule can be tested (and fuzzed) without one:
//!
//! - [`parse_message`]: the bytes received and the number of descriptors
//!   attached become a [`HandoffMessage`] and its [`GuestLayout`], or the
//!   first reason to refuse them (size, JSON, version, role, descriptor
//!   kinds and count, layout); pure, it never panics;
//! - [`sort_descriptors`]: each received descriptor is what the message
//!   calls it (a userfaultfd, a `/proc/PID/pagemap`, a regular file for the
//!   memory);
//! - [`check_memory_file`]: the memory file holds every region, with the
//!   layout's page size.
//!
//! Every descriptor of a refused hand-off is closed: they are owned values,
//! dropped on every error path.
#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::{FdKind, HandoffError, HandoffMessage, Role};
use crate::layout::GuestLayout;
use crate::uffd::Userfaultfd;

/// Longest hand-off message line (its newline included) the agent reads.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Parses the message line at the start of `received` (everything up to its
/// newline) of a hand-off for `role` that came with `attached` descriptors,
/// and checks it: see the module docs.
pub fn parse_message(
    received: &[u8],
    attached: usize,
    role: Role,
) -> Result<(HandoffMessage, GuestLayout), HandoffError> {
    let within = &received[..received.len().min(MAX_MESSAGE_BYTES)];
    let Some(end) = within.iter().position(|&b| b == b'\n') else {
        return Err(if received.len() >= MAX_MESSAGE_BYTES {
            HandoffError::TooLarge
        } else {
            HandoffError::Unterminated { len: received.len() }
        });
    };
    let message: HandoffMessage = serde_json::from_slice(&received[..end]).map_err(HandoffError::Json)?;
    if message.version != super::HANDOFF_VERSION {
        return Err(HandoffError::Version { got: message.version });
    }
    if message.role != role {
        return Err(HandoffError::WrongRole { expected: role, got: message.role });
    }
    let expected = role.fds();
    let mut named = message.fds.clone();
    named.sort_by_key(|k| *k as u8);
    let mut want = expected.to_vec();
    want.sort_by_key(|k| *k as u8);
    if named != want {
        return Err(HandoffError::FdKinds { named: message.fds.clone(), expected });
    }
    if attached != message.fds.len() {
        return Err(HandoffError::FdCount { named: message.fds.len(), attached });
    }
    let layout = GuestLayout::new(message.regions.clone())?;
    Ok((message, layout))
}

/// The descriptors of a hand-off, by kind.
#[derive(Debug)]
pub(super) struct Descriptors {
    pub memory: OwnedFd,
    pub uffd: Userfaultfd,
    pub pagemap: Option<OwnedFd>,
}

/// What `/proc/self/fd` says `fd` is ("pipe:[123]", "/dev/null", ...).
fn describe(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Whether `fd` is a regular file (memfd, hugetlbfs and tmpfs files are).
fn is_regular_file(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file())
}

/// Matches `fds` (as many as `message.fds`, checked by [`parse_message`])
/// with the kinds the message names, checking that each is what it claims.
pub(super) fn sort_descriptors(message: &HandoffMessage, fds: Vec<OwnedFd>) -> Result<Descriptors, HandoffError> {
    let (mut memory, mut uffd, mut pagemap) = (None, None, None);
    for (kind, fd) in message.fds.iter().zip(fds) {
        let actual = describe(&fd);
        let fits = match kind {
            FdKind::Uffd => actual == "anon_inode:[userfaultfd]",
            FdKind::Pagemap => actual.starts_with("/proc/") && actual.ends_with("/pagemap"),
            FdKind::Memory => is_regular_file(&fd),
        };
        if !fits {
            return Err(HandoffError::FdType { kind: *kind, actual });
        }
        match kind {
            FdKind::Memory => memory = Some(fd),
            FdKind::Uffd => uffd = Some(Userfaultfd::from_handoff(fd)),
            FdKind::Pagemap => pagemap = Some(fd),
        }
    }
    match (memory, uffd) {
        (Some(memory), Some(uffd)) => Ok(Descriptors { memory, uffd, pagemap }),
        _ => Err(HandoffError::FdKinds { named: message.fds.clone(), expected: message.role.fds() }),
    }
}

/// The memory file holds every region of `layout`, in pages of its size.
pub(super) fn check_memory_file(memory: &OwnedFd, layout: &GuestLayout) -> Result<(), HandoffError> {
    let meta = std::fs::File::from(memory.try_clone().map_err(super::io("duplicating memory fd"))?)
        .metadata()
        .map_err(super::io("inspecting memory file"))?;
    if meta.size() < layout.file_len() {
        return Err(HandoffError::MemoryTooSmall { need: layout.file_len(), have: meta.size() });
    }
    if meta.blksize() != layout.page_size() {
        return Err(HandoffError::PageSizeMismatch { file: meta.blksize(), layout: layout.page_size() });
    }
    Ok(())
}
