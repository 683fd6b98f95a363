//! Every `unsafe` line of this crate: memory mappings, memfd, the userfaultfd
//! ioctls, PAGEMAP_SCAN and SCM_RIGHTS. Each block says why it is sound.
//!
//! Struct layouts come from `linux-raw-sys`; PAGEMAP_SCAN's ioctl number is
//! computed here (Debian's headers are older than the kernel) and checked at
//! compile time, as are the sizes of every struct handed to the kernel.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use linux_raw_sys::general as k;
use linux_raw_sys::ioctl as kio;

// ---------------------------------------------------------------------------
// ABI checks.

const fn iowr(ty: u32, nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

/// `_IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h, 6.7+).
pub const PAGEMAP_SCAN: u32 = iowr(b'f' as u32, 16, size_of::<k::pm_scan_arg>());

const _: () = assert!(size_of::<k::pm_scan_arg>() == 96);
const _: () = assert!(size_of::<k::page_region>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);
const _: () = assert!(size_of::<k::uffd_msg>() == UFFD_MSG_SIZE);
const _: () = assert!(size_of::<k::uffdio_api>() == 24);
const _: () = assert!(size_of::<k::uffdio_register>() == 32);
const _: () = assert!(size_of::<k::uffdio_continue>() == 32);
const _: () = assert!(size_of::<k::uffdio_copy>() == 40);
const _: () = assert!(size_of::<k::uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<k::uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<k::uffdio_range>() == 16);
// The ioctl numbers we take from linux-raw-sys follow the same encoding.
const _: () = assert!(kio::UFFDIO_CONTINUE == iowr(0xAA, 0x07, size_of::<k::uffdio_continue>()));
const _: () = assert!(kio::UFFDIO_COPY == iowr(0xAA, 0x03, size_of::<k::uffdio_copy>()));
const _: () = assert!(kio::UFFDIO_API == iowr(0xAA, 0x3F, size_of::<k::uffdio_api>()));
const _: () = assert!(kio::UFFDIO_ZEROPAGE == iowr(0xAA, 0x04, size_of::<k::uffdio_zeropage>()));
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd (linux/userfaultfd.h, 6.1+).
const USERFAULTFD_IOC_NEW: u32 = 0xAA00;

const UFFD_MSG_SIZE: usize = 32;
/// linux/userfaultfd.h: `UFFDIO_CONTINUE_MODE_DONTWAKE ((__u64)1<<0)`.
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1;
/// linux/userfaultfd.h: `UFFDIO_ZEROPAGE_MODE_DONTWAKE ((__u64)1<<0)`.
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;
/// linux/userfaultfd.h: `UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1<<0)`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Puts an fd in non-blocking mode (O_NONBLOCK on its open file description).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a borrowed, open fd touch only its flags.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        cvt(libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Files.

/// A memfd for guest memory: shmem, or hugetlbfs with 2 MiB pages.
pub fn memfd_create(name: &str, hugetlb: bool) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is new
    // and owned by nobody else.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just returned by memfd_create and is open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Allocates `len` bytes at `offset` of `fd` (zeroed where they were holes).
pub fn fallocate_keep_size(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open fd.
    cvt(unsafe {
        libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    })
    .map(drop)
}

/// Deallocates `len` bytes at `offset` of `fd` (they read back as zeros and
/// are holes again); the file keeps its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open fd.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

// ---------------------------------------------------------------------------
// Mappings.

/// A `MAP_SHARED` mapping of (part of) a guest-memory file.
///
/// The memory may change under us (the guest, the VMM, the kernel), so it is
/// never exposed as a Rust slice: bytes are copied in and out with raw
/// pointer copies, as VMMs do with guest memory.
#[derive(Debug)]
pub struct MemoryMap {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; all
// access goes through raw copies, never through references.
unsafe impl Send for MemoryMap {}
// SAFETY: as above; concurrent raw copies are the intended use.
unsafe impl Sync for MemoryMap {}

impl MemoryMap {
    /// Maps `len` bytes of `fd` at `offset`, read-only or read-write.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map 0 bytes"));
        }
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no
        // Rust object; the fd is open for the duration of the call.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset as libc::off_t)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len, writable })
    }

    /// Host virtual address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access {offset:#x}+{len:#x} outside mapping of {:#x} bytes",
            self.len
        );
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the source range is inside the live mapping (checked), the
        // destination is a distinct Rust buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn copy_in(&self, offset: usize, src: &[u8]) {
        assert!(self.writable, "copy_in on a read-only mapping");
        self.check(offset, src.len());
        // SAFETY: the destination range is inside the live, writable mapping
        // (checked); `src` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) }
    }

    /// Writes zeros over `len` bytes at `offset`.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        assert!(self.writable, "fill_zero on a read-only mapping");
        self.check(offset, len);
        // SAFETY: the range is inside the live, writable mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) }
    }

    /// Reads the aligned 64-bit word at `offset`.
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        assert!(offset.is_multiple_of(8), "unaligned word {offset:#x}");
        // SAFETY: in bounds (checked) and 8-byte aligned (mappings are page
        // aligned); volatile because other threads and processes write here.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<u64>()) }
    }

    /// Writes the aligned 64-bit word at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        assert!(self.writable, "write_u64 on a read-only mapping");
        self.check(offset, 8);
        assert!(offset.is_multiple_of(8), "unaligned word {offset:#x}");
        // SAFETY: in bounds, aligned, writable (checked above).
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<u64>(), value) }
    }
}

impl Drop for MemoryMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

// ---------------------------------------------------------------------------
// userfaultfd.

/// Features (UFFD_FEATURE_*) and register modes, re-exported for callers.
pub mod uffd_flags {
    use linux_raw_sys::general as k;
    pub const FEATURE_MINOR_SHMEM: u64 = k::UFFD_FEATURE_MINOR_SHMEM as u64;
    pub const FEATURE_MINOR_HUGETLBFS: u64 = k::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
    pub const FEATURE_MISSING_SHMEM: u64 = k::UFFD_FEATURE_MISSING_SHMEM as u64;
    pub const FEATURE_MISSING_HUGETLBFS: u64 = k::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
    pub const FEATURE_WP_ASYNC: u64 = k::UFFD_FEATURE_WP_ASYNC as u64;
    pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
    pub const FEATURE_EVENT_REMOVE: u64 = k::UFFD_FEATURE_EVENT_REMOVE as u64;
    pub const FEATURE_THREAD_ID: u64 = k::UFFD_FEATURE_THREAD_ID as u64;
    pub const MODE_MISSING: u64 = k::UFFDIO_REGISTER_MODE_MISSING as u64;
    pub const MODE_WP: u64 = k::UFFDIO_REGISTER_MODE_WP as u64;
    pub const MODE_MINOR: u64 = k::UFFDIO_REGISTER_MODE_MINOR as u64;
}

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
}

/// One fault or event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    PageFault(PageFault),
    /// MADV_DONTNEED/REMOVE on [start, end): mappings were dropped.
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Other {
        event: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    pub address: u64,
    pub flags: u64,
    pub thread_id: u32,
}

impl PageFault {
    /// A minor fault: the page is in the page cache, only the PTE is missing.
    pub fn is_minor(&self) -> bool {
        self.flags & k::UFFD_PAGEFAULT_FLAG_MINOR as u64 != 0
    }
    pub fn is_write(&self) -> bool {
        self.flags & k::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0
    }
}

fn parse_msg(raw: &[u8; UFFD_MSG_SIZE]) -> UffdEvent {
    let u64_at = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |o: usize| u32::from_ne_bytes(raw[o..o + 4].try_into().unwrap_or([0; 4]));
    // struct uffd_msg { __u8 event; __u8 reserved[7]; union arg (24 bytes) }
    match u32::from(raw[0]) {
        k::UFFD_EVENT_PAGEFAULT => {
            UffdEvent::PageFault(PageFault { flags: u64_at(8), address: u64_at(16), thread_id: u32_at(24) })
        }
        k::UFFD_EVENT_REMOVE => UffdEvent::Remove { start: u64_at(8), end: u64_at(16) },
        k::UFFD_EVENT_UNMAP => UffdEvent::Unmap { start: u64_at(8), end: u64_at(16) },
        other => UffdEvent::Other { event: other as u8 },
    }
}

/// A userfaultfd: created by the VMM, handed to an agent.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Creates a userfaultfd (syscall, else /dev/userfaultfd), close-on-exec,
    /// non-blocking if asked. Faults from kernel mode are included (KVM
    /// touches guest memory from the kernel).
    pub fn new(nonblocking: bool) -> io::Result<Self> {
        let mut flags = libc::O_CLOEXEC;
        if nonblocking {
            flags |= libc::O_NONBLOCK;
        }
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
        let fd = if fd >= 0 {
            fd
        } else {
            let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd.
            cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?
        };
        // SAFETY: `fd` is a freshly created, open userfaultfd owned by nobody else.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Wraps a userfaultfd received from elsewhere (the hand-off).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// UFFDIO_API handshake asking for `features`; returns what the kernel
    /// supports. Fails if any asked feature is missing.
    pub fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = k::uffdio_api { api: k::UFFD_API as u64, features, ioctls: 0 };
        // SAFETY: `api` is a valid uffdio_api that the kernel reads and writes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_API as _, &mut api) };
        if r < 0 {
            return Err(UffdError::Os { op: "UFFDIO_API", addr: 0, len: 0, source: io::Error::last_os_error() });
        }
        Ok(api.features)
    }

    /// Registers [addr, addr+len) in the given modes; returns the ioctls allowed.
    pub fn register(&self, addr: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut reg = k::uffdio_register { range: k::uffdio_range { start: addr, len }, mode, ioctls: 0 };
        // SAFETY: `reg` is a valid uffdio_register the kernel reads and writes;
        // registering affects only the calling process's own mapping.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_REGISTER as _, &mut reg) };
        if r < 0 {
            return Err(UffdError::Os { op: "UFFDIO_REGISTER", addr, len, source: io::Error::last_os_error() });
        }
        Ok(reg.ioctls)
    }

    fn range_error(op: &'static str, addr: u64, len: u64, errno: i32) -> UffdError {
        match errno {
            libc::EEXIST => UffdError::Exists { op, addr, len },
            libc::EAGAIN => UffdError::Again { op, addr, len },
            libc::EFAULT | libc::ENOENT => UffdError::NoPage { op, addr, len },
            e => UffdError::Os { op, addr, len, source: io::Error::from_raw_os_error(e) },
        }
    }

    /// UFFDIO_CONTINUE: maps the page-cache pages of [addr, addr+len) and
    /// wakes threads waiting on them (unless `wake` is false). Returns the
    /// bytes mapped, which is less than `len` when the kernel stopped early
    /// (EAGAIN after partial progress): call again for the rest.
    pub fn continue_range(&self, addr: u64, len: u64, wake: bool) -> Result<u64, UffdError> {
        let mode = if wake { 0 } else { UFFDIO_CONTINUE_MODE_DONTWAKE };
        let mut arg = k::uffdio_continue { range: k::uffdio_range { start: addr, len }, mode, mapped: 0 };
        // SAFETY: `arg` is a valid uffdio_continue the kernel reads and writes;
        // the range is in the VMM's address space, not ours.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_CONTINUE as _, &mut arg) };
        if r == 0 {
            return Ok(len);
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if arg.mapped > 0 {
            return Ok(arg.mapped as u64);
        }
        Err(Self::range_error("UFFDIO_CONTINUE", addr, len, errno))
    }

    /// UFFDIO_COPY of `src` to `dst` (a MISSING fault's page).
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<u64, UffdError> {
        let mode = if wake { 0 } else { k::UFFDIO_COPY_MODE_DONTWAKE as u64 };
        let len = src.len() as u64;
        let mut arg = k::uffdio_copy { dst, src: src.as_ptr() as u64, len, mode, copy: 0 };
        // SAFETY: `src` is a live buffer of `len` bytes the kernel only reads.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_COPY as _, &mut arg) };
        if r == 0 {
            return Ok(len);
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if arg.copy > 0 {
            return Ok(arg.copy as u64);
        }
        Err(Self::range_error("UFFDIO_COPY", dst, len, errno))
    }

    /// UFFDIO_ZEROPAGE: resolves MISSING faults on [addr, addr+len) with
    /// zeroed pages (shmem allocates them in the page cache). Not supported
    /// on hugetlbfs (EINVAL).
    pub fn zeropage(&self, addr: u64, len: u64, wake: bool) -> Result<u64, UffdError> {
        let mode = if wake { 0 } else { UFFDIO_ZEROPAGE_MODE_DONTWAKE };
        let mut arg = k::uffdio_zeropage { range: k::uffdio_range { start: addr, len }, mode, zeropage: 0 };
        // SAFETY: `arg` is a valid uffdio_zeropage the kernel reads and writes;
        // the range is in the VMM's address space, not ours.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_ZEROPAGE as _, &mut arg) };
        if r == 0 {
            return Ok(len);
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if arg.zeropage > 0 {
            return Ok(arg.zeropage as u64);
        }
        Err(Self::range_error("UFFDIO_ZEROPAGE", addr, len, errno))
    }

    /// UFFDIO_WAKE: wakes threads blocked on faults in [addr, addr+len).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = k::uffdio_range { start: addr, len };
        // SAFETY: `range` is a valid uffdio_range the kernel reads.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_WAKE as _, &mut range) };
        if r < 0 {
            return Err(UffdError::Os { op: "UFFDIO_WAKE", addr, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// UFFDIO_WRITEPROTECT on or off for [addr, addr+len).
    pub fn write_protect(&self, addr: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mode = if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
        let mut arg = k::uffdio_writeprotect { range: k::uffdio_range { start: addr, len }, mode };
        // SAFETY: `arg` is a valid uffdio_writeprotect the kernel reads.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), kio::UFFDIO_WRITEPROTECT as _, &mut arg) };
        if r < 0 {
            return Err(UffdError::Os { op: "UFFDIO_WRITEPROTECT", addr, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Reads pending events into `out`; returns how many. On a non-blocking
    /// fd, 0 means none pending.
    pub fn read_events(&self, out: &mut [UffdEvent]) -> io::Result<usize> {
        const MAX: usize = 64;
        let mut raw = [[0u8; UFFD_MSG_SIZE]; MAX];
        let want = out.len().min(MAX);
        // SAFETY: `raw` is a writable buffer of `want` whole messages.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), want * UFFD_MSG_SIZE) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(err) };
        }
        let count = n as usize / UFFD_MSG_SIZE;
        for (slot, msg) in out.iter_mut().zip(raw.iter()).take(count) {
            *slot = parse_msg(msg);
        }
        Ok(count)
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN.

/// A run of pages [start, end) (addresses) reported by PAGEMAP_SCAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

pub mod pagemap_flags {
    use linux_raw_sys::general as k;
    pub const PM_SCAN_WP_MATCHING: u64 = k::PM_SCAN_WP_MATCHING as u64;
    pub const PM_SCAN_CHECK_WPASYNC: u64 = k::PM_SCAN_CHECK_WPASYNC as u64;
    pub const PAGE_IS_WRITTEN: u64 = k::PAGE_IS_WRITTEN as u64;
    pub const PAGE_IS_PRESENT: u64 = k::PAGE_IS_PRESENT as u64;
}

/// Arguments of one PAGEMAP_SCAN call.
#[derive(Debug, Clone, Copy)]
pub struct ScanRequest {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
    pub category_mask: u64,
    pub return_mask: u64,
}

/// PAGEMAP_SCAN on an open `/proc/PID/pagemap` (of the process that owns the
/// range). Fills `out` (its capacity bounds the regions returned) and
/// returns the address where the walk ended: less than `end` if `out` filled
/// up, in which case scan again from there.
pub fn pagemap_scan(pagemap: BorrowedFd<'_>, req: ScanRequest, out: &mut Vec<PageRegion>) -> io::Result<u64> {
    out.clear();
    let cap = out.capacity().max(1);
    let mut regions = vec![k::page_region { start: 0, end: 0, categories: 0 }; cap];
    let mut arg = k::pm_scan_arg {
        size: size_of::<k::pm_scan_arg>() as u64,
        flags: req.flags,
        start: req.start,
        end: req.end,
        walk_end: 0,
        vec: regions.as_mut_ptr() as u64,
        vec_len: cap as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: req.category_mask,
        category_anyof_mask: 0,
        return_mask: req.return_mask,
    };
    // SAFETY: `arg` is a valid pm_scan_arg; `vec` points at `cap` writable
    // page_region structs that outlive the call.
    let n = cvt(unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) })? as usize;
    out.extend(regions[..n.min(cap)].iter().map(|r| PageRegion {
        start: r.start,
        end: r.end,
        categories: r.categories,
    }));
    Ok(arg.walk_end)
}

// ---------------------------------------------------------------------------
// SCM_RIGHTS.

const MAX_FDS: usize = 8;

/// Sends `data` with `fds` attached (SCM_RIGHTS) on a Unix stream socket.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, enough for one cmsg
        // carrying `raw`; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
        }
    }
    // SAFETY: `msg` points at live iovec and control buffers for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Receives bytes into `buf` and any fds attached (close-on-exec).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut cmsg_buf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at live, writable iovec and control buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen valid bytes;
    // the CMSG_* macros walk only within them, and each SCM_RIGHTS fd is a new
    // descriptor installed for us, owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {MAX_FDS} fds attached")));
    }
    Ok((n as usize, fds))
}
