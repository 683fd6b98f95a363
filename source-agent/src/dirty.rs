//! Dirty-page tracking with epochs.
//!
//! # How pages are found dirty
//!
//! The VMM registers its guest-memory mapping with userfaultfd in
//! write-protect mode with `UFFD_FEATURE_WP_ASYNC`: a write to a protected
//! page does not stop the vCPU, the kernel just clears the page's protection.
//! A *scan* is PAGEMAP_SCAN over every region on the VMM's `/proc/PID/pagemap`
//! (passed in the hand-off) with `PM_SCAN_WP_MATCHING`: it reports the pages
//! written since they were last protected (`PAGE_IS_WRITTEN`) and protects
//! them again, atomically, page by page. A scan covers only the pages the
//! memory file holds data for: the holes are never protected (that would
//! take page tables for all of the memory); a hole written since the last
//! scan holds data now, and the look at the file reports it
//! ([`DirtyTracker::scan_regions`]). The first scan, at the hand-off,
//! protects every page that holds data ([`DirtyTracker::start_tracking`]).
//!
//! Every scan also looks for pages *removed* from the memory file (a hole
//! punched, `MADV_REMOVE`, the file shrinking): their content changed
//! without a write, which write-protection does not report; they are dirty
//! at the scan's epoch too, and so is every page that holds data and did
//! not at the last look ([`crate::removed`]).
//!
//! # Epoch rules
//!
//! - Epochs count scans. The current epoch starts at 1. Every page that
//!   holds data when tracking starts (mapped by the VMM, or data in the
//!   memory file by `SEEK_DATA`) starts as "last dirty at epoch 1"; every
//!   hole as "epoch 0", dirty since nothing. So "since epoch 0" is every
//!   page that may hold data, and a page it leaves out is zeros (a hole
//!   nobody wrote since): a sparse 1 TiB guest with 4 GiB written sends its
//!   4 GiB, not 268 million zero pages. A target that holds content of its
//!   own for such a page must make it zeros. A memory file starts with
//!   every page at epoch 1.
//! - Each scan makes a new epoch E and records E as the last-dirty epoch of
//!   every page it reports. The new epoch is published (to `GetLayout`) only
//!   once the scan is complete.
//! - "Dirty since N" is every page whose last-dirty epoch is > N, after a
//!   fresh scan. Pages are never un-dirtied, so asking twice for "since N"
//!   returns the same pages or more, never fewer: a lost response loses no
//!   page. N may not be newer than the current epoch (a client holding such an
//!   epoch talks to a restarted agent, and must start over from 0).
//! - A scan that fails half-way has already re-protected some pages that the
//!   kernel did not get to report; every page from the failed position to the
//!   end of that region is therefore counted dirty at the new epoch.
//! - Only a scan that *started after the pause* is final: `paused` is read
//!   before scanning and reported with the result. Once one is complete,
//!   the memory cannot change until a resume: later scans return its epoch
//!   without scanning again.
//! - When the VMM pauses, the tracker scans at once (the "pause scan"), while
//!   the VMM's page tables still exist. If the VMM then goes away (its
//!   hand-off connection closes), its memory can no longer change: later scans
//!   find nothing new. If it goes away *without* such a scan (it died while
//!   running), the writes since the last scan are unknowable, so every page is
//!   counted dirty at a new epoch: the target fetches too much rather than
//!   keep a stale page. (PAGEMAP_SCAN on the pagemap of an exited process
//!   fails with ESRCH, so a pause scan that comes too late fails and does not
//!   count as one.)
//! - A memory file never changes: every page is dirty at epoch 1, nothing
//!   after, and the VM counts as paused.
//!
//! # Heat
//!
//! Every scan that finds a page dirty also counts one more for its *heat*
//! ([`crate::heat`]; one byte per page). The initial scan does not count
//! (it finds what was written before the migration), nor does the blanket
//! "every page dirty" of a VMM gone without a pause scan. Heat only orders
//! the target's pull: it never decides what is dirty.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use guest_memory::GuestLayout;
use guest_memory::page_tables::{ScanError, scan_written};
use guest_memory::sys::PageRegion;
use pageserver_metrics::LatencyHistogram;
use pageserver_proto::bitmap::DirtyRun;
use pageserver_proto::heat::HotSpan;

use crate::removed::RemovedPages;

/// Pages whose epochs [`DirtyTracker::collect_runs`] looks at at once.
const CLEAN_CHUNK: usize = 4096;
/// The blocks a scan covers whole around the pages that hold data.
const SCAN_ALIGN_BYTES: u64 = 2 << 20;
/// Regions one PAGEMAP_SCAN call may return before we call again.
const SCAN_BATCH_REGIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("epoch {since} is newer than this source's newest epoch {newest} (was the source agent restarted?)")]
    EpochTooNew { since: u64, newest: u64 },
    #[error("dirty scan of region {region}: {source}")]
    Scan {
        region: u32,
        #[source]
        source: ScanError,
    },
    #[error("looking for pages removed from region {region} of the memory file: {source}")]
    Holes {
        region: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the dirty epoch counter is exhausted")]
    EpochOverflow,
}

/// The pages dirty since some epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySnapshot {
    /// The epoch this snapshot brings the caller to.
    pub epoch: u64,
    /// Sorted, maximal runs.
    pub runs: Vec<DirtyRun>,
    pub dirty_pages: u64,
    /// The hottest of those pages, hottest first (if asked for).
    pub hot: Vec<HotSpan>,
}

#[derive(Debug)]
struct EpochState {
    epoch: u32,
    /// Per global page: the epoch at which it was last found dirty.
    last_dirty: Vec<u32>,
    /// Per global page: how many scans found it dirty, saturating.
    heat: Vec<u8>,
    scan_buf: Vec<PageRegion>,
    /// Pages removed from the memory file (`None` for a memory file).
    removed: Option<RemovedPages>,
    /// A complete scan started while the VM was paused, and it has not
    /// resumed since (or the memory can no longer change at all).
    settled: bool,
}

/// Dirty epochs of one VM's memory.
#[derive(Debug)]
pub struct DirtyTracker {
    layout: GuestLayout,
    /// The VMM's pagemap; `None` for a memory file, which never changes.
    pagemap: Option<OwnedFd>,
    state: Mutex<EpochState>,
    /// The newest epoch whose scan is complete (readable without the lock).
    newest_epoch: AtomicU64,
    paused: AtomicBool,
    /// The epoch of the first scan after the pause (0 while the VM runs):
    /// what a page read proves it was read from (see `pause_epoch`).
    pause_epoch: AtomicU64,
    vmm_gone: AtomicBool,
    /// How long each PAGEMAP_SCAN pass took, for metrics.
    scan_latency: LatencyHistogram,
}

impl DirtyTracker {
    fn new(layout: GuestLayout, tracked: Option<(OwnedFd, RemovedPages)>, paused: bool) -> Self {
        let pages = usize::try_from(layout.total_pages()).unwrap_or(usize::MAX);
        let (pagemap, removed) = match tracked {
            Some((pagemap, removed)) => (Some(pagemap), Some(removed)),
            None => (None, None),
        };
        // Holes start at epoch 0 (module docs), and the zeroed allocation
        // costs nothing until a page is marked: a sparse guest's holes never
        // are.
        let first_epoch = if pagemap.is_some() && !whole(&layout) { 0 } else { 1 };
        let state = EpochState {
            epoch: 1,
            last_dirty: vec![first_epoch; pages],
            heat: vec![0; pages],
            scan_buf: Vec::with_capacity(SCAN_BATCH_REGIONS),
            removed,
            settled: pagemap.is_none(),
        };
        Self {
            layout,
            pagemap,
            state: Mutex::new(state),
            newest_epoch: AtomicU64::new(1),
            paused: AtomicBool::new(paused),
            pause_epoch: AtomicU64::new(u64::from(paused)),
            vmm_gone: AtomicBool::new(false),
            scan_latency: LatencyHistogram::new(),
        }
    }

    /// A memory file: every page dirty at epoch 1, always paused.
    pub fn for_file(layout: GuestLayout) -> Self {
        Self::new(layout, None, true)
    }

    /// A running VMM's memory, scanned through its pagemap, and watched for
    /// pages removed from its memory file.
    pub fn for_vmm(layout: GuestLayout, pagemap: OwnedFd, removed: RemovedPages) -> Self {
        Self::new(layout, Some((pagemap, removed)), false)
    }

    /// The newest complete epoch.
    pub fn epoch(&self) -> u64 {
        self.newest_epoch.load(Ordering::Acquire)
    }

    /// Whether the VM is paused (or gone, or a file): its memory does not change.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// The pause epoch: the epoch of the first scan that started after the
    /// VM paused (or after its VMM left), 0 while it runs or before that
    /// scan has started (the pause scan publishes it as it starts; any other
    /// scan, when it is complete). A memory file is paused at epoch 1 for
    /// ever. While this stays the same, the memory does not change: a page
    /// read between two equal readings of it is the page's content at the
    /// pause, and the final bitmap it came with is exact for it.
    pub fn pause_epoch(&self) -> u64 {
        self.pause_epoch.load(Ordering::Acquire)
    }

    /// The duration of every scan so far.
    pub fn scan_latency(&self) -> &LatencyHistogram {
        &self.scan_latency
    }

    /// Whether the VMM closed its hand-off connection.
    pub fn is_vmm_gone(&self) -> bool {
        self.vmm_gone.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, EpochState> {
        // Page epochs only ever grow, so the state a panicking holder left
        // behind is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The initial scan: every page the memory file holds data for is new
    /// to the look, so dirty at epoch 1, and write-protected, so that the
    /// next scan reports only what changes from now on; the holes stay at
    /// epoch 0 (module docs), unprotected: a hole written later holds data
    /// at a later look, which reports it.
    pub fn start_tracking(&self) -> Result<(), DirtyError> {
        let mut state = self.lock();
        let epoch = state.epoch;
        self.scan_regions(&mut state, epoch, true).map(drop)
    }

    /// The VMM stopped its vCPUs: mark paused, then scan while its page
    /// tables still exist (see the module docs). Returns the new epoch.
    pub fn vm_paused(&self) -> Result<u64, DirtyError> {
        self.paused.store(true, Ordering::Release);
        let mut state = self.lock();
        // The pause scan's epoch fences the pause from the moment the scan
        // starts, not when it ends: the VM is stopped, so a page read from
        // now on is its content at the pause, and the final bitmap (which
        // needs the scan) waits for this lock. A guest fault on the target
        // is then served at once instead of waiting out the scan (tens of
        // milliseconds for a large guest).
        if self.pagemap.is_some()
            && !self.is_vmm_gone()
            && let Some(next) = state.epoch.checked_add(1)
        {
            let _ = self.pause_epoch.compare_exchange(0, u64::from(next), Ordering::AcqRel, Ordering::Acquire);
        }
        let scanned = self.scan_locked(&mut state);
        // A failed scan still made its epoch (counting what it could not
        // report as dirty), so it fences the pause as well as a good one.
        if self.is_paused() {
            let _ = self.pause_epoch.compare_exchange(0, u64::from(state.epoch), Ordering::AcqRel, Ordering::Acquire);
        }
        scanned
    }

    /// The VMM resumed its vCPUs: the memory changes again.
    pub fn vm_resumed(&self) {
        let mut state = self.lock();
        self.paused.store(false, Ordering::Release);
        self.pause_epoch.store(0, Ordering::Release);
        state.settled = self.is_vmm_gone();
    }

    /// The VMM closed its hand-off connection: its memory no longer changes.
    /// If no scan ran since it paused, every page becomes dirty (module docs).
    pub fn vmm_gone(&self) {
        let mut state = self.lock();
        if !state.settled {
            match state.epoch.checked_add(1) {
                Some(epoch) => {
                    state.epoch = epoch;
                    state.last_dirty.fill(epoch);
                    tracing::warn!(
                        epoch,
                        "the VMM went away without a scan after a pause: its writes since the last scan are \
                         unknown, so every page is dirty at epoch {epoch}"
                    );
                }
                None => tracing::error!("the dirty epoch counter is exhausted; cannot record the VMM's exit"),
            }
            state.settled = true;
        }
        self.vmm_gone.store(true, Ordering::Release);
        self.paused.store(true, Ordering::Release);
        self.newest_epoch.store(u64::from(state.epoch), Ordering::Release);
        let _ = self.pause_epoch.compare_exchange(0, u64::from(state.epoch), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Scans (a new epoch, unless this is a memory file), then returns every
    /// page dirty since `since`, and with `hot` the hottest of them.
    /// Blocking: run it off the async runtime.
    pub fn dirty_since(&self, since: u64, hot: bool) -> Result<DirtySnapshot, DirtyError> {
        let mut state = self.lock();
        let newest = u64::from(state.epoch);
        if since > newest {
            return Err(DirtyError::EpochTooNew { since, newest });
        }
        let epoch = self.scan_locked(&mut state)?;
        let (runs, dirty_pages) = self.collect_runs(&state, since);
        let hot = match hot {
            true => crate::heat::hottest(&self.layout, &state.last_dirty, &state.heat, since),
            false => Vec::new(),
        };
        Ok(DirtySnapshot { epoch, runs, dirty_pages, hot })
    }

    /// A scan at a new epoch; returns it. Memory files are never scanned.
    fn scan_locked(&self, state: &mut EpochState) -> Result<u64, DirtyError> {
        if self.pagemap.is_none() {
            return Ok(u64::from(state.epoch));
        }
        let paused_at_start = self.is_paused();
        if paused_at_start && state.settled {
            // A complete scan since the pause found everything there is:
            // the memory has not changed since (the final bitmap after the
            // pause scan answers at once instead of scanning again).
            return Ok(u64::from(state.epoch));
        }
        let epoch = state.epoch.checked_add(1).ok_or(DirtyError::EpochOverflow)?;
        state.epoch = epoch;
        let result = if self.is_vmm_gone() {
            // Nothing can change any more; the PTEs may already be torn down.
            Ok(0)
        } else {
            // A scan after the pause may give the final bitmap: its look
            // walks the file ([`crate::removed`]).
            self.scan_regions(state, epoch, paused_at_start)
        };
        self.newest_epoch.store(u64::from(epoch), Ordering::Release);
        match result {
            Ok(found) => {
                tracing::debug!(epoch, found, "dirty scan");
                if paused_at_start && self.is_paused() {
                    state.settled = true;
                }
                Ok(u64::from(epoch))
            }
            // The VMM left during the scan: what it wrote is accounted for by
            // `vmm_gone` (or by the pause scan before it).
            Err(e) if self.is_vmm_gone() => {
                tracing::debug!(error = %e, "dirty scan failed after the VMM went away");
                Ok(u64::from(epoch))
            }
            Err(e) => Err(e),
        }
    }

    /// One pass: the look at the memory file ([`crate::removed`]) first,
    /// recording every page removed from it, or holding data now and not at
    /// the last look, at `epoch`; then
    /// PAGEMAP_SCAN over the pages that hold data now, recording what it
    /// reports (and, after a failure, the rest of that range) at `epoch`.
    /// A `thorough` look walks the memory file's data too. Returns the
    /// number of pages found dirty.
    ///
    /// Only the data is scanned: on a write-protect-async mapping the kernel
    /// counts a page-table entry that maps nothing as written, and the scan
    /// protects it by installing a marker, which needs page tables: scanning
    /// a sparse 1 TiB guest whole would give its VMM 2 GiB of them. A hole
    /// needs no protection: a page that is a hole at this look and written
    /// after it holds data at a later look, which reports it.
    fn scan_regions(&self, state: &mut EpochState, epoch: u32, thorough: bool) -> Result<u64, DirtyError> {
        let Some(pagemap) = self.pagemap.as_ref() else { return Ok(0) };
        let started = Instant::now();
        let page_size = self.layout.page_size();
        let mut found = 0u64;
        let mut first_error = None;
        let EpochState { last_dirty, heat, scan_buf, removed, .. } = state;
        let total = self.layout.total_pages();
        // The first scan (epoch 1, at the hand-off) finds what the VM held
        // already, not what it dirtied: it adds no heat.
        let warm = |heat: &mut u8| {
            if epoch > 1 {
                crate::heat::warm(heat);
            }
        };
        let mut data = Vec::new();
        match removed.as_mut() {
            Some(removed) => {
                let looked = removed.look(&self.layout, pagemap.as_fd(), thorough, |page| {
                    if let Some(last) = last_dirty.get_mut(page as usize)
                        && *last != epoch
                    {
                        found += 1;
                        *last = epoch;
                        if let Some(heat) = heat.get_mut(page as usize) {
                            warm(heat);
                        }
                    }
                });
                if let Err((region, source)) = looked {
                    first_error.get_or_insert(DirtyError::Holes { region, source });
                }
                if whole(&self.layout) {
                    data.push((0, total));
                } else {
                    // Runs widened to whole 2 MiB blocks and merged: a dense
                    // guest's data is tens of thousands of short runs between
                    // holes, each an ioctl of its own otherwise. Scanning a
                    // hole is harmless, and a block with data has its page
                    // table.
                    let align = (SCAN_ALIGN_BYTES / page_size).max(1);
                    for run in removed.data_runs() {
                        let (first, end) = (run.start / align * align, run.end.next_multiple_of(align).min(total));
                        match data.last_mut() {
                            Some((_, last_end)) if first <= *last_end => *last_end = end.max(*last_end),
                            _ => data.push((first, end)),
                        }
                    }
                }
            }
            None => data.push((0, total)),
        }
        let removed = removed.as_ref();
        for (region_index, region) in self.layout.regions().iter().enumerate() {
            let region_id = region_index as u32;
            let first_page = self.layout.region_first_page(region_id).unwrap_or(0);
            let end_page = first_page + region.size / page_size;
            let base = region.base_host_virt_addr;
            let span = first_page as usize..end_page as usize;
            let (pages, heats) = (&mut last_dirty[span.clone()], &mut heat[span]);
            // `only_data`: leave out the pages that were holes at this look.
            // The kernel counts an empty entry as written (and the scan
            // covers the holes of whole 2 MiB blocks); such a page is zeros,
            // or it holds data at a later look, which reports it.
            let sparse = !whole(&self.layout);
            let held_data = |page: u64| !sparse || removed.is_none_or(|r| r.held_data(first_page + page));
            let mut mark = |from: u64, to: u64, only_data: bool| {
                let first = (from.max(base) - base) / page_size;
                let last = to.saturating_sub(base).div_ceil(page_size).min(pages.len() as u64);
                let mut marked = 0;
                for page in (first..last).filter(|&page| !only_data || held_data(page)) {
                    let index = page as usize;
                    // A page found twice by one scan is warmed once.
                    if pages[index] != epoch {
                        warm(&mut heats[index]);
                        pages[index] = epoch;
                    }
                    marked += 1;
                }
                marked
            };
            for &(first, end) in &data {
                let (first, end) = (first.max(first_page), end.min(end_page));
                if first >= end {
                    continue;
                }
                let (start, stop) = (base + (first - first_page) * page_size, base + (end - first_page) * page_size);
                if let Err(error) = scan_written(pagemap.as_fd(), start, stop, scan_buf, |from, to| {
                    found += mark(from.max(start), to.min(stop), true)
                }) {
                    // The failed call may have re-protected pages it did not
                    // report: count the rest of the range as dirty.
                    mark(error.at(), stop, false);
                    first_error.get_or_insert(DirtyError::Scan { region: region_id, source: error });
                }
            }
        }
        crate::metrics::record_duration(&self.scan_latency, started.elapsed());
        crate::metrics::observe_scan_pages(found);
        match first_error {
            Some(error) => Err(error),
            None => Ok(found),
        }
    }

    /// Maximal runs of pages whose last-dirty epoch is newer than `since`.
    fn collect_runs(&self, state: &EpochState, since: u64) -> (Vec<DirtyRun>, u64) {
        let mut runs = Vec::new();
        let mut total = 0u64;
        for region in 0..self.layout.regions().len() as u32 {
            let first_page = self.layout.region_first_page(region).unwrap_or(0) as usize;
            let count = self.layout.region_pages(region).unwrap_or(0) as usize;
            let mut open: Option<DirtyRun> = None;
            let pages = &state.last_dirty[first_page..first_page + count];
            for (chunk_index, chunk) in pages.chunks(CLEAN_CHUNK).enumerate() {
                // Whole chunks of clean pages (a sparse guest's holes) are
                // skipped at the speed of a vectorised maximum.
                if chunk.iter().copied().max().is_none_or(|newest| u64::from(newest) <= since) {
                    runs.extend(open.take());
                    continue;
                }
                Self::collect_chunk(
                    chunk,
                    chunk_index * CLEAN_CHUNK,
                    (region, since),
                    &mut open,
                    &mut runs,
                    &mut total,
                );
            }
            runs.extend(open);
        }
        (runs, total)
    }

    /// [`collect_runs`](Self::collect_runs) over one chunk of a region's
    /// pages, the first of which is page `first` of `region`.
    fn collect_chunk(
        chunk: &[u32],
        first: usize,
        (region, since): (u32, u64),
        open: &mut Option<DirtyRun>,
        runs: &mut Vec<DirtyRun>,
        total: &mut u64,
    ) {
        for (index, &last_dirty) in (first..).zip(chunk) {
            if u64::from(last_dirty) <= since {
                runs.extend(open.take());
                continue;
            }
            *total += 1;
            match open.as_mut() {
                Some(run) => run.len += 1,
                None => *open = Some(DirtyRun { region, first_index: index as u64, len: 1 }),
            }
        }
    }
}

/// Whether `layout` is tracked whole rather than by its data: huge pages
/// (hugetlbfs has no `SEEK_HOLE`, and its page tables are small), tracked
/// as before sparse guests were (every page dirty at epoch 1, every scan
/// over all of it, protected up front by `SourceMemory::from_handoff`).
fn whole(layout: &GuestLayout) -> bool {
    layout.page_size() > 4096
}
