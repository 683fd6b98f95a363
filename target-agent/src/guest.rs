//! The target VM's memory as the agent holds it: its own read-write mapping
//! of the guest-memory file, the VMM's userfaultfd, the page states, and the
//! faults waiting for a fetch.
//!
//! Everything that makes a page visible to the guest goes through here, and
//! each path needs the token [`crate::page_state`] hands out for it:
//! [`GuestMemory::install_fetched`] takes a [`Claim`] (content just fetched
//! from the paused source), [`GuestMemory::resolve_local`] a
//! [`LocalResolution`] (a fault on a page known fresh), and
//! [`GuestMemory::bulk_install`] the [`FreshRun`]s of the final bitmap.
//! Writing goes through the agent's unregistered mapping; UFFDIO_CONTINUE
//! then maps the page-cache page into the VMM and wakes the faulting
//! threads.
//!
//! Descriptors: the memory file and the uffd came from the VMM's hand-off
//! and are owned here for the agent's life; the VMM keeps its own copies,
//! so its vCPUs keep waiting on unresolved faults whatever becomes of us.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use guest_memory::handoff::{AgentMessage, EventReader, Handoff};
use guest_memory::memfile::{data_ranges, fallocate_keep_size, monotonic_ns, punch_hole};
use guest_memory::{GuestLayout, MemoryMap, UffdError, Userfaultfd, layout::LayoutError};
use pageserver_proto::v1::Page;

use crate::fault_waits::FaultWaits;
use crate::install_gate::{GateClosed, InstallGate};
use crate::page_state::{Claim, ClaimMismatch, FetchOrigin, LocalFill, LocalResolution, PageStates};
use crate::stats::{FaultKind, TargetStats};
use crate::takeover::Checkpoint;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("mapping region {region} of the guest-memory file")]
    Map {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("page {page}")]
    Uffd {
        page: u64,
        #[source]
        source: UffdError,
    },
    #[error("emptying region {region} of the target's memory file")]
    Empty {
        region: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("allocating page {page} in the target's memory file")]
    Allocate {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing pre-copied pages from page {page} to the target's memory file")]
    Store {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("a page outside the layout")]
    BadPage(#[from] LayoutError),
    #[error("finishing the fetch of a page")]
    Claim(#[from] ClaimMismatch),
    #[error(transparent)]
    Frozen(#[from] GateClosed),
}

/// Largest range one bulk UFFDIO_CONTINUE maps: the kernel holds the VMM's
/// mmap lock for a whole call, so faults interleave between chunks.
const BULK_CHUNK_BYTES: u64 = 32 << 20;
/// Pages one `pwritev` of pre-copy writes at most (IOV_MAX is 1024; a
/// reply holds at most 512 pages).
const PWRITEV_PAGES: usize = 512;
/// The page size written with `pwritev`: hugetlbfs has no `write`, so huge
/// pages are copied through the agent's mapping.
const PWRITE_PAGE_SIZE: u64 = 4096;

#[derive(Debug)]
pub struct GuestMemory {
    pub layout: GuestLayout,
    /// The agent's own mappings of every region (read-write, unregistered).
    maps: Vec<MemoryMap>,
    /// The guest-memory file (from the hand-off).
    memory: OwnedFd,
    /// The VMM's userfaultfd (from the hand-off), registered MINOR|MISSING.
    pub uffd: Userfaultfd,
    /// The VMM's pagemap (from the hand-off), for a takeover.
    pagemap: Option<OwnedFd>,
    /// The hand-off connection, held open for the agent's life: it carries
    /// checkpoints to the VMM, and its end tells the VMM that this agent is
    /// gone (it then hands its memory to the next agent on the socket).
    vmm: EventReader,
    pub states: PageStates,
    /// Shut when the migration fails: nothing is installed after that.
    pub gate: InstallGate,
    /// When the oldest fault still waiting on each page's fetch was read.
    fault_waits: FaultWaits,
    pub stats: Arc<TargetStats>,
}

impl GuestMemory {
    /// Maps the handed-off memory file; nothing in it is changed (see
    /// [`GuestMemory::clear`]).
    pub fn new(handoff: Handoff, stats: Arc<TargetStats>) -> Result<Self, InstallError> {
        let layout = handoff.layout;
        let mut maps = Vec::with_capacity(layout.regions().len());
        for (i, r) in layout.regions().iter().enumerate() {
            let map = MemoryMap::map(handoff.memory.as_fd(), r.offset, r.size as usize, true)
                .map_err(|source| InstallError::Map { region: i, source })?;
            maps.push(map);
        }
        let pages = layout.total_pages();
        Ok(Self {
            states: PageStates::new(pages),
            gate: InstallGate::default(),
            fault_waits: FaultWaits::default(),
            layout,
            maps,
            memory: handoff.memory,
            uffd: handoff.uffd,
            pagemap: handoff.pagemap,
            vmm: handoff.events,
            stats,
        })
    }

    /// Empties the file, for a migration that starts here: the page states
    /// say every page is a hole until pre-copy writes it, and a page left
    /// over from an earlier use of the file must never be mapped as if fresh.
    pub fn clear(&self) -> Result<(), InstallError> {
        for (i, r) in self.layout.regions().iter().enumerate() {
            punch_hole(self.memory.as_fd(), r.offset, r.size)
                .map_err(|source| InstallError::Empty { region: i, source })?;
        }
        Ok(())
    }

    /// Tells the VMM where the migration is, for an agent that may take
    /// over ([`crate::takeover`]). A VMM that cannot be told is logged, not
    /// fatal: it only matters if this agent dies too.
    pub fn send_checkpoint(&self, checkpoint: &Checkpoint) {
        let message = serde_json::to_value(checkpoint).map(AgentMessage::Checkpoint);
        match message.map_err(guest_memory::handoff::HandoffError::Json).and_then(|m| self.vmm.send(&m)) {
            Ok(()) => tracing::debug!(?checkpoint, "checkpoint sent to the VMM"),
            Err(error) => tracing::warn!(%error, "could not send the VMM a checkpoint; a takeover would start over"),
        }
    }

    /// The VMM's pagemap (from the hand-off).
    pub fn pagemap(&self) -> Option<&OwnedFd> {
        self.pagemap.as_ref()
    }

    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    fn locate(&self, page: u64) -> (&MemoryMap, usize) {
        let (region, index) = self.layout.locate(page);
        (&self.maps[region as usize], (index * self.layout.page_size()) as usize)
    }

    /// Pre-copy: stores the pages of one reply, `first` onwards, in the
    /// target's file. Each run of pages with content is one `pwritev` at its
    /// file offset: the kernel allocates each page and copies into it
    /// (through the agent's mapping, every page was a page fault, a zeroed
    /// page, then the copy). Zero pages go as [`Self::store_precopy`]. The
    /// reply was checked against its request
    /// ([`crate::source::check_reply`]): its pages are consecutive, in one
    /// region.
    pub fn store_precopy_pages(&self, first: u64, pages: &[Page]) -> Result<(), InstallError> {
        if self.page_size() != PWRITE_PAGE_SIZE {
            for (page, content) in (first..).zip(pages) {
                self.store_precopy(page, content);
            }
            return Ok(());
        }
        let mut at = 0;
        while at < pages.len() {
            if pages[at].zero {
                self.store_precopy(first + at as u64, &pages[at]);
                at += 1;
                continue;
            }
            let run = pages[at..].iter().take_while(|p| !p.zero).count().min(PWRITEV_PAGES);
            let slices: Vec<IoSlice<'_>> = pages[at..at + run].iter().map(|p| IoSlice::new(&p.data)).collect();
            let page = first + at as u64;
            let len = run as u64 * self.page_size();
            let mut written = 0u64;
            while written < len {
                let offset = self.layout.file_offset(page) + written;
                // After a short write, the rest of the run page by page
                // (rare: a signal, or memory pressure).
                let done = if written == 0 {
                    rustix::io::pwritev(&self.memory, &slices, offset)
                } else {
                    let skip = (written / self.page_size()) as usize;
                    let within = (written % self.page_size()) as usize;
                    rustix::io::pwrite(&self.memory, &slices[skip][within..], offset)
                };
                match done {
                    Ok(0) => return Err(InstallError::Store { page, source: std::io::ErrorKind::WriteZero.into() }),
                    Ok(n) => written += n as u64,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(InstallError::Store { page, source: e.into() }),
                }
            }
            for p in page..page + run as u64 {
                self.states.set_present(p);
            }
            self.stats.note_progress();
            at += run;
        }
        Ok(())
    }

    /// Pre-copy: stores a page's content in the target's file (nothing is
    /// mapped into the guest). Zero pages stay holes unless an older copy is
    /// there to overwrite. `page` must have been checked against the reply's
    /// request ([`crate::source::check_reply`]).
    pub fn store_precopy(&self, page: u64, content: &Page) {
        let (map, off) = self.locate(page);
        if content.zero {
            if self.states.is_present(page) {
                map.fill_zero(off, self.page_size() as usize);
            }
        } else {
            map.copy_in(off, &content.data);
            self.states.set_present(page);
        }
        self.stats.note_progress();
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

    /// Installs a page just fetched from the paused source, consuming its
    /// claim: writes the content through our mapping, maps it into the VMM,
    /// marks it installed, and settles the faults waiting on it. `content`
    /// must have been checked against its request
    /// ([`crate::source::check_reply`]).
    ///
    /// On error the claim is gone and the page stays being fetched for
    /// ever: no one else may install it, and faults on it wait (the caller
    /// fails the migration).
    pub fn install_fetched(&self, claim: Claim, content: &Page) -> Result<(), InstallError> {
        let _pass = self.gate.enter()?;
        let page = claim.page();
        if self.states.is_removed(page) {
            // Discarded by the VMM while it was being fetched (page_state
            // rule 7): what the VMM left decides, not the source's content.
            self.settle_removed(page)?;
        } else {
            let (map, off) = self.locate(page);
            if content.zero {
                // Writing allocates the page if it is a hole, so CONTINUE can map it.
                map.fill_zero(off, self.page_size() as usize);
            } else {
                map.copy_in(off, &content.data);
            }
            match self.continue_page(page) {
                // Discarded by the VMM between our look and the CONTINUE
                // (e.g. it unmapped its memory): what it left decides.
                Err(_) if self.states.is_removed(page) => self.settle_removed(page)?,
                result => result?,
            }
        }
        let (known, origin) = (claim.was_known(), claim.origin());
        self.states.finish_fetch(claim)?;
        let stats = &self.stats;
        match origin {
            FetchOrigin::Demand => stats.pages_fetched_on_demand.fetch_add(1, Ordering::Relaxed),
            FetchOrigin::Background => stats.pages_fetched_background.fetch_add(1, Ordering::Relaxed),
        };
        if !known {
            stats.pages_fetched_unknown.fetch_add(1, Ordering::Relaxed);
        }
        stats.bytes_received.fetch_add(content.data.len() as u64, Ordering::Relaxed);
        stats.note_progress();
        // The faults waiting on it saw the state it was claimed from.
        self.settle_waiting_fault(page, known);
        Ok(())
    }

    /// The VMM discarded [start, end) of its address space (a
    /// `UFFD_EVENT_REMOVE` or `UFFD_EVENT_UNMAP`): page_state rule 7.
    pub fn discarded(&self, start: u64, end: u64) -> u64 {
        let mut pages = 0;
        let mut addr = start;
        while addr < end {
            match self.layout.page_at_host_addr(addr) {
                Some(page) => {
                    self.states.mark_removed(page);
                    pages += 1;
                    addr = self.layout.host_addr(page) + self.page_size();
                }
                None => addr += self.page_size(),
            }
        }
        pages
    }

    /// Maps a page the VMM discarded while it was being fetched: if the VMM
    /// punched it out of the file, it is zeros (zero-filled); if the file
    /// still holds it (only unmapped), that content is the page's (the VMM
    /// kept it). A VMM that unmapped the range for good leaves nothing to
    /// map: then nothing is.
    fn settle_removed(&self, page: u64) -> Result<(), InstallError> {
        // A file system that cannot tell (an error) counts as holding data.
        let offset = self.layout.file_offset(page);
        let mut data = false;
        let hole =
            data_ranges(self.memory.as_fd(), offset, offset + self.page_size(), |_, _| data = true).is_ok() && !data;
        let mapped = if hole { self.zero_fill(page) } else { self.continue_page(page) };
        match mapped {
            Err(InstallError::Uffd { source: UffdError::NoPage { .. } | UffdError::Os { .. }, .. }) => {
                tracing::info!(page, "a page the VMM unmapped was not installed");
                Ok(())
            }
            other => other,
        }
    }

    /// Notes that a fault read at `started_ns` waits for the fetch of
    /// `page` (someone holds its claim, maybe this fault). The installer
    /// settles it; if the install won the race with this note, it is
    /// settled here.
    pub fn wait_for_fetch(&self, page: u64, started_ns: u64, known: bool) {
        self.fault_waits.note(page, started_ns);
        if self.states.state(page) == crate::page_state::PageState::Installed {
            // Installed between the fault's decision and this note: the
            // installer may have settled before the note, so do it here (the
            // swap makes sure only one of us records it). The fault's thread
            // was woken by the install's CONTINUE, or re-faults and finds the
            // page installed.
            self.settle_waiting_fault(page, known);
        }
    }

    /// Clears the note of a fault waiting on `page` and records its latency
    /// (a fault that needed the source; `known`: the page was stale, not
    /// unknown).
    fn settle_waiting_fault(&self, page: u64, known: bool) {
        if let Some(started) = self.fault_waits.take(page) {
            self.stats.record_fault_latency(FaultKind::Fetched, known, monotonic_ns().saturating_sub(started));
        }
    }

    /// Pages with a fault waiting for their fetch right now (for metrics and
    /// for accounting a stopped fault loop).
    pub fn faults_waiting(&self) -> u64 {
        self.fault_waits.count()
    }

    /// The first `limit` pages with a fault waiting for their fetch (for
    /// the log of a stopped fault loop).
    pub fn pages_waiting(&self, limit: usize) -> Vec<u64> {
        self.fault_waits.pages(limit)
    }

    /// Resolves a fault on a fresh or installed page without the network:
    /// maps what the page cache holds, or fills a hole with zeros. Returns
    /// how the fault was resolved.
    pub fn resolve_local(&self, resolution: LocalResolution) -> Result<FaultKind, InstallError> {
        let _pass = self.gate.enter()?;
        let page = resolution.page();
        let kind = match resolution.fill() {
            LocalFill::Continue => {
                self.continue_page(page)?;
                FaultKind::Fresh
            }
            LocalFill::ZeroFill => {
                self.zero_fill(page)?;
                FaultKind::Missing
            }
        };
        self.states.finish_local(resolution);
        Ok(kind)
    }

    /// Resolves a MISSING fault on a hole whose content is zeros:
    /// UFFDIO_ZEROPAGE where the kernel has it (shmem), else the page is
    /// allocated (zeroed) in the file and continued (hugetlbfs). Only the
    /// fault loop zero-fills, one fault at a time.
    fn zero_fill(&self, page: u64) -> Result<(), InstallError> {
        let addr = self.layout.host_addr(page);
        let len = self.page_size();
        if len == 4096 {
            match self.uffd.zeropage(addr, len, true) {
                Ok(_) => return Ok(()),
                // Allocated meanwhile: map what is there.
                Err(UffdError::Exists { .. }) => {}
                Err(source) => return Err(InstallError::Uffd { page, source }),
            }
        } else {
            // The kernel allocates a zeroed huge page in the file; writing
            // zeros through our mapping would clear it twice.
            fallocate_keep_size(self.memory.as_fd(), self.layout.file_offset(page), len)
                .map_err(|source| InstallError::Allocate { page, source })?;
        }
        self.continue_page(page)
    }

    /// Maps every fresh page that the file holds, one UFFDIO_CONTINUE per
    /// run of them (bounded chunks). Returns pages installed.
    pub fn bulk_install(&self) -> Result<u64, InstallError> {
        let ps = self.page_size();
        let mut installed = 0;
        for run in self.states.fresh_present_runs() {
            // A run may span regions in page numbering while they are apart
            // in the VMM's address space: map each region's part separately.
            let mut page = run.first();
            while page < run.end() {
                let (region, index) = self.layout.locate(page);
                let region_end = page - index + self.layout.region_pages(region)?;
                let part_end = run.end().min(region_end);
                let mut cursor = page;
                while cursor < part_end {
                    let _pass = self.gate.enter()?;
                    let addr = self.layout.host_addr(cursor);
                    let len = (part_end - cursor).min((BULK_CHUNK_BYTES / ps).max(1)) * ps;
                    match self.uffd.continue_range(addr, len, true) {
                        Ok(n) => cursor += n / ps,
                        Err(UffdError::Again { .. }) => std::thread::yield_now(),
                        // Mapped meanwhile by a fault: wake it and skip it.
                        Err(UffdError::Exists { .. }) => {
                            self.uffd.wake(addr, ps).map_err(|source| InstallError::Uffd { page: cursor, source })?;
                            cursor += 1;
                        }
                        // Punched out by the VMM since it was pre-copied: a
                        // fault on it will zero-fill it (see page_state).
                        Err(UffdError::NoPage { .. }) => cursor += 1,
                        Err(source) => return Err(InstallError::Uffd { page: cursor, source }),
                    }
                }
                page = part_end;
            }
            installed += self.states.finish_fresh_run(run);
            self.stats.note_progress();
        }
        self.stats.pages_installed_bulk.fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }
}
