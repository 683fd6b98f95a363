//! Guest-memory files: memfd on shmem or hugetlbfs, sizing, allocating and
//! punching holes (all through `rustix`).
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags};

/// A close-on-exec memfd for guest memory: shmem, or hugetlbfs with 2 MiB
/// pages.
pub fn memfd_create(name: &str, hugetlb: bool) -> io::Result<OwnedFd> {
    let mut flags = MemfdFlags::CLOEXEC;
    if hugetlb {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    Ok(rustix::fs::memfd_create(name, flags)?)
}

/// Sets the file's size.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, len)?)
}

/// Allocates `len` bytes at `offset` of `fd` (zeroed where they were holes);
/// the file keeps its size.
pub fn fallocate_keep_size(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(fd, FallocateFlags::KEEP_SIZE, offset, len)?)
}

/// Deallocates `len` bytes at `offset` of `fd` (they read back as zeros and
/// are holes again); the file keeps its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)?)
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host
/// (the stand-ins and the agents stamp events with it).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_covers_every_byte() {
        let mut page = vec![0u8; 4099];
        assert!(is_zero(&page));
        for at in [0, 7, 8, 4095, 4098] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
    }
}
