//! The userfaultfd of guest memory: created and registered by the VMM (or
//! the VMM shim, or the stand-in), handed to an agent, used there.
//!
//! Built on the `userfaultfd` crate (the bytecodealliance crate Firecracker
//! uses) for everything it provides: creating the descriptor and the
//! `UFFDIO_API` handshake, registration, reading events, `UFFDIO_CONTINUE`,
//! `UFFDIO_ZEROPAGE`, `UFFDIO_COPY`, `UFFDIO_WAKE` and `UFFDIO_WRITEPROTECT`.
//! This module adds what an agent needs on top:
//!
//! - addresses are `u64`s in the *VMM's* address space (the crate takes
//!   pointers, as if the range were ours);
//! - errors say which ioctl, on which range, and sort the outcomes a caller
//!   must tell apart (EEXIST: already mapped, a normal race; EAGAIN: the
//!   address space changed, retry; EFAULT/ENOENT: no page in the page cache);
//! - events are plain `Send` values ([`UffdEvent`]);
//! - [`features`]: the `UFFD_FEATURE_*` bits the crate's `FeatureFlags` does
//!   not name (it predates minor faults and async write-protect); they are
//!   passed to the crate's `UFFDIO_API` handshake as raw bits;
//! - [`Userfaultfd::for_role`]: the one place that decides which features
//!   and register modes each side of a migration needs.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use userfaultfd::{Event, FeatureFlags, UffdBuilder};

pub use userfaultfd::{EventBuffer, RegisterMode};

use crate::handoff::Role;
use crate::layout::RegionLayout;
use crate::sys;

/// `UFFD_FEATURE_*` bits (linux/userfaultfd.h, from `linux-raw-sys`): the
/// crate's `FeatureFlags` lacks the minor-fault and async-WP ones, so every
/// bit is given here and passed raw.
pub mod features {
    use linux_raw_sys::general as k;
    pub const MINOR_SHMEM: u64 = k::UFFD_FEATURE_MINOR_SHMEM as u64;
    pub const MINOR_HUGETLBFS: u64 = k::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
    pub const MISSING_SHMEM: u64 = k::UFFD_FEATURE_MISSING_SHMEM as u64;
    pub const MISSING_HUGETLBFS: u64 = k::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
    pub const WP_ASYNC: u64 = k::UFFD_FEATURE_WP_ASYNC as u64;
    pub const WP_HUGETLBFS_SHMEM: u64 = k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
    pub const EVENT_REMOVE: u64 = k::UFFD_FEATURE_EVENT_REMOVE as u64;
    pub const EVENT_UNMAP: u64 = k::UFFD_FEATURE_EVENT_UNMAP as u64;
    pub const SIGBUS: u64 = k::UFFD_FEATURE_SIGBUS as u64;
}

/// The non-fault events a target VMM's uffd reports. Not `EVENT_UNMAP`: the
/// kernel makes a munmap of registered memory wait until the handler reads
/// the event, so a VMM whose agent is gone (or a test that plays the VMM
/// with no reader) would hang in munmap; an unmapped range raises no faults
/// anyway, and an install into it fails and is settled as discarded.
const TARGET_EVENTS: u64 = features::EVENT_REMOVE;

/// 2 MiB: the page size of a hugetlbfs region.
const HUGE_PAGE: u64 = 2 << 20;

/// `UFFD_USER_MODE_ONLY`: faults from kernel mode are not reported (they
/// fail); such a userfaultfd needs no privilege.
const USER_MODE_ONLY: u32 = linux_raw_sys::general::UFFD_USER_MODE_ONLY;

/// A userfaultfd error, with the operation and range it concerned.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The first page of the range is already mapped: a normal race.
    #[error("{op} {addr:#x}+{len:#x}: already mapped (EEXIST)")]
    Exists { op: &'static str, addr: u64, len: u64 },
    /// The address space changed under us (EAGAIN with nothing done): retry.
    #[error("{op} {addr:#x}+{len:#x}: address space changing (EAGAIN)")]
    Again { op: &'static str, addr: u64, len: u64 },
    /// UFFDIO_CONTINUE found no page in the page cache (a hole).
    #[error("{op} {addr:#x}+{len:#x}: no page in the page cache (EFAULT)")]
    NoPage { op: &'static str, addr: u64, len: u64 },
    #[error("{op} {addr:#x}+{len:#x}: {source}")]
    Os {
        op: &'static str,
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("creating a userfaultfd with features {features:#x}: {source}{errno}", errno = create_errno(source))]
    Create {
        features: u64,
        #[source]
        source: userfaultfd::Error,
    },
    /// `/dev/userfaultfd` was not ours to open, and the system call refused
    /// too (without `user_mode_only` it needs `vm.unprivileged_userfaultfd=1`
    /// or `CAP_SYS_PTRACE`).
    #[error(
        "creating a userfaultfd with features {features:#x}{mode}: /dev/userfaultfd: {device}; the userfaultfd \
         system call: {source}{hint}",
        mode = if *user_mode_only { " (user-mode faults only)" } else { "" },
        hint = if *user_mode_only { "" } else {
            " (a userfaultfd that also reports kernel-mode faults needs read-write access to /dev/userfaultfd, \
             vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE)"
        }
    )]
    CreateBySyscall {
        features: u64,
        user_mode_only: bool,
        device: io::Error,
        #[source]
        source: io::Error,
    },
    /// The userfaultfd has no more events to give: the process that
    /// registered it exited (its address space is gone).
    #[error("the userfaultfd's registering process is gone (EOF)")]
    Closed,
    #[error("reading the userfaultfd: {source}")]
    Read {
        #[source]
        source: userfaultfd::Error,
    },
}

/// The crate's system error says only "System error": its errno, and for
/// EPERM what usually refuses the call where nothing else would.
fn create_errno(source: &userfaultfd::Error) -> String {
    match source {
        userfaultfd::Error::SystemError(errno) if *errno as i32 == libc::EPERM => format!(
            ": {errno}: the userfaultfd system call was refused (a seccomp profile without \"userfaultfd\"? \
             deploy/seccomp/pageserver-agent.json allows it)"
        ),
        userfaultfd::Error::SystemError(errno) => format!(": {errno}"),
        _ => String::new(),
    }
}

impl UffdError {
    /// The kernel would not give this process a userfaultfd of the kind
    /// asked for (not permitted), as opposed to not supporting it.
    pub fn is_creation_not_permitted(&self) -> bool {
        match self {
            UffdError::CreateBySyscall { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            UffdError::Create { source: userfaultfd::Error::SystemError(errno), .. } => {
                [libc::EPERM, libc::EACCES].contains(&(*errno as i32))
            }
            _ => false,
        }
    }

    fn from_errno(op: &'static str, addr: u64, len: u64, errno: i32) -> Self {
        match errno {
            libc::EEXIST => UffdError::Exists { op, addr, len },
            libc::EAGAIN => UffdError::Again { op, addr, len },
            libc::EFAULT | libc::ENOENT => UffdError::NoPage { op, addr, len },
            e => UffdError::Os { op, addr, len, source: io::Error::from_raw_os_error(e) },
        }
    }

    fn from_crate(op: &'static str, addr: u64, len: u64, error: userfaultfd::Error) -> Self {
        use userfaultfd::Error as E;
        match error {
            E::SystemError(errno) | E::CopyFailed(errno) | E::ZeropageFailed(errno) => {
                Self::from_errno(op, addr, len, errno as i32)
            }
            // The crate reports "nothing copied, retry" as a partial copy of
            // a negative byte count.
            E::PartiallyCopied(_) => UffdError::Again { op, addr, len },
            other => UffdError::Os { op, addr, len, source: io::Error::other(other) },
        }
    }
}

/// How a page fault was raised (`uffd_msg.pagefault.flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No page in the page cache: the file has a hole there.
    Missing,
    /// The page is in the page cache; only the VMM's page-table entry is missing.
    Minor,
    /// A write to a write-protected page (synchronous WP mode only).
    WriteProtect,
}

/// One page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address in the VMM's address space.
    pub address: u64,
    pub kind: FaultKind,
    /// The faulting thread (`UFFD_FEATURE_THREAD_ID`), 0 if not reported.
    pub thread_id: u32,
}

impl PageFault {
    /// A minor fault: the page is in the page cache, only the PTE is missing.
    pub fn is_minor(&self) -> bool {
        self.kind == FaultKind::Minor
    }
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    PageFault(PageFault),
    /// MADV_DONTNEED / MADV_REMOVE over [start, end) (`UFFD_FEATURE_EVENT_REMOVE`).
    Remove {
        start: u64,
        end: u64,
    },
    /// munmap over [start, end) (`UFFD_FEATURE_EVENT_UNMAP`).
    Unmap {
        start: u64,
        end: u64,
    },
    /// mremap (`UFFD_FEATURE_EVENT_REMAP`).
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// fork of the registering process (`UFFD_FEATURE_EVENT_FORK`); the
    /// child's userfaultfd that came with it is closed.
    Fork,
    /// A message this crate version cannot decode.
    Unrecognized {
        event: u8,
    },
}

impl UffdEvent {
    fn from_crate(event: userfaultfd::Result<Event>) -> Self {
        match event {
            Ok(Event::Pagefault { kind, addr, thread_id, .. }) => UffdEvent::PageFault(PageFault {
                address: addr as u64,
                kind: match kind {
                    userfaultfd::FaultKind::Missing => FaultKind::Missing,
                    userfaultfd::FaultKind::Minor => FaultKind::Minor,
                    userfaultfd::FaultKind::WriteProtected => FaultKind::WriteProtect,
                },
                thread_id: thread_id.as_raw() as u32,
            }),
            Ok(Event::Remove { start, end }) => UffdEvent::Remove { start: start as u64, end: end as u64 },
            Ok(Event::Unmap { start, end }) => UffdEvent::Unmap { start: start as u64, end: end as u64 },
            Ok(Event::Remap { from, to, len }) => {
                UffdEvent::Remap { from: from as u64, to: to as u64, len: len as u64 }
            }
            Ok(Event::Fork { uffd: _closed }) => UffdEvent::Fork,
            Err(userfaultfd::Error::UnrecognizedEvent(event)) => UffdEvent::Unrecognized { event },
            Err(_) => UffdEvent::Unrecognized { event: 0 },
        }
    }

    /// A short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            UffdEvent::PageFault(_) => "pagefault",
            UffdEvent::Remove { .. } => "remove",
            UffdEvent::Unmap { .. } => "unmap",
            UffdEvent::Remap { .. } => "remap",
            UffdEvent::Fork => "fork",
            UffdEvent::Unrecognized { .. } => "unrecognized",
        }
    }
}

/// A userfaultfd over guest memory.
#[derive(Debug)]
pub struct Userfaultfd {
    inner: userfaultfd::Uffd,
}

impl Userfaultfd {
    /// Creates a close-on-exec userfaultfd with `features` (raw
    /// `UFFD_FEATURE_*` bits, see [`features`]). Faults from kernel mode are
    /// included: KVM touches guest memory from the kernel.
    pub fn create(features: u64) -> Result<Self, UffdError> {
        Self::create_with(features, false)
    }

    /// Through `/dev/userfaultfd` if it exists, else the system call; and
    /// through the system call if the device is there but not ours to open
    /// (by default it is root's alone): the kernel then decides by
    /// `vm.unprivileged_userfaultfd`, `CAP_SYS_PTRACE` and `user_mode_only`
    /// (user-mode-only needs no privilege at all).
    fn create_with(features: u64, user_mode_only: bool) -> Result<Self, UffdError> {
        let created = UffdBuilder::new()
            .close_on_exec(true)
            .user_mode_only(user_mode_only)
            .require_features(FeatureFlags::from_bits_retain(features))
            .create();
        let inner = match created {
            Ok(inner) => inner,
            Err(userfaultfd::Error::OpenDevUserfaultfd(device)) if device.kind() == io::ErrorKind::PermissionDenied => {
                let flags = libc::O_CLOEXEC as u32 | if user_mode_only { USER_MODE_ONLY } else { 0 };
                sys::uffd_by_syscall(flags, features).map_err(|source| UffdError::CreateBySyscall {
                    features,
                    user_mode_only,
                    device,
                    source,
                })?
            }
            Err(source) => return Err(UffdError::Create { features, source }),
        };
        Ok(Self { inner })
    }

    /// A userfaultfd registered over `region` of the calling process as the
    /// `role`'s agent needs it:
    /// - source: write-protect with `WP_ASYNC` (a write un-protects the page
    ///   without a fault; PAGEMAP_SCAN later reports it: dirty tracking);
    /// - target: `MINOR` (pre-copied pages in the page cache) and `MISSING`
    ///   (holes in the file: a page that must not be zero-filled silently),
    ///   with the shmem or hugetlbfs features by the region's page size.
    pub fn for_role(role: Role, region: &RegionLayout) -> Result<Self, UffdError> {
        Self::for_role_with(role, region, false)
    }

    /// Like [`Userfaultfd::for_role`], for a guest that touches its memory
    /// from user mode only (a VMM stand-in's threads; never KVM, which
    /// touches guest memory from the kernel): faults from kernel mode are
    /// not reported. It needs no privilege, whatever
    /// `vm.unprivileged_userfaultfd` says.
    pub fn for_role_user_mode_only(role: Role, region: &RegionLayout) -> Result<Self, UffdError> {
        Self::for_role_with(role, region, true)
    }

    fn for_role_with(role: Role, region: &RegionLayout, user_mode_only: bool) -> Result<Self, UffdError> {
        let hugetlb = region.page_size >= HUGE_PAGE;
        let (wanted, mode) = match role {
            Role::Source => (features::WP_ASYNC | features::WP_HUGETLBFS_SHMEM, RegisterMode::WRITE_PROTECT),
            // The target also reports what the VMM drops (MADV_DONTNEED /
            // MADV_REMOVE, munmap), so that its agent never fills a page
            // the VMM discarded with the source's content.
            Role::Target if hugetlb => (
                features::MINOR_HUGETLBFS | features::MISSING_HUGETLBFS | TARGET_EVENTS,
                RegisterMode::MINOR | RegisterMode::MISSING,
            ),
            Role::Target => (
                features::MINOR_SHMEM | features::MISSING_SHMEM | TARGET_EVENTS,
                RegisterMode::MINOR | RegisterMode::MISSING,
            ),
        };
        let uffd = Self::create_with(wanted, user_mode_only)?;
        uffd.register(region.base_host_virt_addr, region.size, mode)?;
        Ok(uffd)
    }

    /// A userfaultfd that keeps this process from filling holes of the file
    /// mapped at [addr, addr+len) (a mapping of its own, of `page_size`
    /// pages): registered for MISSING faults with `UFFD_FEATURE_SIGBUS`, so
    /// a fault on a hole fails at once (SIGBUS; `EFAULT` for
    /// [`MemoryMap::populate_read`](crate::MemoryMap::populate_read)) instead
    /// of allocating a page there. Nobody reads it. User-mode only, so it
    /// needs no privilege (`vm.unprivileged_userfaultfd` 0 allows it).
    pub fn guarding_holes(addr: u64, len: u64, page_size: u64) -> Result<Self, UffdError> {
        let missing = if page_size >= HUGE_PAGE { features::MISSING_HUGETLBFS } else { features::MISSING_SHMEM };
        let uffd = Self::create_with(features::SIGBUS | missing, true)?;
        uffd.register(addr, len, RegisterMode::MISSING)?;
        Ok(uffd)
    }

    /// Wraps a userfaultfd received from a VMM (the hand-off); it closes
    /// with this value.
    pub fn from_handoff(fd: OwnedFd) -> Self {
        Self { inner: sys::uffd_from_fd(fd) }
    }

    /// Registers [addr, addr+len) of the calling process in `mode`.
    pub fn register(&self, addr: u64, len: u64, mode: RegisterMode) -> Result<(), UffdError> {
        self.inner
            .register_with_mode(addr as *mut libc::c_void, len as usize, mode)
            .map(drop)
            .map_err(|e| UffdError::from_crate("UFFDIO_REGISTER", addr, len, e))
    }

    /// UFFDIO_UNREGISTER of [addr, addr+len) of the registering process
    /// (the VMM's address space for a handed-off uffd): from then on the
    /// kernel resolves faults there itself, as if nothing was registered,
    /// and the threads waiting on faults in the range are woken to retry.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .unregister(addr as *mut libc::c_void, len as usize)
            .map_err(|e| UffdError::from_crate("UFFDIO_UNREGISTER", addr, len, e))
    }

    /// UFFDIO_CONTINUE: maps the page-cache pages of [addr, addr+len) and
    /// wakes threads waiting on them (unless `wake` is false). Returns the
    /// bytes mapped, which is less than `len` when the kernel stopped early:
    /// call again for the rest.
    pub fn continue_range(&self, addr: u64, len: u64, wake: bool) -> Result<u64, UffdError> {
        match self.inner.r#continue(addr as *mut libc::c_void, len as usize, wake) {
            Ok(mapped) => Ok(mapped),
            Err(e) => Err(UffdError::from_crate("UFFDIO_CONTINUE", addr, len, e)),
        }
    }

    /// UFFDIO_ZEROPAGE: resolves MISSING faults on [addr, addr+len) with
    /// zeroed pages (shmem allocates them in the page cache). Not supported
    /// on hugetlbfs (EINVAL).
    pub fn zeropage(&self, addr: u64, len: u64, wake: bool) -> Result<u64, UffdError> {
        sys::uffd_zeropage(&self.inner, addr, len, wake)
            .map(|n| n as u64)
            .map_err(|e| UffdError::from_crate("UFFDIO_ZEROPAGE", addr, len, e))
    }

    /// UFFDIO_COPY of `src` to `dst` (a MISSING fault's page).
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<u64, UffdError> {
        let len = src.len() as u64;
        match sys::uffd_copy(&self.inner, dst, src, wake) {
            Ok(n) => Ok(n as u64),
            Err(userfaultfd::Error::PartiallyCopied(n)) if (n as isize) > 0 => Ok(n as u64),
            Err(e) => Err(UffdError::from_crate("UFFDIO_COPY", dst, len, e)),
        }
    }

    /// UFFDIO_WAKE: wakes threads blocked on faults in [addr, addr+len).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .wake(addr as *mut libc::c_void, len as usize)
            .map_err(|e| UffdError::from_crate("UFFDIO_WAKE", addr, len, e))
    }

    /// UFFDIO_WRITEPROTECT on for [addr, addr+len).
    pub fn write_protect(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .write_protect(addr as *mut libc::c_void, len as usize)
            .map_err(|e| UffdError::from_crate("UFFDIO_WRITEPROTECT", addr, len, e))
    }

    /// UFFDIO_WRITEPROTECT off for [addr, addr+len) (without waking
    /// anyone). It fails unless the whole range is registered in
    /// write-protect mode, and, unlike turning protection on, it allocates
    /// no page tables for the range's empty parts.
    pub fn write_unprotect(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .remove_write_protection(addr as *mut libc::c_void, len as usize, false)
            .map_err(|e| UffdError::from_crate("UFFDIO_WRITEPROTECT (off)", addr, len, e))
    }

    /// Puts the descriptor in non-blocking mode (`FIONBIO`): reads return no
    /// events instead of waiting.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        rustix::io::ioctl_fionbio(self.as_fd(), true).map_err(io::Error::from)
    }

    /// Reads the pending events into `buf`'s storage and appends them to
    /// `out`. On a non-blocking descriptor, none pending is `Ok` with nothing
    /// appended; [`UffdError::Closed`] once the registering process is gone.
    pub fn read_events(&self, buf: &mut EventBuffer, out: &mut Vec<UffdEvent>) -> Result<(), UffdError> {
        let events = self.inner.read_events(buf).map_err(|source| match source {
            userfaultfd::Error::ReadEof => UffdError::Closed,
            source => UffdError::Read { source },
        })?;
        out.extend(events.map(UffdEvent::from_crate));
        Ok(())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}
