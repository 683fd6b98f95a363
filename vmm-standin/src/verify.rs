//! The target's memory compared with the source's snapshot (its memory at
//! pause time), page by page, on as many threads as the guest has vCPUs.
//!
//! A page the guest wrote is compared through its undo copy, any other page
//! live; a page the stand-in discarded must be zeros; the owner's undo log is locked meanwhile (see [`crate::undo_log`]),
//! so this works while vCPUs run, or are blocked in faults:
//! - `verify` compares every page: a page not installed yet faults through
//!   the agent (and blocks until it is resolved);
//! - `verify-mapped` compares only the pages present in our page tables
//!   ([`crate::pagemap`]) and never touches another, so it answers even when
//!   the agent is gone and the guest froze.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::MemoryMap;
use guest_memory::page_tables::present_pages;

use crate::error::{VmmError, io_context};
use crate::guest::TargetGuest;

/// How many mismatching pages an outcome lists.
const MISMATCHES_REPORTED: usize = 16;
/// Pages a verifying thread claims at a time.
const CHUNK_PAGES: u64 = 64;

/// Which pages to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every page, faulting in what is not mapped yet.
    EveryPage,
    /// Only pages already mapped; none is touched otherwise.
    MappedPages,
}

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub compared_pages: u64,
    pub mismatched_pages: u64,
    /// The lowest mismatching pages, at most [`MISMATCHES_REPORTED`].
    pub first_mismatches: Vec<u64>,
}

/// One thread's share of the result.
#[derive(Debug, Default)]
struct Tally {
    compared: u64,
    mismatches: Vec<u64>,
}

impl TargetGuest {
    /// Compares the pages in `scope` with the snapshot at `path`.
    pub fn verify(&self, path: &Path, scope: Scope) -> Result<VerifyOutcome, VmmError> {
        let snapshot = self.map_snapshot(path)?;
        // Read once: a page mapped now stays mapped; one mapped later is
        // left out.
        let mapped = match scope {
            Scope::EveryPage => None,
            Scope::MappedPages => Some(self.mapped_pages()?),
        };
        let next_chunk = AtomicU64::new(0);
        let tallies: Vec<Result<Tally, VmmError>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..self.vcpus())
                .map(|_| scope.spawn(|| self.compare_chunks(&snapshot, mapped.as_deref(), &next_chunk)))
                .collect();
            threads
                .into_iter()
                .map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        });
        let (mut compared, mut mismatches) = (0, Vec::new());
        for tally in tallies {
            let tally = tally?;
            compared += tally.compared;
            mismatches.extend(tally.mismatches);
        }
        mismatches.sort_unstable();
        let mismatched_pages = mismatches.len() as u64;
        mismatches.truncate(MISMATCHES_REPORTED);
        Ok(VerifyOutcome { compared_pages: compared, mismatched_pages, first_mismatches: mismatches })
    }

    /// The snapshot, mapped read-only; it must be exactly as large as the guest.
    fn map_snapshot(&self, path: &Path) -> Result<MemoryMap, VmmError> {
        let ram = self.ram();
        let context = || format!("opening the snapshot {}", path.display());
        let file = File::open(path).map_err(io_context(context()))?;
        let len = file.metadata().map_err(io_context(context()))?.len();
        if len != ram.size() {
            return Err(VmmError::SnapshotSize { path: path.display().to_string(), have: len, need: ram.size() });
        }
        MemoryMap::map(file.as_fd(), 0, ram.map.len(), false)
            .map_err(io_context(format!("mapping the snapshot {}", path.display())))
    }

    /// Per page, whether our page tables map it now (PAGEMAP_SCAN on our own
    /// pagemap; nothing is touched).
    fn mapped_pages(&self) -> Result<Vec<bool>, VmmError> {
        let ram = self.ram();
        let pagemap = File::open("/proc/self/pagemap").map_err(io_context("opening /proc/self/pagemap"))?;
        let present = present_pages(pagemap.as_fd(), ram.map.addr(), ram.size(), ram.page_size)?;
        let mut mapped = vec![false; ram.total_pages as usize];
        for page in present {
            mapped[page as usize] = true;
        }
        Ok(mapped)
    }

    /// Compares chunks of pages until none is left; with `mapped`, only the
    /// pages it says are mapped.
    fn compare_chunks(
        &self,
        snapshot: &MemoryMap,
        mapped: Option<&[bool]>,
        next: &AtomicU64,
    ) -> Result<Tally, VmmError> {
        let ram = self.ram();
        let page_size = ram.page_size as usize;
        let (mut expected, mut actual) = (vec![0u8; page_size], vec![0u8; page_size]);
        let mut tally = Tally::default();
        loop {
            let first = next.fetch_add(CHUNK_PAGES, Ordering::Relaxed);
            if first >= ram.total_pages {
                return Ok(tally);
            }
            let end = (first + CHUNK_PAGES).min(ram.total_pages);
            for page in first..end {
                if mapped.is_some_and(|mapped| !mapped[page as usize]) {
                    continue;
                }
                let offset = ram.page_offset(page);
                if self.is_discarded(page) {
                    // Punched out on the target: zeros, whatever the source held.
                    expected.fill(0);
                } else {
                    snapshot.copy_out(offset, &mut expected);
                }
                let matches = {
                    let undo = self.undo_logs().lock_owner_of(page);
                    match undo.get(&page) {
                        Some(before) => before == &expected,
                        None => {
                            ram.map.copy_out(offset, &mut actual);
                            actual == expected
                        }
                    }
                };
                tally.compared += 1;
                if !matches {
                    tally.mismatches.push(page);
                }
            }
        }
    }
}
