//! The target's memory compared with the source's snapshot (its memory at
//! pause time), page by page, on as many threads as the guest has vCPUs.
//!
//! A page the guest wrote is compared through its undo copy, any other page
//! live; a page the stand-in discarded must be zeros; the owner's undo log is locked meanwhile (see [`crate::undo_log`]),
//! so this works while vCPUs run, or are blocked in faults:
//! - `verify` compares every page that holds data in either file (the
//!   snapshot or the target's memory file, by `SEEK_DATA`): a page not
//!   installed yet faults through the agent (and blocks until it is
//!   resolved). A page that is a hole in both files is zeros on both sides
//!   and is not touched: it counts as verified (`hole_pages`) without a
//!   fault, so a sparse 1 TiB guest is checked without faulting in 1 TiB.
//!   Nothing the agent could install there differs: the source held zeros
//!   at the pause, and the target's file holds nothing pre-copied there;
//! - `verify-mapped` compares only the pages present in our page tables
//!   ([`crate::pagemap`]) and never touches another, so it answers even when
//!   the agent is gone and the guest froze.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::MemoryMap;
use guest_memory::memfile::data_ranges;
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
    /// Pages that are holes in both files (`EveryPage` only): zeros on both
    /// sides, counted as verified without being read.
    pub hole_pages: u64,
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
        let (file, snapshot) = self.map_snapshot(path)?;
        // Read once: a page mapped (or holding data) now stays so; one
        // mapped later is left out.
        let ranges = match scope {
            Scope::EveryPage => self.data_pages(&file, path)?,
            Scope::MappedPages => self.mapped_pages()?,
        };
        let chunks = chunked(&ranges);
        let next_chunk = AtomicU64::new(0);
        let tallies: Vec<Result<Tally, VmmError>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..self.vcpus())
                .map(|_| scope.spawn(|| self.compare_chunks(&snapshot, &chunks, &next_chunk)))
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
        let hole_pages = match scope {
            Scope::EveryPage => self.ram().total_pages - compared,
            Scope::MappedPages => 0,
        };
        Ok(VerifyOutcome { compared_pages: compared, hole_pages, mismatched_pages, first_mismatches: mismatches })
    }

    /// The snapshot, open and mapped read-only; it must be exactly as large
    /// as the guest.
    fn map_snapshot(&self, path: &Path) -> Result<(File, MemoryMap), VmmError> {
        let ram = self.ram();
        let context = || format!("opening the snapshot {}", path.display());
        let file = File::open(path).map_err(io_context(context()))?;
        let len = file.metadata().map_err(io_context(context()))?.len();
        if len != ram.size() {
            return Err(VmmError::SnapshotSize { path: path.display().to_string(), have: len, need: ram.size() });
        }
        let map = MemoryMap::map(file.as_fd(), 0, ram.map.len(), false)
            .map_err(io_context(format!("mapping the snapshot {}", path.display())))?;
        Ok((file, map))
    }

    /// The pages that hold data in the snapshot or in our memory file (by
    /// `SEEK_DATA`; hugetlbfs has no holes to skip, so there it is every
    /// page), as ascending, disjoint page ranges.
    fn data_pages(&self, snapshot: &File, path: &Path) -> Result<Vec<(u64, u64)>, VmmError> {
        let ram = self.ram();
        let page_size = ram.page_size;
        // Our own open file: SEEK_DATA moves the position of the file
        // description the agent shares.
        let ours = File::open(format!("/proc/self/fd/{}", ram.memfd.as_raw_fd()))
            .map_err(io_context("reopening the guest memory file"))?;
        let mut ranges = Vec::new();
        let mut add = |from: u64, to: u64| ranges.push((from / page_size, to.div_ceil(page_size)));
        data_ranges(snapshot.as_fd(), 0, ram.size(), &mut add)
            .map_err(io_context(format!("looking for the data of the snapshot {}", path.display())))?;
        data_ranges(ours.as_fd(), 0, ram.size(), &mut add)
            .map_err(io_context("looking for the data of the guest memory file"))?;
        Ok(merged(ranges))
    }

    /// The pages our page tables map now (PAGEMAP_SCAN on our own pagemap;
    /// nothing is touched), as ascending page ranges.
    fn mapped_pages(&self) -> Result<Vec<(u64, u64)>, VmmError> {
        let ram = self.ram();
        let pagemap = File::open("/proc/self/pagemap").map_err(io_context("opening /proc/self/pagemap"))?;
        let present = present_pages(pagemap.as_fd(), ram.map.addr(), ram.size(), ram.page_size)?;
        Ok(merged(present.into_iter().map(|page| (page, page + 1)).collect()))
    }

    /// Compares chunks of pages until none is left.
    fn compare_chunks(&self, snapshot: &MemoryMap, chunks: &[(u64, u64)], next: &AtomicU64) -> Result<Tally, VmmError> {
        let ram = self.ram();
        let page_size = ram.page_size as usize;
        let (mut expected, mut actual) = (vec![0u8; page_size], vec![0u8; page_size]);
        let mut tally = Tally::default();
        loop {
            let Some(&(first, end)) = chunks.get(next.fetch_add(1, Ordering::Relaxed) as usize) else {
                return Ok(tally);
            };
            for page in first..end {
                let offset = ram.page_offset(page);
                if self.is_discarded(page) {
                    // Punched out on the target: zeros, whatever the source held.
                    expected.fill(0);
                } else {
                    snapshot.copy_out(offset, &mut expected);
                }
                let mismatch = {
                    let undo = self.undo_logs().lock_owner_of(page);
                    match undo.get(&page) {
                        Some(before) => (before != &expected).then(|| describe(page, before, &expected, true)),
                        None => {
                            ram.map.copy_out(offset, &mut actual);
                            (actual != expected).then(|| describe(page, &actual, &expected, false))
                        }
                    }
                };
                tally.compared += 1;
                if let Some(description) = mismatch {
                    if tally.mismatches.len() < MISMATCHES_REPORTED {
                        eprintln!("vmm-standin[target]: {description}");
                    }
                    tally.mismatches.push(page);
                }
            }
        }
    }
}

/// How a page differs from the snapshot, for the log: whether either side
/// is zeros, and which 64-byte lines differ (the source's vCPUs write one
/// line at a time, so one line means one write missed, every line another
/// page's or no content).
fn describe(page: u64, actual: &[u8], expected: &[u8], from_undo_log: bool) -> String {
    const LINE: usize = 64;
    let differing: Vec<usize> = (0..actual.len() / LINE)
        .filter(|&line| actual[line * LINE..(line + 1) * LINE] != expected[line * LINE..(line + 1) * LINE])
        .collect();
    let zeros = |bytes: &[u8]| bytes.iter().all(|&b| b == 0);
    let shown: Vec<String> = differing.iter().take(8).map(|line| (line * LINE).to_string()).collect();
    format!(
        "page {page} mismatched{}: ours {}, the source's {}; {} of {} 64-byte lines differ (at byte {}{})",
        if from_undo_log { " (as first installed, before the guest wrote it)" } else { "" },
        if zeros(actual) { "zeros" } else { "data" },
        if zeros(expected) { "zeros" } else { "data" },
        differing.len(),
        actual.len() / LINE,
        shown.join(", "),
        if differing.len() > shown.len() { ", ..." } else { "" },
    )
}

/// Sorted, overlapping or touching ranges joined.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, end) in ranges {
        match out.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => out.push((first, end)),
        }
    }
    out
}

/// `ranges` cut into pieces of at most [`CHUNK_PAGES`] pages, for the
/// verifying threads to claim one at a time.
fn chunked(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let pieces = ranges.iter().flat_map(|&(first, end)| {
        (first..end).step_by(CHUNK_PAGES as usize).map(move |start| (start, (start + CHUNK_PAGES).min(end)))
    });
    pieces.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_and_chunked() {
        assert_eq!(merged(vec![(5, 9), (0, 2), (2, 3), (8, 12)]), [(0, 3), (5, 12)]);
        assert_eq!(chunked(&[(0, 130), (200, 201)]), [(0, 64), (64, 128), (128, 130), (200, 201)]);
    }
}
