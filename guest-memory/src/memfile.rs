//! Guest-memory files: memfd on shmem or hugetlbfs, sizing, allocating and
//! punching holes, finding them (all through `rustix`).
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SeekFrom};

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

/// Reports each range [from, to) of [`start`, `end`) of `fd` that holds data
/// (is not a hole), with `SEEK_DATA` / `SEEK_HOLE`; past the end of the file
/// nothing does. Moves the file position of `fd` (and of its duplicates;
/// `pread` does not use it).
pub fn data_ranges(fd: BorrowedFd<'_>, start: u64, end: u64, mut on_data: impl FnMut(u64, u64)) -> io::Result<()> {
    let mut position = start;
    while position < end {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(position)) {
            Ok(data) => data,
            // No data from `position` to the end of the file.
            Err(rustix::io::Errno::NXIO) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            return Ok(());
        }
        let hole = match rustix::fs::seek(fd, SeekFrom::Hole(data)) {
            Ok(hole) => hole,
            // The file shrank between the two calls.
            Err(rustix::io::Errno::NXIO) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            return Err(io::Error::other(format!("SEEK_HOLE from data at {data:#x} went back to {hole:#x}")));
        }
        on_data(data, hole.min(end));
        position = hole;
    }
    Ok(())
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
    fn data_ranges_skip_holes_and_stop_at_the_end() {
        use std::os::fd::AsFd;
        let page = 4096;
        let fd = memfd_create("data-ranges", false).expect("memfd");
        ftruncate(fd.as_fd(), 16 * page).expect("ftruncate");
        // Pages fallocated but never written count as holes on shmem: write.
        let write = |first: u64, pages: u64| {
            let bytes = vec![1u8; (pages * page) as usize];
            assert_eq!(rustix::io::pwrite(&fd, &bytes, first * page).expect("pwrite"), bytes.len());
        };
        write(2, 6);
        punch_hole(fd.as_fd(), 4 * page, page).expect("punch page 4");
        write(15, 1);
        let ranges = |start, end| {
            let mut ranges = Vec::new();
            data_ranges(fd.as_fd(), start, end, |from, to| ranges.push((from / page, to / page))).expect("seek");
            ranges
        };
        assert_eq!(ranges(0, 16 * page), [(2, 4), (5, 8), (15, 16)]);
        assert_eq!(ranges(3 * page, 6 * page), [(3, 4), (5, 6)]);
        ftruncate(fd.as_fd(), 6 * page).expect("shrink");
        assert_eq!(ranges(0, 16 * page), [(2, 4), (5, 6)], "nothing past the end is data");
    }

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
