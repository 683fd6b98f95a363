//! What the kernel's page tables say about a VMM's guest-memory mapping,
//! read with PAGEMAP_SCAN on the VMM's `/proc/PID/pagemap` without touching
//! the pages:
//!
//! - which pages were **written** since the last look ([`scan_written`],
//!   [`written_pages`]): the VMM registered the mapping with a userfaultfd in
//!   write-protect mode with `UFFD_FEATURE_WP_ASYNC`, so a write clears a
//!   page's write-protection without a fault; `PM_SCAN_WP_MATCHING` reports
//!   the pages that are no longer protected and protects them again,
//!   atomically: a write after the scan shows in the next one;
//! - which pages are **present** ([`present_pages`]): mapped by the page
//!   tables, so reading them cannot fault (a target guest frozen on
//!   unresolved faults can still be checked page by page).
//!
//! One walk of a range may take several ioctls (the output buffer bounds
//! each); [`walk`] does them all.
#![forbid(unsafe_code)]

use std::os::fd::BorrowedFd;

use crate::sys::{PageRegion, ScanRequest, pagemap_flags, pagemap_scan};

/// A scan that stopped at `at`: pages in [`at`, end) may have been
/// re-protected without being reported, so the caller must treat them as
/// written.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("PAGEMAP_SCAN at {at:#x}: {source}")]
    Ioctl {
        at: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("PAGEMAP_SCAN made no progress at {at:#x}")]
    NoProgress { at: u64 },
}

impl ScanError {
    /// Where the walk stopped.
    pub fn at(&self) -> u64 {
        match self {
            ScanError::Ioctl { at, .. } | ScanError::NoProgress { at } => *at,
        }
    }
}

/// PAGEMAP_SCAN over [`start`, `end`) with `flags`, reporting every range
/// [start, end) in `category` to `on_range`. `buf` is scratch space, reused
/// between calls; its capacity bounds each ioctl.
fn walk(
    pagemap: BorrowedFd<'_>,
    (start, end): (u64, u64),
    flags: u64,
    category: u64,
    buf: &mut Vec<PageRegion>,
    mut on_range: impl FnMut(u64, u64),
) -> Result<(), ScanError> {
    let mut position = start;
    while position < end {
        let request = ScanRequest { start: position, end, flags, category_mask: category, return_mask: category };
        let walk_end =
            pagemap_scan(pagemap, request, buf).map_err(|source| ScanError::Ioctl { at: position, source })?;
        for region in buf.iter() {
            on_range(region.start, region.end);
        }
        if walk_end <= position {
            return Err(ScanError::NoProgress { at: position });
        }
        position = walk_end.min(end);
    }
    Ok(())
}

/// Reports every written range [start, end) of the VMM's addresses
/// [`start`, `end`) to `on_written`, write-protecting them again. `buf` is
/// scratch space, reused between calls; its capacity bounds each ioctl.
pub fn scan_written(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    buf: &mut Vec<PageRegion>,
    on_written: impl FnMut(u64, u64),
) -> Result<(), ScanError> {
    let flags = pagemap_flags::PM_SCAN_WP_MATCHING | pagemap_flags::PM_SCAN_CHECK_WPASYNC;
    walk(pagemap, (start, end), flags, pagemap_flags::PAGE_IS_WRITTEN, buf, on_written)
}

/// Page indexes (from `base`, in `page_size` units) of [`base`, `base + size`)
/// in the ranges `collect` is called with.
fn page_indexes(
    base: u64,
    size: u64,
    page_size: u64,
    collect: impl FnOnce(&mut dyn FnMut(u64, u64)) -> Result<(), ScanError>,
) -> Result<Vec<u64>, ScanError> {
    let mut pages = Vec::new();
    collect(&mut |from, to| {
        pages.extend((from.max(base) - base) / page_size..(to.min(base + size) - base).div_ceil(page_size));
    })?;
    Ok(pages)
}

/// Page indexes (from `base`, in `page_size` units) written in
/// [`base`, `base + size`), write-protecting them again. For tests and tools;
/// the source agent marks pages in place with [`scan_written`].
pub fn written_pages(pagemap: BorrowedFd<'_>, base: u64, size: u64, page_size: u64) -> Result<Vec<u64>, ScanError> {
    let mut buf = Vec::with_capacity(SCAN_BATCH_REGIONS);
    page_indexes(base, size, page_size, |on_range| scan_written(pagemap, base, base + size, &mut buf, on_range))
}

/// Page indexes (from `base`, in `page_size` units) of [`base`, `base + size`)
/// that the page tables map, ascending; nothing is touched or changed.
pub fn present_pages(pagemap: BorrowedFd<'_>, base: u64, size: u64, page_size: u64) -> Result<Vec<u64>, ScanError> {
    let mut buf = Vec::with_capacity(SCAN_BATCH_REGIONS);
    let present = pagemap_flags::PAGE_IS_PRESENT;
    page_indexes(base, size, page_size, |on_range| walk(pagemap, (base, base + size), 0, present, &mut buf, on_range))
}

/// Reports every range [start, end) of [`start`, `end`) that the page tables
/// map to `on_present`; nothing is touched or changed. `buf` is scratch
/// space, reused between calls; its capacity bounds each ioctl.
pub fn scan_present(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    buf: &mut Vec<PageRegion>,
    on_present: impl FnMut(u64, u64),
) -> Result<(), ScanError> {
    walk(pagemap, (start, end), 0, pagemap_flags::PAGE_IS_PRESENT, buf, on_present)
}

/// Ranges one PAGEMAP_SCAN ioctl of [`written_pages`] and [`present_pages`]
/// may return.
const SCAN_BATCH_REGIONS: usize = 256;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::MemoryMap;
    use crate::memfile::{ftruncate, memfd_create};

    #[test]
    fn only_touched_pages_are_present() {
        let memfd = memfd_create("present-test", false).unwrap();
        ftruncate(memfd.as_fd(), 8 * 4096).unwrap();
        let map = MemoryMap::map(memfd.as_fd(), 0, 8 * 4096, true).unwrap();
        map.write_u64(2 * 4096, 1);
        map.read_u64(5 * 4096 + 8);
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        assert_eq!(present_pages(pagemap.as_fd(), map.addr(), 8 * 4096, 4096).unwrap(), [2, 5]);
        assert_eq!(present_pages(pagemap.as_fd(), map.addr() + 4 * 4096, 2 * 4096, 4096).unwrap(), [1]);
    }
}
