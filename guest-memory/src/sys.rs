//! Every `unsafe` line of this crate, each block with why it is sound:
//!
//! - [`MemoryMap`]: `mmap`/`munmap`/`madvise` (through `rustix`) and the raw
//!   copies in and out of guest memory, which must never become Rust
//!   references;
//! - the userfaultfd calls the `userfaultfd` crate marks `unsafe` (wrapping a
//!   handed-off descriptor, `UFFDIO_ZEROPAGE`, `UFFDIO_COPY`): they act on
//!   another process's address space, so they are sound for us whatever the
//!   address; [`crate::uffd`] is the safe face of them;
//! - the `userfaultfd(2)` system call and its `UFFDIO_API` handshake, for
//!   when `/dev/userfaultfd` exists but is not ours to open (the crate then
//!   gives up instead of trying the system call);
//! - `PAGEMAP_SCAN` (Linux 6.7): neither `rustix`, `nix` nor `userfaultfd`
//!   has it, and `rustix`'s typed ioctls drop the value it returns (the
//!   number of regions filled), so it is a raw `libc::ioctl`, its number
//!   computed here and checked at compile time (Debian's headers predate it).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::ptr::NonNull;

use linux_raw_sys::general as k;
use rustix::mm::{MapFlags, ProtFlags};

// ---------------------------------------------------------------------------
// ABI checks.

const fn iowr(ty: u32, nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

/// `_IOWR('f', 16, struct pm_scan_arg)` (linux/fs.h, 6.7+).
const PAGEMAP_SCAN: u32 = iowr(b'f' as u32, 16, size_of::<k::pm_scan_arg>());

const _: () = assert!(size_of::<k::pm_scan_arg>() == 96);
const _: () = assert!(size_of::<k::page_region>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)` (linux/userfaultfd.h).
const UFFDIO_API: u32 = iowr(0xAA, 0x3F, size_of::<k::uffdio_api>());
const _: () = assert!(UFFDIO_API == linux_raw_sys::ioctl::UFFDIO_API);

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
        Self::map_with(fd, offset, len, writable, MapFlags::SHARED)
    }

    /// Maps `len` bytes of `fd` at `offset` read-only with `MAP_NORESERVE`:
    /// on hugetlbfs the mapping reserves no huge page for the file's holes
    /// (for a mapping that never fills one, see
    /// [`Userfaultfd::guarding_holes`](crate::Userfaultfd::guarding_holes)).
    pub fn map_read_only_unreserved(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        Self::map_with(fd, offset, len, false, MapFlags::SHARED | MapFlags::NORESERVE)
    }

    fn map_with(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool, flags: MapFlags) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map 0 bytes"));
        }
        let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no
        // Rust object; the fd is open for the duration of the call.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) }?;
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

    /// `madvise(2)` over `len` bytes at `offset` (page aligned): drops the
    /// mapping's page-table entries ([`Discard::DontNeed`]), or also frees the
    /// file's pages, which read back as zeros ([`Discard::Remove`]), as a VMM
    /// does for a ballooned or reported-free guest page.
    pub fn discard(&self, offset: usize, len: usize, how: Discard) -> io::Result<()> {
        self.check(offset, len);
        let advice = match how {
            Discard::DontNeed => rustix::mm::Advice::LinuxDontNeed,
            Discard::Remove => rustix::mm::Advice::LinuxRemove,
        };
        // SAFETY: the range is inside the live mapping (checked), which no
        // Rust reference points into (see the type's docs): dropping its
        // page-table entries or its file pages invalidates nothing of ours.
        Ok(unsafe { rustix::mm::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) }?)
    }

    /// `MADV_POPULATE_READ` over `len` bytes at `offset` (page aligned): maps
    /// the file's pages there into this mapping's page tables, as reads
    /// would, without touching them. A hole fails the call (`EFAULT`) where
    /// a userfaultfd guards it ([`Userfaultfd::guarding_holes`](crate::Userfaultfd::guarding_holes));
    /// elsewhere it would allocate a page.
    pub fn populate_read(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len);
        // SAFETY: the range is inside the live mapping (checked); populating
        // page tables changes no byte of it and no Rust object.
        Ok(unsafe {
            rustix::mm::madvise(self.ptr.as_ptr().add(offset).cast(), len, rustix::mm::Advice::LinuxPopulateRead)
        }?)
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

/// How [`MemoryMap::discard`] drops pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// `MADV_DONTNEED`: only this mapping's page-table entries go; a shared
    /// file keeps its content.
    DontNeed,
    /// `MADV_REMOVE`: the file's pages go too (a hole punched in it).
    Remove,
}

impl Drop for MemoryMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once; no
        // reference into the mapping exists (see the type's docs).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------
// userfaultfd calls the crate marks unsafe.

/// Takes ownership of a userfaultfd received from a VMM (the hand-off).
pub(crate) fn uffd_from_fd(fd: OwnedFd) -> userfaultfd::Uffd {
    // SAFETY: `fd` is an open descriptor we own (the hand-off checked that it
    // is a userfaultfd); ownership moves into the `Uffd`, which closes it.
    unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) }
}

/// A new userfaultfd from the `userfaultfd(2)` system call (`flags`:
/// `O_CLOEXEC`, `O_NONBLOCK`, `UFFD_USER_MODE_ONLY`), its `UFFDIO_API`
/// handshake done with `features` (raw `UFFD_FEATURE_*` bits).
pub(crate) fn uffd_by_syscall(flags: u32, features: u64) -> io::Result<userfaultfd::Uffd> {
    // SAFETY: userfaultfd(2) takes one integer argument and returns a new
    // descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_int) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the system call just returned this descriptor; nobody else has it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut api = k::uffdio_api { api: u64::from(k::UFFD_API), features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api`
    // is (its size is in the request number), alive for the whole call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uffd_from_fd(fd))
}

/// `UFFDIO_ZEROPAGE` over [addr, addr+len) of the VMM that registered `uffd`.
pub(crate) fn uffd_zeropage(uffd: &userfaultfd::Uffd, addr: u64, len: u64, wake: bool) -> userfaultfd::Result<usize> {
    // SAFETY: the range is in the address space of the process that
    // registered the uffd (the VMM), never in ours unless we are that
    // process, in which case it is the registered guest-memory mapping, which
    // no Rust reference points into (see `MemoryMap`). The kernel refuses
    // ranges outside the registration.
    unsafe { uffd.zeropage(addr as *mut libc::c_void, len as usize, wake) }
}

/// `UFFDIO_COPY` of `src` to `dst` in the VMM that registered `uffd`.
pub(crate) fn uffd_copy(uffd: &userfaultfd::Uffd, dst: u64, src: &[u8], wake: bool) -> userfaultfd::Result<usize> {
    // SAFETY: `src` is a live buffer of `src.len()` bytes that the kernel only
    // reads; `dst` as for `uffd_zeropage`.
    unsafe { uffd.copy(src.as_ptr().cast(), dst as *mut libc::c_void, src.len(), wake) }
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

/// PAGEMAP_SCAN flags and page categories (linux/fs.h).
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
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    out.extend(regions[..(n as usize).min(cap)].iter().map(|r| PageRegion {
        start: r.start,
        end: r.end,
        categories: r.categories,
    }));
    Ok(arg.walk_end)
}
