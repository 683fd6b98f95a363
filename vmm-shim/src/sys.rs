//! Every `unsafe` line of the shim: the load-time constructor, the
//! interposed `mmap`/`mmap64`, the `dlsym(RTLD_NEXT)` lookup of the real
//! ones, borrowing QEMU's descriptors (for `fstat`/`dup` through `rustix`),
//! `errno` and `_exit`.
//!
//! The interposers forward every call, unchanged, to the libc function of
//! the same name and only then let [`crate::watch`] look at a successful
//! mapping. They never touch the memory themselves.
//!
//! Re-entrancy: the shim's own code may call `mmap` (through std or
//! guest-memory), which lands here again. That is harmless: such a call is
//! forwarded like any other, and only a mapping of the watched guest-memory
//! file triggers anything, which the shim itself never creates.
//!
//! In this crate's unit-test binary the interposers and the constructor are
//! compiled out, so the test harness's own mappings go straight to libc.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicPtr, Ordering};

/// `mmap`'s and `mmap64`'s signature (identical on 64-bit glibc).
type MmapFn = unsafe extern "C" fn(*mut c_void, libc::size_t, c_int, c_int, c_int, libc::off64_t) -> *mut c_void;

/// A libc function found with `dlsym(RTLD_NEXT, name)`, looked up once.
struct RealMmap {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl RealMmap {
    const fn new(name: &'static CStr) -> Self {
        Self { name, ptr: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// The next definition of `name` after this library (libc's), if any.
    fn get(&self) -> Option<MmapFn> {
        let mut ptr = self.ptr.load(Ordering::Acquire);
        if ptr.is_null() {
            // SAFETY: `name` is NUL-terminated; RTLD_NEXT looks the symbol up
            // in the objects loaded after this one. dlsym is thread-safe and
            // does not call mmap through the PLT (no recursion into us).
            ptr = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
            if ptr.is_null() {
                return None;
            }
            // Racing threads store the same value.
            self.ptr.store(ptr, Ordering::Release);
        }
        // SAFETY: `ptr` is libc's `mmap` or `mmap64`, whose C signature is
        // exactly `MmapFn` on 64-bit Linux.
        Some(unsafe { std::mem::transmute::<*mut c_void, MmapFn>(ptr) })
    }
}

static REAL_MMAP: RealMmap = RealMmap::new(c"mmap");
static REAL_MMAP64: RealMmap = RealMmap::new(c"mmap64");

/// Calls the real function, or the raw syscall if dlsym found nothing.
///
/// # Safety
/// The arguments must satisfy mmap(2)'s contract, as for the caller of the
/// interposed function.
unsafe fn forward(
    real: &RealMmap,
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off64_t,
) -> *mut c_void {
    match real.get() {
        // SAFETY: the caller's arguments are passed on unchanged to the
        // function they meant to call.
        Some(f) => unsafe { f(addr, len, prot, flags, fd, offset) },
        None => {
            // SAFETY: as above; the raw syscall has the same contract (a
            // 64-bit offset on the 64-bit targets this library supports).
            let ret = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) };
            if ret == -1 { libc::MAP_FAILED } else { ret as *mut c_void }
        }
    }
}

/// What every interposer does once the real call has returned `ptr`.
fn after_real_call(ptr: *mut c_void, len: libc::size_t, flags: c_int, fd: c_int, offset: i64) {
    if ptr == libc::MAP_FAILED || fd < 0 || flags & libc::MAP_ANONYMOUS != 0 {
        return;
    }
    let saved = errno();
    crate::watch::after_mmap(crate::watch::Mapping { addr: ptr as u64, len: len as u64, flags, fd, offset });
    set_errno(saved);
}

/// Interposes libc's `mmap64` (what QEMU 7.2 imports).
///
/// # Safety
/// Same contract as mmap64(3); the call is forwarded unchanged.
#[cfg(not(test))]
// SAFETY: exporting `mmap64` is the point of this library: it must shadow
// libc's definition with an identical signature, and it does.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off64_t,
) -> *mut c_void {
    // SAFETY: our caller upholds mmap64's contract; the call is forwarded.
    let ptr = unsafe { forward(&REAL_MMAP64, addr, len, prot, flags, fd, offset) };
    after_real_call(ptr, len, flags, fd, offset);
    ptr
}

/// Interposes libc's `mmap` (what programs built without
/// `_FILE_OFFSET_BITS=64` import).
///
/// # Safety
/// Same contract as mmap(2); the call is forwarded unchanged.
#[cfg(not(test))]
// SAFETY: as for `mmap64`: an identical signature shadowing libc's `mmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // SAFETY: our caller upholds mmap's contract; the call is forwarded.
    let ptr = unsafe { forward(&REAL_MMAP, addr, len, prot, flags, fd, offset) };
    after_real_call(ptr, len, flags, fd, offset);
    ptr
}

/// Runs when the dynamic loader loads the library, before QEMU's `main`.
#[cfg(not(test))]
extern "C" fn on_load() {
    crate::watch::on_load();
}

#[cfg(not(test))]
#[used]
// SAFETY: `.init_array` entries are `extern "C" fn()` pointers called once by
// the loader after libc is initialised; `on_load` has that type and may run
// at that point (it only reads the environment and /proc/self/cmdline).
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;

/// What the shim needs to know about a mapped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    /// The file system's block size: the page size of tmpfs/shmem (4 KiB)
    /// or of hugetlbfs (2 MiB).
    pub blksize: u64,
    pub size: u64,
}

/// Runs `f` on QEMU's descriptor `fd`, borrowed for the call.
fn with_qemu_fd<T>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is the descriptor QEMU has just passed to mmap, which
    // returned successfully, so it is open; it stays open while we use it:
    // the shim runs inside QEMU's mmap call, on QEMU's calling thread.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    f(borrowed)
}

/// fstat(2) of a descriptor the shim does not own (QEMU's).
pub fn fstat(fd: RawFd) -> io::Result<FileStat> {
    let st = with_qemu_fd(fd, |fd| Ok(rustix::fs::fstat(fd)?))?;
    Ok(FileStat { dev: st.st_dev, ino: st.st_ino, blksize: st.st_blksize as u64, size: st.st_size as u64 })
}

/// A close-on-exec duplicate of one of QEMU's descriptors, owned by the shim
/// (QEMU keeps and may close its own).
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    with_qemu_fd(fd, |fd| Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?))
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = value }
}

/// Ends the process at once with `code`, without running QEMU's exit
/// handlers (the shim may be in the middle of QEMU's start-up). Everything
/// the shim printed is already out: Rust's stderr is unbuffered.
pub fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}
