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
//! The agent keeps its own read-only mapping of the memory file, and at
//! every look maps into it each page that holds data (`MADV_POPULATE_READ`
//! over the file's data ranges, `SEEK_DATA`). Removing a page from the file
//! unmaps it from *every* mapping, this one included, and nothing maps it
//! here again until the next look. So a page mapped here at the last look
//! and not now was removed since: it is dirty at the new epoch, even if it
//! was faulted in again meanwhile (a read of a hole allocates a zeroed page,
//! which a look at the file's holes alone would take for the old data). A
//! page that was a hole and still is reads as zeros both times: nothing
//! changed.
//!
//! The mapping must never fill a hole itself: a userfaultfd registered over
//! it for missing faults with `UFFD_FEATURE_SIGBUS`
//! ([`Userfaultfd::guarding_holes`]) makes populating a hole fail instead
//! (a page that became a hole since `SEEK_DATA` looked), and the mapping is
//! `MAP_NORESERVE`, so on hugetlbfs (which has no `SEEK_HOLE`: the whole file
//! is data, every page is tried) it takes nothing from the VMM's huge-page
//! reservation. Its cost: the page tables of a mapping of the guest's
//! memory (2 MiB per GiB of 4 KiB pages, next to nothing for huge pages).
//!
//! The same look also reports every page mapped now and not at the last
//! look: a page that holds data it did not hold then. Dirty tracking
//! write-protects only the pages that hold data ([`crate::dirty`]), so this
//! is how a hole that the VMM wrote is seen, even if the VMM's page-table
//! entry for it went away again before the scan.
//!
//! A `MADV_DONTNEED` by the VMM changes no content on a shared mapping (the
//! page cache keeps the data, only the VMM's page-table entry goes), leaves
//! this mapping alone, and is not reported.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use guest_memory::memfile::data_ranges;
use guest_memory::page_tables::scan_present;
use guest_memory::sys::PageRegion;
use guest_memory::{GuestLayout, MemoryMap, UffdError, Userfaultfd};

/// `MADV_POPULATE_READ` met a hole (the guard's SIGBUS).
const EFAULT: i32 = rustix::io::Errno::FAULT.raw_os_error();
/// Ranges one PAGEMAP_SCAN call of a look may return before it calls again.
const SCAN_BATCH_REGIONS: usize = 256;

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
    /// Per global page: it was mapped here at the end of the last look.
    data: Vec<bool>,
    /// Scratch space for the next look.
    now: Vec<bool>,
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
        let pages = usize::try_from(layout.total_pages()).unwrap_or(usize::MAX);
        Ok(Self {
            file,
            maps,
            pagemap,
            _guards: guards,
            scan_buf: Vec::with_capacity(SCAN_BATCH_REGIONS),
            data: vec![false; pages],
            now: vec![false; pages],
        })
    }

    /// Reports each global page mapped here at the last look and not now
    /// (removed since), then maps in every page that holds data and reports
    /// each one not mapped at the last look (it holds data it did not hold:
    /// written since, perhaps through a page-table entry of the VMM's that
    /// is gone again; the first look reports every page that holds data). A region that cannot be
    /// looked at has every page reported, and counts as all data (so each of
    /// its pages not mapped at the next look is reported again); the first
    /// such error is returned, with its region, after every region.
    pub fn look(&mut self, layout: &GuestLayout, mut on_changed: impl FnMut(u64)) -> Result<(), (u32, io::Error)> {
        let page_size = layout.page_size();
        let mut failed = Vec::new();
        self.now.fill(false);
        for (index, region) in layout.regions().iter().enumerate() {
            let (first, pages) = region_pages(layout, index, &mut self.now);
            let base = self.maps[index].addr();
            let end = base + region.size;
            let mark = |from: u64, to: u64| {
                pages[((from.max(base) - base) / page_size) as usize
                    ..((to.min(end) - base).div_ceil(page_size)) as usize]
                    .fill(true);
            };
            if let Err(error) = scan_present(self.pagemap.as_fd(), base, end, &mut self.scan_buf, mark) {
                failed.push((index as u32, first, pages.len(), io::Error::other(error)));
            }
        }
        // Before mapping anything in: a page removed and faulted in again
        // since the last look is removed all the same.
        changed_pages(&self.data, &self.now, |was, is| was && !is, &mut on_changed);
        for (index, region) in layout.regions().iter().enumerate() {
            if failed.iter().any(|(failed, ..)| *failed == index as u32) {
                continue;
            }
            let (first, pages) = region_pages(layout, index, &mut self.now);
            let map = &self.maps[index];
            let mut populated = Ok(());
            let (start, end) = (region.offset, region.offset + region.size);
            let looked = data_ranges(self.file.as_fd(), start, end, |from, to| {
                let from = ((from - start) / page_size) as usize;
                let to = (to - start).div_ceil(page_size) as usize;
                if populated.is_ok() {
                    populated = map_unmapped(map, page_size, from, &mut pages[from..to]);
                }
            });
            if let Err(error) = looked.and(populated) {
                failed.push((index as u32, first, pages.len(), error));
            }
        }
        let mut first_error = None;
        for (_, first, len, _) in &failed {
            self.now[*first..*first + *len].fill(true);
        }
        changed_pages(&self.data, &self.now, |was, is| !was && is, &mut on_changed);
        for (region, first, len, error) in failed {
            for page in first..first + len {
                on_changed(page as u64);
            }
            first_error.get_or_insert((region, error));
        }
        std::mem::swap(&mut self.data, &mut self.now);
        first_error.map_or(Ok(()), Err)
    }
}

impl RemovedPages {
    /// Whether global `page` was mapped here at the end of the last look
    /// (it held data then).
    pub fn held_data(&self, page: usize) -> bool {
        self.data.get(page).copied().unwrap_or(true)
    }

    /// Reports each run [first, end) of global pages mapped here at the end
    /// of the last look: the pages that held data then (every page of a
    /// region that could not be looked at).
    pub fn data_runs(&self, mut on_run: impl FnMut(usize, usize)) {
        let mut open = None;
        for (index, chunk) in self.data.chunks(CHUNK).enumerate() {
            // Whole chunks of holes (most of a sparse guest) at memcmp speed.
            if open.is_none() && chunk == &NO_PAGES[..chunk.len()] {
                continue;
            }
            for (page, &mapped) in (index * CHUNK..).zip(chunk) {
                match (mapped, open) {
                    (true, None) => open = Some(page),
                    (false, Some(start)) => {
                        on_run(start, page);
                        open = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(start) = open {
            on_run(start, self.data.len());
        }
    }
}

/// Pages per chunk when whole chunks are compared at once.
const CHUNK: usize = 4096;
const NO_PAGES: [bool; CHUNK] = [false; CHUNK];

/// Reports each page for which `changed(was, is)` holds; chunks that did not
/// change at all are skipped at memcmp speed (a 1 TiB guest has 268 million
/// pages, nearly all of them unchanged holes).
fn changed_pages(was: &[bool], is: &[bool], changed: impl Fn(bool, bool) -> bool, on_page: &mut impl FnMut(u64)) {
    for (index, (was, is)) in was.chunks(CHUNK).zip(is.chunks(CHUNK)).enumerate() {
        if was == is {
            continue;
        }
        for (page, (&was, &is)) in (index * CHUNK..).zip(was.iter().zip(is)) {
            if changed(was, is) {
                on_page(page as u64);
            }
        }
    }
}

/// Region `index`'s first global page, and its slice of `pages`.
fn region_pages<'a>(layout: &GuestLayout, index: usize, pages: &'a mut [bool]) -> (usize, &'a mut [bool]) {
    let region = &layout.regions()[index];
    let first = layout.region_first_page(index as u32).unwrap_or(0) as usize;
    (first, &mut pages[first..first + (region.size / layout.page_size()) as usize])
}

/// Maps into `map` every page of `pages` (its pages from `offset_page` on)
/// not marked mapped, and marks it; a page that turns out to be a hole stays
/// unmarked (and unfilled).
fn map_unmapped(map: &MemoryMap, page_size: u64, offset_page: usize, pages: &mut [bool]) -> io::Result<()> {
    let page_len = page_size as usize;
    let populate = |page: usize, count: usize| map.populate_read((offset_page + page) * page_len, count * page_len);
    let mut page = 0;
    while page < pages.len() {
        let run = pages[page..].iter().take_while(|mapped| !**mapped).count();
        if run == 0 {
            page += 1;
            continue;
        }
        // One call for the whole run; page by page once it meets a hole.
        match populate(page, run) {
            Ok(()) => pages[page..page + run].fill(true),
            Err(e) if e.raw_os_error() == Some(EFAULT) => {
                for (one, mapped) in pages[page..page + run].iter_mut().enumerate() {
                    match populate(page + one, 1) {
                        Ok(()) => *mapped = true,
                        Err(e) if e.raw_os_error() == Some(EFAULT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        page += run;
    }
    Ok(())
}
