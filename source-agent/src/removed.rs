//! Pages removed from a VMM's memory file: the dirty pages that
//! write-protection does not see.
//!
//! Dirty tracking ([`crate::dirty`]) finds the pages the VMM *wrote* through
//! its mapping. A page whose file content goes away without a write
//! (`fallocate(PUNCH_HOLE)` on the memfd, `MADV_REMOVE` on the mapping, as a
//! VMM does for a ballooned or reported-free guest page; the file shrinking)
//! now reads as zeros, but the kernel keeps the page's uffd-wp marker
//! across the hole punch, so `PAGEMAP_SCAN` does not report it as written
//! (Linux 6.18, shmem: a page the VMM had not written since the last scan
//! and then removed is not reported; one it had written is). A target
//! holding the old content would keep a stale page. Without this module,
//! `tests/vmm_handoff.rs::pages_the_vmm_drops_after_a_round` fails on
//! exactly those pages.
//!
//! So every scan also looks at which pages of the file hold data
//! (`SEEK_DATA`/`SEEK_HOLE`, [`guest_memory::memfile::data_ranges`]): a page
//! that held data at the previous look and is a hole (or past the end of
//! the file) now was removed, and is dirty at the new epoch. A page that was
//! a hole and still is reads as zeros both times: nothing changed.
//!
//! A `MADV_DONTNEED` alone changes no content on a shared mapping (the
//! kernel keeps the marker and the page cache keeps the data), so it needs
//! nothing.
//!
//! What this cannot see:
//! - a page removed and then faulted in again by a *read* between two looks
//!   (data, hole, data again: its content went from the old bytes to zeros
//!   with no write and no hole at either look);
//! - anything on **hugetlbfs**: it does not implement `SEEK_HOLE` (the whole
//!   file is data), and on 6.18 `PAGEMAP_SCAN` reports no removed huge page
//!   at all, written before or not. A VMM on hugetlbfs must not discard
//!   guest pages (no balloon, no free-page reporting) during a migration.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::AsFd;

use guest_memory::GuestLayout;
use guest_memory::memfile::data_ranges;

/// Which pages of the memory file held data at the last look.
#[derive(Debug)]
pub struct RemovedPages {
    /// The memory file (a read-only descriptor; only its holes are looked at).
    file: File,
    /// Per global page: it held data at the last look.
    data: Vec<bool>,
    /// Scratch space for the next look.
    now: Vec<bool>,
}

impl RemovedPages {
    /// Nothing looked at yet: the first [`look`](Self::look) reports nothing.
    pub fn new(file: File, layout: &GuestLayout) -> Self {
        let pages = usize::try_from(layout.total_pages()).unwrap_or(usize::MAX);
        Self { file, data: vec![false; pages], now: vec![false; pages] }
    }

    /// Looks at the file's holes; reports each global page that held data at
    /// the last look and does not now. A region whose holes cannot be read
    /// has every page reported, and counts as all data from then on; the
    /// first such error is returned, with its region, after every region.
    pub fn look(&mut self, layout: &GuestLayout, mut on_removed: impl FnMut(u64)) -> Result<(), (u32, std::io::Error)> {
        let page_size = layout.page_size();
        let mut first_error = None;
        self.now.fill(false);
        for (index, region) in layout.regions().iter().enumerate() {
            let region_id = index as u32;
            let first = layout.region_first_page(region_id).unwrap_or(0) as usize;
            let pages = &mut self.now[first..first + (region.size / page_size) as usize];
            let (start, end) = (region.offset, region.offset + region.size);
            let result = data_ranges(self.file.as_fd(), start, end, |from, to| {
                pages[((from - start) / page_size) as usize..(to - start).div_ceil(page_size) as usize].fill(true);
            });
            if let Err(error) = result {
                pages.fill(true);
                for page in first..first + pages.len() {
                    on_removed(page as u64);
                }
                first_error.get_or_insert((region_id, error));
            }
        }
        for (page, (was, is)) in self.data.iter().zip(&self.now).enumerate() {
            if *was && !*is {
                on_removed(page as u64);
            }
        }
        std::mem::swap(&mut self.data, &mut self.now);
        first_error.map_or(Ok(()), Err)
    }
}
