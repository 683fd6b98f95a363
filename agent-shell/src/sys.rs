//! The shell's only `unsafe` code: telling glibc's allocator to give large
//! buffers back to the kernel when they are freed.
//!
//! glibc serves an allocation of 128 KiB or more with its own mmap, and
//! unmaps it when freed, but it raises that threshold to the size of any
//! such block freed (up to 32 MiB). After the first 2 MiB page reply was
//! freed, every later one came from the heap arenas, and glibc kept them:
//! ten `GetPages` clients that stopped reading left 1.45 GB behind after
//! they disconnected, 200 clients 8 GB. Pinning the threshold at its
//! initial value (which also stops the trim threshold from following it)
//! keeps every page buffer and encoded reply out of the arenas: memory
//! comes back as soon as a client's replies are dropped, at the cost of
//! mapping each large buffer afresh (its page faults: a few percent of
//! the time to read and send 2 MiB).
//!
//! Other allocators (musl) keep no such memory: nothing to do there.

/// The threshold glibc starts with: blocks this large or larger are mmapped.
pub const MMAP_THRESHOLD_BYTES: i32 = 128 << 10;

/// Pins glibc's mmap threshold at [`MMAP_THRESHOLD_BYTES`]; returns whether
/// glibc took it (always `false` elsewhere).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_large_buffers_to_the_kernel() -> bool {
    // SAFETY: mallopt takes two integers and only changes the allocator's
    // parameters (under its own lock); M_MMAP_THRESHOLD with a value up to
    // HEAP_MAX/2 (32 MiB on 64-bit) is documented to be accepted at any
    // time, and blocks already allocated keep how they were allocated.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_large_buffers_to_the_kernel() -> bool {
    false
}
