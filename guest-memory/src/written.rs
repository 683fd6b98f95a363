//! Which pages of a VMM's mapping were written since the last look.
//!
//! The VMM registered the mapping with a userfaultfd in write-protect mode
//! with `UFFD_FEATURE_WP_ASYNC`: a write clears a page's write-protection
//! without a fault. PAGEMAP_SCAN with `PM_SCAN_WP_MATCHING` (on the VMM's
//! `/proc/PID/pagemap`) reports the pages that are no longer protected and
//! protects them again, atomically: a write after the scan shows in the next
//! one. One scan of a range may take several ioctls (the output buffer
//! bounds each); [`scan_written`] walks them all.
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

/// Reports every written range [start, end) of the VMM's addresses
/// [`start`, `end`) to `on_written`, write-protecting them again. `buf` is
/// scratch space, reused between calls; its capacity bounds each ioctl.
pub fn scan_written(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    buf: &mut Vec<PageRegion>,
    mut on_written: impl FnMut(u64, u64),
) -> Result<(), ScanError> {
    let mut position = start;
    while position < end {
        let request = ScanRequest {
            start: position,
            end,
            flags: pagemap_flags::PM_SCAN_WP_MATCHING | pagemap_flags::PM_SCAN_CHECK_WPASYNC,
            category_mask: pagemap_flags::PAGE_IS_WRITTEN,
            return_mask: pagemap_flags::PAGE_IS_WRITTEN,
        };
        let walk_end =
            pagemap_scan(pagemap, request, buf).map_err(|source| ScanError::Ioctl { at: position, source })?;
        for region in buf.iter() {
            on_written(region.start, region.end);
        }
        if walk_end <= position {
            return Err(ScanError::NoProgress { at: position });
        }
        position = walk_end.min(end);
    }
    Ok(())
}

/// Page indexes (from `base`, in `page_size` units) written in
/// [`base`, `base + size`), write-protecting them again. For tests and tools;
/// the source agent marks pages in place with [`scan_written`].
pub fn written_pages(pagemap: BorrowedFd<'_>, base: u64, size: u64, page_size: u64) -> Result<Vec<u64>, ScanError> {
    let mut pages = Vec::new();
    let mut buf = Vec::with_capacity(256);
    scan_written(pagemap, base, base + size, &mut buf, |from, to| {
        pages.extend((from - base) / page_size..(to - base).div_ceil(page_size));
    })?;
    Ok(pages)
}
