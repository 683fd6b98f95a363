//! Pages removed from a VMM's memory file: the dirty pages that
//! write-protection does not see.
//!
//! Dirty tracking ([`crate::dirty`]) finds the pages the VMM *wrote* through
//! its mapping. A page whose file content goes away without a write
//! (`fallocate(PUNCH_HOLE)` on the memfd, `MADV_REMOVE` on the mapping, as a
//! VMM does for a ballooned or reported-free guest page; the file shrinking)
//! now reads as zeros, but `PAGEMAP_SCAN` does not report it as written
//! (Linux 6.18: on shmem the page's uffd-wp marker survives the hole punch,
//! so a page the VMM had not written since the last scan and then removed
//! is not reported; on hugetlbfs the punch drops the VMM's page-table entry
//! and its marker, and no removed huge page is reported at all). A target
//! holding the old content would keep a stale page. Without this module,
//! `tests/vmm_handoff.rs::pages_the_vmm_drops_after_a_round` and the demo's
//! `*_pages_the_source_vmm_discards_reach_the_target_as_zeros` fail on
//! exactly those pages.
//!
//! # How removals are seen
//!
//! The agent keeps its own read-only mapping of the memory file, and maps
//! into it each page that holds data (`MADV_POPULATE_READ`). Removing a page
//! from the file unmaps it from *every* mapping, this one included, and
//! nothing maps it here again until a later look. So a page mapped here at
//! the last look and not now was removed since: it is dirty at the new
//! epoch, even if it was faulted in again meanwhile (a read of a hole
//! allocates a zeroed page, which a look at the file's holes alone would
//! take for the old data). A page that was a hole and still is reads as
//! zeros both times: nothing changed.
//!
//! # Which pages a look maps in
//!
//! Every look maps in the pages the VMM maps and this mapping does not (the
//! VMM's own page tables, read with a plain `PAGEMAP_SCAN`: a hole gets
//! content by a write, which maps it in the VMM). A *thorough* look then
//! also maps in every data page of the file still unmapped here
//! (`SEEK_DATA`/`SEEK_HOLE`): a page the VMM wrote and then dropped from its
//! own page tables (`MADV_DONTNEED` on a shared mapping keeps the data) is
//! seen only that way. The walk of the file's data ranges costs 40-250 ms
//! per look of a 1 GiB guest with ~47 000 of them, so only these looks are
//! thorough: the first, any after a failed one, and every one the caller
//! asks for (the dirty tracker asks at every scan that started after the
//! pause, which may give the final bitmap: nothing may be missed there). A
//! page seen only by a thorough look is reported late, never lost: its
//! content is the VMM's at the pause, and the final bitmap names it. A
//! thorough look skips the walk when the file's allocated blocks are as
//! many as the pages mapped here (every page mapped here holds data, so
//! none is missing): the usual case at the pause, which makes the final
//! bitmap ~20 ms after the switchover for a 1 GiB guest instead of
//! 60-400 ms.
//!
//! Mapping a page in also maps its neighbours that the page cache holds
//! (the kernel's fault-around for read faults; a userfaultfd registered for
//! missing faults does not turn it off). A neighbour may have become data
//! after the walk above read the file's holes: it is mapped here without
//! being asked for. So what a look reports is every page mapped here at its
//! end (this mapping's page tables, read again) and not at the last look,
//! whoever mapped it. Reporting only the pages the look asked for lost
//! such a page for good (the next look found it mapped already, and a scan
//! records only what a look found): under CPU load, about one demo
//! migration in four ended with one wrong page, a page the guest had
//! written once, from a hole, during pre-copy.
//!
//! Dirty tracking write-protects only the pages that hold data
//! ([`crate::dirty`]), so the look is also how a hole that the VMM wrote is
//! seen: it reports every page mapped here that was not mapped at the last
//! look.
//!
//! A `MADV_DONTNEED` by the VMM changes no content on a shared mapping (the
//! page cache keeps the data, only the VMM's page-table entry goes), leaves
//! this mapping alone, and is not reported.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

use guest_memory::memfile::data_ranges;
use guest_memory::page_tables::scan_present;
use guest_memory::sys::PageRegion;
use guest_memory::{GuestLayout, MemoryMap, UffdError, Userfaultfd};

use crate::page_runs::PageRuns;

/// `MADV_POPULATE_READ` met a hole (the guard's SIGBUS).
const EFAULT: i32 = rustix::io::Errno::FAULT.raw_os_error();
/// Ranges one PAGEMAP_SCAN call of a look may return before it calls again
/// (a dense 1 GiB guest's data is ~47 000 runs between holes: 12 calls per
/// reading of a mapping's page tables, not 180; 96 KiB of buffer).
const SCAN_BATCH_REGIONS: usize = 4096;

/// Why removed pages cannot be watched (the hand-off is refused: a VM whose
/// removed pages go unseen could hand a target stale pages).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("mapping region {region} of the memory file read-only: {source}")]
    Map {
        region: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "guarding the holes of region {region} with a userfaultfd (the handed-off memory descriptor must be \
         open read-write): {source}"
    )]
    Guard {
        region: u32,
        #[source]
        source: UffdError,
    },
    #[error("opening /proc/self/pagemap: {0}")]
    Pagemap(#[source] io::Error),
}

/// Which pages of the memory file held data at the last look.
#[derive(Debug)]
pub struct RemovedPages {
    /// A read-only descriptor of the memory file, for `SEEK_DATA` (which
    /// moves its position: nothing else may rely on that position).
    file: File,
    /// One read-only, unreserved mapping per region of the layout.
    maps: Vec<MemoryMap>,
    /// This process's pagemap: which pages of `maps` are mapped.
    pagemap: File,
    /// One per region, registered over its map; never read. Declared after
    /// `maps`, so the mappings go first.
    _guards: Vec<Userfaultfd>,
    scan_buf: Vec<PageRegion>,
    /// The global pages mapped here at the end of the last look.
    data: PageRuns,
    /// The next look walks the file whatever its caller asks: nothing was
    /// looked at yet, or the last look failed.
    walk_file_next: bool,
}

impl RemovedPages {
    /// Watches the memory file of `layout`: `handed_off` is the descriptor
    /// the VMM handed over, `file` a read-only one for `SEEK_DATA`.
    /// The guarded mappings are made from `handed_off`, which must be open
    /// for writing (the kernel registers a userfaultfd only over a mapping
    /// that could be made writable); they are read-only, and nothing keeps
    /// the writable descriptor. Nothing looked at yet: the first
    /// [`look`](Self::look) reports every page that holds data.
    pub fn watch(handed_off: BorrowedFd<'_>, file: File, layout: &GuestLayout) -> Result<Self, WatchError> {
        let (mut maps, mut guards) = (Vec::new(), Vec::new());
        for (index, r) in layout.regions().iter().enumerate() {
            let region = index as u32;
            let map = MemoryMap::map_read_only_unreserved(handed_off, r.offset, r.size as usize)
                .map_err(|source| WatchError::Map { region, source })?;
            let guard = Userfaultfd::guarding_holes(map.addr(), r.size, r.page_size)
                .map_err(|source| WatchError::Guard { region, source })?;
            maps.push(map);
            guards.push(guard);
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(WatchError::Pagemap)?;
        Ok(Self {
            file,
            maps,
            pagemap,
            _guards: guards,
            scan_buf: Vec::with_capacity(SCAN_BATCH_REGIONS),
            data: PageRuns::default(),
            walk_file_next: true,
        })
    }

    /// One look; see the module docs. Reports each global page whose
    /// content may have changed since the last look: mapped here then and
    /// not now (removed), or mapped here now, by this look or otherwise, and
    /// not then (it holds data it did not hold; the first look reports every
    /// page that holds data).
    /// The pages mapped in are those the VMM maps (`vmm_pagemap`, its
    /// `/proc/PID/pagemap`) and this mapping does not, then, if `thorough`
    /// (or the watch's first look, or the last look failed), every data page
    /// of the file still unmapped here. A region that cannot be
    /// looked at has every page reported, and counts as all data (so each
    /// of its pages not mapped at the next look is
    /// reported again); the first such error is returned, with its region,
    /// after every region.
    pub fn look(
        &mut self,
        layout: &GuestLayout,
        vmm_pagemap: BorrowedFd<'_>,
        thorough: bool,
        mut on_changed: impl FnMut(u64),
    ) -> Result<(), (u32, io::Error)> {
        let walk_file = thorough || std::mem::take(&mut self.walk_file_next);
        let page_size = layout.page_size();
        let mut failed = Vec::new();
        // Global page runs mapped here now, from this mapping's page tables.
        let now = self.mapped_here(layout, &mut failed);
        let now_mapped = PageRuns::from_unsorted(now.clone());
        // Before mapping anything in: a page removed and faulted in again
        // since the last look is removed all the same.
        self.data.minus(&now_mapped, |gone| gone.for_each(&mut on_changed));
        let mut mapped_in = Vec::new();
        for (index, region) in layout.regions().iter().enumerate() {
            if failed.iter().any(|(failed, _)| *failed == index as u32) {
                continue;
            }
            let first = layout.region_first_page(index as u32).unwrap_or(0);
            let vmm_base = region.base_host_virt_addr;
            let mut wanted = Vec::new();
            let looked = scan_present(vmm_pagemap, vmm_base, vmm_base + region.size, &mut self.scan_buf, |from, to| {
                wanted.push(pages_of(first, vmm_base, region.size, page_size, from, to))
            })
            .map_err(io::Error::other)
            .and_then(|()| self.map_in(index, first, page_size, &now_mapped, &wanted, &mut mapped_in));
            if let Err(error) = looked {
                failed.push((index as u32, error));
            }
        }
        // Mapped here now (after the VMM's pages, and what fault-around
        // mapped with them).
        let here = PageRuns::from_unsorted(self.mapped_here(layout, &mut failed));
        let shortcut = walk_file && failed.is_empty() && self.all_data_mapped(&here, page_size);
        let walked = walk_file && !shortcut;
        if shortcut {
            tracing::trace!("every page of the memory file that holds data is mapped here: no walk");
        } else if walked {
            for (index, region) in layout.regions().iter().enumerate() {
                if failed.iter().any(|(failed, _)| *failed == index as u32) {
                    continue;
                }
                let first = layout.region_first_page(index as u32).unwrap_or(0);
                let (start, end) = (region.offset, region.offset + region.size);
                let mut wanted = Vec::new();
                let looked = data_ranges(self.file.as_fd(), start, end, |from, to| {
                    wanted.push(first + (from - start) / page_size..first + (to - start).div_ceil(page_size))
                });
                let looked = looked.and_then(|()| self.map_in(index, first, page_size, &here, &wanted, &mut mapped_in));
                if let Err(error) = looked {
                    failed.push((index as u32, error));
                }
            }
        }
        // This mapping's page tables again after a walk (`here` is read
        // after the VMM's pages were mapped in): mapping a page in also maps
        // its neighbours that the page cache holds (the kernel's
        // fault-around), among them pages that became data after the walk
        // looked at the file. Every page mapped here now and not at the last
        // look is reported, whoever mapped it: one left out would be mapped
        // at the next look already, never reported, and lost (a scan records
        // only the pages a look found; see `crate::dirty`).
        let after = if walked { self.mapped_here(layout, &mut failed) } else { Vec::new() };
        let mut mapped = now;
        mapped.extend(here.runs().iter().cloned());
        mapped.extend(after);
        mapped.extend(mapped_in);
        let mapped = PageRuns::from_unsorted(mapped);
        mapped.minus(&self.data, |new| new.for_each(&mut on_changed));
        let mut data = mapped.runs().to_vec();
        let mut first_error = None;
        for (region, error) in failed {
            let first = layout.region_first_page(region).unwrap_or(0);
            let pages = first..first + layout.region_pages(region).unwrap_or(0);
            data.push(pages.clone());
            pages.for_each(&mut on_changed);
            first_error.get_or_insert((region, error));
        }
        self.data = PageRuns::from_unsorted(data);
        self.walk_file_next = first_error.is_some();
        first_error.map_or(Ok(()), Err)
    }

    /// Whether the pages mapped here (`mapped`) are as many as the memory
    /// file holds (its allocated blocks): every page mapped here holds data
    /// (the guard never lets a hole be mapped), so then no data page is
    /// left to map in, and the walk of the file's data ranges can be saved.
    /// Exact once the VM is paused (nothing changes any more); while it
    /// runs, a page that became data between the two readings is seen at a
    /// later look (a thorough one at the latest), never lost. A file with
    /// data outside the regions, or a file system that counts blocks
    /// otherwise, only ever holds more blocks: then the walk is made.
    fn all_data_mapped(&self, mapped: &PageRuns, page_size: u64) -> bool {
        let Ok(stat) = rustix::fs::fstat(&self.file) else { return false };
        let mapped_pages: u64 = mapped.runs().iter().map(|r| r.end - r.start).sum();
        u64::try_from(stat.st_blocks).is_ok_and(|blocks| blocks.saturating_mul(512) == mapped_pages * page_size)
    }

    /// The global page runs mapped here now, read from this mapping's page
    /// tables; a region that cannot be read is added to `failed`.
    fn mapped_here(&mut self, layout: &GuestLayout, failed: &mut Vec<(u32, io::Error)>) -> Vec<Range<u64>> {
        let page_size = layout.page_size();
        let mut mapped = Vec::new();
        for (index, region) in layout.regions().iter().enumerate() {
            let first = layout.region_first_page(index as u32).unwrap_or(0);
            let base = self.maps[index].addr();
            let present = |from: u64, to: u64| mapped.push(pages_of(first, base, region.size, page_size, from, to));
            if let Err(error) =
                scan_present(self.pagemap.as_fd(), base, base + region.size, &mut self.scan_buf, present)
            {
                failed.push((index as u32, io::Error::other(error)));
            }
        }
        mapped
    }

    /// The global page runs mapped here at the end of the last look: the
    /// pages that held data then (every page of a region that could not be
    /// looked at).
    pub fn data_runs(&self) -> &[Range<u64>] {
        self.data.runs()
    }

    /// Whether global `page` was mapped here at the end of the last look.
    pub fn held_data(&self, page: u64) -> bool {
        self.data.contains(page)
    }

    /// Maps into region `index`'s mapping (its first global page `first`)
    /// the pages of `wanted` (global runs) that `mapped` does not hold,
    /// adding the runs it mapped to `mapped_in`.
    fn map_in(
        &self,
        index: usize,
        first: u64,
        page_size: u64,
        mapped: &PageRuns,
        wanted: &[Range<u64>],
        mapped_in: &mut Vec<Range<u64>>,
    ) -> io::Result<()> {
        let mut result = Ok(());
        for range in wanted {
            mapped.gaps_in(range.clone(), |gap| {
                if result.is_ok() {
                    result = map_unmapped(&self.maps[index], page_size, gap.start - first..gap.end - first, |run| {
                        mapped_in.push(first + run.start..first + run.end)
                    });
                }
            });
        }
        result
    }
}

/// The global page run `first..` of a region of `size` bytes mapped at
/// `base` that the address range [`from`, `to`) covers.
fn pages_of(first: u64, base: u64, size: u64, page_size: u64, from: u64, to: u64) -> Range<u64> {
    first + (from.max(base) - base) / page_size..first + (to.min(base + size) - base).div_ceil(page_size)
}

/// Maps into `map` every page of `pages` (region-local page numbers, none
/// mapped yet), reporting each run it mapped to `on_mapped`; a page that
/// turns out to be a hole stays unmapped (and unfilled).
fn map_unmapped(
    map: &MemoryMap,
    page_size: u64,
    pages: Range<u64>,
    mut on_mapped: impl FnMut(Range<u64>),
) -> io::Result<()> {
    let populate = |range: &Range<u64>| {
        map.populate_read((range.start * page_size) as usize, ((range.end - range.start) * page_size) as usize)
    };
    // One call for the whole run; page by page once it meets a hole.
    match populate(&pages) {
        Ok(()) => on_mapped(pages),
        Err(e) if e.raw_os_error() == Some(EFAULT) => {
            for page in pages {
                match populate(&(page..page + 1)) {
                    Ok(()) => on_mapped(page..page + 1),
                    Err(e) if e.raw_os_error() == Some(EFAULT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
