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
//! The first look of a region maps in every page the file holds data for
//! (`SEEK_DATA`/`SEEK_HOLE` over the whole file). Later looks map in only
//! the pages the dirty scan just found *written*: a hole gets content only
//! by a write, which that scan reports, and a page read back in after a
//! removal holds zeros, as the hole did, until a write (reported then). So
//! an unmapped page that nobody wrote is a hole as far as content goes,
//! and its removal would change nothing. Walking the file's holes at every
//! look instead cost 40-250 ms per scan for a 1 GiB guest with ~47 000 data
//! ranges (one `lseek` pair each), most of the pause scan's time. A region
//! whose look failed gets a whole-file look again next time.
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
    /// The global pages mapped here at the end of the last look.
    data: PageRuns,
    /// Per region: the next look maps in every data page of the file, not
    /// only the pages just written (the first look, and after a failure).
    whole_file: Vec<bool>,
}

impl RemovedPages {
    /// Watches the memory file of `layout`: `handed_off` is the descriptor
    /// the VMM handed over, `file` a read-only one for `SEEK_DATA`.
    /// The guarded mappings are made from `handed_off`, which must be open
    /// for writing (the kernel registers a userfaultfd only over a mapping
    /// that could be made writable); they are read-only, and nothing keeps
    /// the writable descriptor. Nothing looked at yet: the first
    /// [`look`](Self::look) reports nothing.
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
            whole_file: vec![true; layout.regions().len()],
        })
    }

    /// Reports each global page mapped here at the last look and not now
    /// (removed since), then maps in the pages that hold data: all of them
    /// at a region's first look, afterwards those among `written` (global
    /// page ranges the dirty scan just reported; see the module docs). A
    /// region that cannot be looked at has every page reported, and counts
    /// as all data (so each of its pages not mapped at the next look, a
    /// whole-file one, is reported again); the first such error is returned,
    /// with its region, after every region.
    pub fn look(
        &mut self,
        layout: &GuestLayout,
        written: &[Range<u64>],
        mut on_removed: impl FnMut(u64),
    ) -> Result<(), (u32, io::Error)> {
        let page_size = layout.page_size();
        let mut failed = Vec::new();
        // Global page runs mapped here now, from the page tables.
        let mut now = Vec::new();
        for (index, region) in layout.regions().iter().enumerate() {
            let first = layout.region_first_page(index as u32).unwrap_or(0);
            let base = self.maps[index].addr();
            let end = base + region.size;
            let present = |from: u64, to: u64| {
                now.push(first + (from.max(base) - base) / page_size..first + (to.min(end) - base).div_ceil(page_size))
            };
            if let Err(error) = scan_present(self.pagemap.as_fd(), base, end, &mut self.scan_buf, present) {
                failed.push((index as u32, io::Error::other(error)));
            }
        }
        let now_mapped = PageRuns::from_unsorted(now.clone());
        self.data.minus(&now_mapped, |gone| gone.for_each(&mut on_removed));
        for (index, region) in layout.regions().iter().enumerate() {
            if failed.iter().any(|(failed, _)| *failed == index as u32) {
                continue;
            }
            let first = layout.region_first_page(index as u32).unwrap_or(0);
            let pages = first..first + region.size / page_size;
            // Maps in the pages of `wanted` (global) not mapped yet.
            let map = &self.maps[index];
            let mut map_in = |wanted: Range<u64>| {
                let mut result = Ok(());
                now_mapped.gaps_in(wanted, |gap| {
                    if result.is_ok() {
                        result = map_unmapped(map, page_size, gap.start - first..gap.end - first, |mapped| {
                            now.push(first + mapped.start..first + mapped.end)
                        });
                    }
                });
                result
            };
            let looked = if self.whole_file[index] {
                let mut populated = Ok(());
                let (start, end) = (region.offset, region.offset + region.size);
                let looked = data_ranges(self.file.as_fd(), start, end, |from, to| {
                    if populated.is_ok() {
                        populated =
                            map_in(first + (from - start) / page_size..first + (to - start).div_ceil(page_size));
                    }
                });
                looked.and(populated)
            } else {
                written
                    .iter()
                    .map(|w| w.start.max(pages.start)..w.end.min(pages.end))
                    .filter(|w| w.start < w.end)
                    .try_for_each(&mut map_in)
            };
            match looked {
                Ok(()) => self.whole_file[index] = false,
                Err(error) => failed.push((index as u32, error)),
            }
        }
        let mut first_error = None;
        for (region, error) in failed {
            let first = layout.region_first_page(region).unwrap_or(0);
            let pages = first..first + layout.region_pages(region).unwrap_or(0);
            self.whole_file[region as usize] = true;
            now.push(pages.clone());
            pages.for_each(&mut on_removed);
            first_error.get_or_insert((region, error));
        }
        self.data = PageRuns::from_unsorted(now);
        first_error.map_or(Ok(()), Err)
    }
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
