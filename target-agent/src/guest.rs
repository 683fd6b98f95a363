//! The target VM's memory as the agent holds it: its own read-write mapping
//! of the guest-memory file, the VMM's userfaultfd, and the page states.
//!
//! Everything that makes a page visible to the guest goes through here:
//! [`GuestMemory::install_fetched`] (content just fetched from the paused
//! source), [`GuestMemory::install_fresh`] (a page known fresh, on a fault)
//! and [`GuestMemory::bulk_install`] (all fresh pages, once the final bitmap
//! is in). Writing goes through the agent's unregistered mapping, then
//! UFFDIO_CONTINUE maps the page-cache page into the VMM and wakes the
//! faulting threads.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::handoff::Handoff;
use guest_memory::sys::{self, MemoryMap, UffdError, Userfaultfd};
use guest_memory::{GuestLayout, layout::LayoutError};

use crate::page_state::{PageState, PageStates};
use crate::stats::{FaultKind, TargetStats};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("mapping region {region} of the guest-memory file: {source}")]
    Map {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("page {page}: {source}")]
    Uffd {
        page: u64,
        #[source]
        source: UffdError,
    },
    #[error("emptying region {region} of the target's memory file: {source}")]
    Empty {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("allocating page {page} in the target's memory file: {source}")]
    Allocate {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("reply names a page outside the layout: {0}")]
    BadPage(#[from] LayoutError),
    #[error("page {page}: got {got} bytes, expected {expected}")]
    BadLength { page: u64, got: usize, expected: u64 },
    #[error("page {page} arrived but is {state:?}, not claimed for fetching")]
    NotClaimed { page: u64, state: PageState },
}

/// Largest range one bulk UFFDIO_CONTINUE maps.
const BULK_CHUNK_BYTES: u64 = 32 << 20;

/// Who fetched a page after switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOrigin {
    Demand,
    Background,
}

#[derive(Debug)]
pub struct GuestMemory {
    pub layout: GuestLayout,
    maps: Vec<MemoryMap>,
    memory: std::os::fd::OwnedFd,
    pub uffd: Userfaultfd,
    pub states: PageStates,
    /// Per page: when the oldest fault still waiting on it was read (0: none).
    fault_started_ns: Vec<AtomicU64>,
    pub stats: Arc<TargetStats>,
}

impl GuestMemory {
    pub fn new(handoff: Handoff, stats: Arc<TargetStats>) -> Result<Self, InstallError> {
        let layout = handoff.layout;
        let mut maps = Vec::with_capacity(layout.regions().len());
        for (i, r) in layout.regions().iter().enumerate() {
            // Start from an empty file: the page states say every page is a
            // hole until pre-copy writes it, and a page left over from an
            // earlier use of the file must never be mapped as if fresh.
            sys::punch_hole(handoff.memory.as_fd(), r.offset, r.size)
                .map_err(|source| InstallError::Empty { region: i, source })?;
            let map = MemoryMap::map(handoff.memory.as_fd(), r.offset, r.size as usize, true)
                .map_err(|source| InstallError::Map { region: i, source })?;
            maps.push(map);
        }
        let pages = layout.total_pages();
        Ok(Self {
            states: PageStates::new(pages),
            fault_started_ns: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            layout,
            maps,
            memory: handoff.memory,
            uffd: handoff.uffd,
            stats,
        })
    }

    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    fn locate(&self, page: u64) -> (&MemoryMap, usize) {
        let (region, index) = self.layout.locate(page);
        (&self.maps[region as usize], (index * self.layout.page_size()) as usize)
    }

    fn check_len(&self, page: u64, data: &[u8]) -> Result<(), InstallError> {
        if data.len() as u64 != self.page_size() {
            return Err(InstallError::BadLength { page, got: data.len(), expected: self.page_size() });
        }
        Ok(())
    }

    /// Pre-copy: stores a page's content in the target's file. Zero pages
    /// stay holes unless an older copy is there to overwrite.
    pub fn store_precopy(&self, page: u64, zero: bool, data: &[u8]) -> Result<(), InstallError> {
        let (map, off) = self.locate(page);
        if zero {
            if self.states.get(page).present {
                map.fill_zero(off, self.page_size() as usize);
            }
        } else {
            self.check_len(page, data)?;
            map.copy_in(off, data);
            self.states.set_present(page);
        }
        Ok(())
    }

    /// Maps one page into the VMM and wakes its waiters. An EEXIST means it
    /// is mapped already (a race with another installer): wake and move on.
    fn continue_page(&self, page: u64) -> Result<(), InstallError> {
        let addr = self.layout.host_addr(page);
        let len = self.page_size();
        loop {
            match self.uffd.continue_range(addr, len, true) {
                Ok(n) if n == len => return Ok(()),
                Ok(_) | Err(UffdError::Again { .. }) => std::thread::yield_now(),
                Err(UffdError::Exists { .. }) => {
                    return self.uffd.wake(addr, len).map_err(|source| InstallError::Uffd { page, source });
                }
                Err(source) => return Err(InstallError::Uffd { page, source }),
            }
        }
    }

    /// Notes that a fault on `page` is waiting (for a fetch under way).
    pub fn note_waiting_fault(&self, page: u64, started_ns: u64) {
        let _ =
            self.fault_started_ns[page as usize].compare_exchange(0, started_ns, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Installs a page just fetched from the paused source: `page` must be
    /// claimed (`Fetching*`). Writes it through our mapping, continues it,
    /// marks it installed and settles the faults waiting on it.
    pub fn install_fetched(&self, page: u64, zero: bool, data: &[u8], origin: FetchOrigin) -> Result<(), InstallError> {
        let claimed_from = match self.states.state(page) {
            s @ (PageState::FetchingUnknown | PageState::FetchingStale) => s,
            state => return Err(InstallError::NotClaimed { page, state }),
        };
        let (map, off) = self.locate(page);
        if zero {
            // Writing allocates the page if it is a hole, so CONTINUE can map it.
            map.fill_zero(off, self.page_size() as usize);
        } else {
            self.check_len(page, data)?;
            map.copy_in(off, data);
        }
        self.states.set_present(page);
        self.continue_page(page)?;
        self.states.transition(page, claimed_from, PageState::Installed);
        let stats = &self.stats;
        if self.states.mark_fetched(page) {
            stats.pages_fetched_twice.fetch_add(1, Ordering::Relaxed);
        }
        match origin {
            FetchOrigin::Demand => stats.pages_fetched_on_demand.fetch_add(1, Ordering::Relaxed),
            FetchOrigin::Background => stats.pages_fetched_background.fetch_add(1, Ordering::Relaxed),
        };
        if claimed_from == PageState::FetchingUnknown {
            stats.pages_fetched_unknown.fetch_add(1, Ordering::Relaxed);
        }
        stats.bytes_received.fetch_add(if zero { 0 } else { data.len() as u64 }, Ordering::Relaxed);
        // The faults waiting on it saw the state it was claimed from.
        self.settle_waiting_fault(page, claimed_from == PageState::FetchingStale);
        Ok(())
    }

    /// Clears the note of a fault waiting on `page` and records its latency
    /// (a fault that needed the source; `known`: the page was stale, not
    /// unknown).
    pub fn settle_waiting_fault(&self, page: u64, known: bool) {
        let started = self.fault_started_ns[page as usize].swap(0, Ordering::AcqRel);
        if started != 0 {
            self.stats.record_fault_latency(FaultKind::Fetched, known, sys::monotonic_ns().saturating_sub(started));
        }
    }

    /// Pages with a fault waiting for their fetch right now (O(pages): for
    /// metrics, not for the fault path).
    pub fn faults_waiting(&self) -> u64 {
        self.fault_started_ns.iter().filter(|t| t.load(Ordering::Relaxed) != 0).count() as u64
    }

    /// Resolves a fault on a page that needs no fetch (`Fresh` or already
    /// `Installed`). A fresh hole (a MISSING fault) is zero-filled first.
    /// Returns how the fault was resolved, or `None` if the page needs a
    /// fetch after all (its state is not fresh/installed).
    pub fn install_fresh(&self, page: u64) -> Result<Option<FaultKind>, InstallError> {
        let entry = self.states.get(page);
        match entry.state {
            PageState::Installed => {
                self.continue_page(page)?;
                Ok(Some(FaultKind::Fresh))
            }
            PageState::Fresh => {
                // Only the fault loop handles fresh holes, one fault at a
                // time, so no one else writes this page meanwhile.
                let kind = if entry.present {
                    self.continue_page(page)?;
                    FaultKind::Fresh
                } else {
                    self.zero_fill(page)?;
                    FaultKind::Missing
                };
                self.states.transition(page, PageState::Fresh, PageState::Installed);
                Ok(Some(kind))
            }
            _ => Ok(None),
        }
    }

    /// Resolves a MISSING fault on a hole known to be zero: UFFDIO_ZEROPAGE
    /// where the kernel has it (shmem), else zeros written through our
    /// mapping (allocating the page) and UFFDIO_CONTINUE (hugetlbfs).
    fn zero_fill(&self, page: u64) -> Result<(), InstallError> {
        let addr = self.layout.host_addr(page);
        let len = self.page_size();
        if len == 4096 {
            match self.uffd.zeropage(addr, len, true) {
                Ok(_) => {
                    self.states.set_present(page);
                    return Ok(());
                }
                // Allocated meanwhile: map what is there.
                Err(UffdError::Exists { .. }) => {}
                Err(source) => return Err(InstallError::Uffd { page, source }),
            }
        } else {
            // The kernel allocates a zeroed huge page in the file; writing
            // zeros through our mapping would clear it twice.
            sys::fallocate_keep_size(self.memory.as_fd(), self.layout.file_offset(page), len)
                .map_err(|source| InstallError::Allocate { page, source })?;
        }
        self.states.set_present(page);
        self.continue_page(page)
    }

    /// Maps every fresh page that the file holds, one UFFDIO_CONTINUE per run
    /// of them (rule 3). Fresh holes stay holes (zero-filled if touched), so
    /// the target stays as sparse as the source. Returns pages installed.
    pub fn bulk_install(&self) -> Result<u64, InstallError> {
        let ps = self.page_size();
        let mut installed = 0;
        for (first, end) in self.states.fresh_present_runs() {
            // Runs never straddle regions in the VMM's address space unless
            // the regions are adjacent there too; split at region ends.
            let mut page = first;
            while page < end {
                let (region, index) = self.layout.locate(page);
                let region_end = page - index + self.layout.region_pages(region)?;
                let run_end = end.min(region_end);
                let mut cursor = page;
                while cursor < run_end {
                    let addr = self.layout.host_addr(cursor);
                    // Bounded chunks: the kernel holds the VMM's mmap lock
                    // for a whole call, so faults interleave between them.
                    let len = (run_end - cursor).min((BULK_CHUNK_BYTES / ps).max(1)) * ps;
                    match self.uffd.continue_range(addr, len, true) {
                        Ok(n) => cursor += n / ps,
                        Err(UffdError::Again { .. }) => std::thread::yield_now(),
                        // Mapped meanwhile by a fault: wake it and skip it.
                        Err(UffdError::Exists { .. }) => {
                            self.uffd.wake(addr, ps).map_err(|source| InstallError::Uffd { page: cursor, source })?;
                            cursor += 1;
                        }
                        Err(source) => return Err(InstallError::Uffd { page: cursor, source }),
                    }
                }
                for p in page..run_end {
                    if self.states.transition(p, PageState::Fresh, PageState::Installed) {
                        installed += 1;
                    }
                }
                page = run_end;
            }
        }
        self.stats.pages_installed_bulk.fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }

    /// The memory file (kept open for the agent's lifetime).
    pub fn memory_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memory.as_fd()
    }
}
