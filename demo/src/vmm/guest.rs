//! The guest running on the target: vCPU threads that read and write the
//! registered mapping (every first access faults through the target agent),
//! an undo log that keeps the pre-write content of every page the guest
//! writes, and the final comparison with the source's snapshot.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_memory::sys::{MemoryMap, monotonic_ns};

use super::pattern::{self, SplitMix64, Stream};
use super::ram::GuestRam;
use super::{StandinConfig, VmmError, io_context};

/// The undo log never holds more than this many bytes (2 MiB pages add up).
pub const UNDO_LOG_MAX_BYTES: u64 = 256 << 20;
/// How many mismatching pages `verify` lists.
const MISMATCHES_REPORTED: usize = 16;
/// Pages a verifying thread claims at a time.
const VERIFY_CHUNK_PAGES: u64 = 64;

/// Pages this guest wrote, with their content from before the first write.
type UndoLog = HashMap<u64, Vec<u8>>;

/// The target guest's memory and what its vCPUs did to it.
#[derive(Debug)]
pub struct TargetGuest {
    ram: GuestRam,
    vcpus: usize,
    seed: u64,
    hot: Vec<u64>,
    /// Monotonic time when the first guest access completed; 0 = none yet.
    first_access_done_ns: AtomicU64,
    /// One log per vCPU: vCPU `t` alone writes the pages `p % vcpus == t`.
    undo_logs: Vec<Mutex<UndoLog>>,
    pages_written: AtomicU64,
    max_written_pages: u64,
}

/// What `resume` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRunStats {
    pub accesses: u64,
    pub pages_written: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    pub first_mismatches: Vec<u64>,
}

impl TargetGuest {
    pub fn new(ram: GuestRam, config: &StandinConfig) -> Self {
        let max_written_pages = config.max_written_pages.min(UNDO_LOG_MAX_BYTES / ram.page_size);
        Self {
            hot: pattern::hot_set(config.seed, ram.total_pages),
            ram,
            vcpus: config.vcpus,
            seed: config.seed,
            first_access_done_ns: AtomicU64::new(0),
            undo_logs: (0..config.vcpus).map(|_| Mutex::new(UndoLog::new())).collect(),
            pages_written: AtomicU64::new(0),
            max_written_pages,
        }
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn first_access_done_ns(&self) -> u64 {
        self.first_access_done_ns.load(Ordering::Relaxed)
    }

    pub fn pages_written(&self) -> u64 {
        self.pages_written.load(Ordering::Relaxed)
    }

    /// Records the end of a guest access (only the first one counts).
    fn access_done(&self) {
        if self.first_access_done_ns.load(Ordering::Relaxed) == 0 {
            let _ = self.first_access_done_ns.compare_exchange(0, monotonic_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn word_offset(&self, page: u64, word: u64) -> usize {
        self.ram.page_offset(page) + (word * 8) as usize
    }

    fn words_per_page(&self) -> u64 {
        self.ram.page_size / 8
    }

    /// Reads one word of `page` (may block on a fault).
    fn read_word(&self, page: u64, word: u64) -> u64 {
        let value = self.ram.map.read_u64(self.word_offset(page, word));
        self.access_done();
        value
    }

    /// Writes one word of `page`, owned by the calling vCPU whose log is
    /// `undo`. The page's content is saved first if this is its first
    /// write; once the log is full, writes to new pages become reads.
    fn write_word(&self, undo: &mut UndoLog, page: u64, word: u64, value: u64) {
        if let Entry::Vacant(slot) = undo.entry(page) {
            let reserved = self
                .pages_written
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_written_pages).then_some(n + 1))
                .is_ok();
            if !reserved {
                self.read_word(page, word);
                return;
            }
            let mut before = vec![0u8; self.ram.page_size as usize];
            self.ram.map.copy_out(self.ram.page_offset(page), &mut before);
            slot.insert(before);
        }
        self.ram.map.write_u64(self.word_offset(page, word), value);
        self.access_done();
    }

    /// The page owned by `vcpu` nearest to `page`, if the guest has one.
    fn owned_page_near(&self, page: u64, vcpu: usize) -> Option<u64> {
        let n = self.vcpus as u64;
        let owned = page - page % n + vcpu as u64;
        if owned < self.ram.total_pages { Some(owned) } else { owned.checked_sub(n) }
    }

    /// Runs every vCPU for `duration`: 70% one-word reads anywhere, 30%
    /// one-word writes to owned pages, with the source's hot/cold mix.
    pub fn run(&self, duration: Duration) -> GuestRunStats {
        let deadline = Instant::now() + duration;
        let accesses = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for vcpu in 0..self.vcpus {
                let accesses = &accesses;
                scope.spawn(move || {
                    let done = self.run_vcpu(vcpu, deadline);
                    accesses.fetch_add(done, Ordering::Relaxed);
                });
            }
        });
        GuestRunStats { accesses: accesses.into_inner(), pages_written: self.pages_written() }
    }

    fn run_vcpu(&self, vcpu: usize, deadline: Instant) -> u64 {
        let mut undo = lock(&self.undo_logs[vcpu]);
        let mut rng = SplitMix64::new(pattern::derive(self.seed, Stream::TargetVcpu, vcpu as u64, 0));
        let words = self.words_per_page();
        let mut accesses = 0u64;
        loop {
            for _ in 0..64 {
                let page = pattern::pick_page(&mut rng, &self.hot, self.ram.total_pages);
                let word = rng.below(words);
                match self.owned_page_near(page, vcpu).filter(|_| rng.percent(30)) {
                    Some(owned) => self.write_word(&mut undo, owned, word, rng.next_u64()),
                    None => {
                        self.read_word(page, word);
                    }
                }
            }
            accesses += 64;
            if Instant::now() >= deadline {
                return accesses;
            }
        }
    }

    /// Every vCPU waits at a barrier, then reads one word of each page, so
    /// that several threads fault on the same page at once.
    pub fn touch(&self, pages: &[u64]) {
        let barrier = Barrier::new(self.vcpus);
        let words = self.words_per_page();
        std::thread::scope(|scope| {
            for vcpu in 0..self.vcpus {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    for &page in pages {
                        self.read_word(page, vcpu as u64 % words);
                    }
                });
            }
        });
    }

    /// Compares every page with the snapshot at `path`: the undo copy for a
    /// page the guest wrote, else the live page (which faults through the
    /// agent if it is not installed yet).
    pub fn verify(&self, path: &Path) -> Result<VerifyOutcome, VmmError> {
        let context = || format!("opening the snapshot {}", path.display());
        let file = File::open(path).map_err(io_context(context()))?;
        let len = file.metadata().map_err(io_context(context()))?.len();
        if len != self.ram.size() {
            return Err(VmmError::Config(format!(
                "snapshot {} has {len} bytes, the guest has {}",
                path.display(),
                self.ram.size()
            )));
        }
        let snapshot = MemoryMap::map(file.as_fd(), 0, self.ram.map.len(), false)
            .map_err(io_context(format!("mapping the snapshot {}", path.display())))?;
        let undo_logs: Vec<MutexGuard<'_, UndoLog>> = self.undo_logs.iter().map(lock).collect();
        let next_chunk = AtomicU64::new(0);
        let mismatches = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..self.vcpus {
                scope.spawn(|| {
                    let found = self.verify_chunks(&snapshot, &undo_logs, &next_chunk);
                    lock(&mismatches).extend(found);
                });
            }
        });
        let mut mismatches = mismatches.into_inner().unwrap_or_else(|p| p.into_inner());
        mismatches.sort_unstable();
        let mismatched_pages = mismatches.len() as u64;
        mismatches.truncate(MISMATCHES_REPORTED);
        Ok(VerifyOutcome { verified_pages: self.ram.total_pages, mismatched_pages, first_mismatches: mismatches })
    }

    fn verify_chunks(&self, snapshot: &MemoryMap, undo_logs: &[MutexGuard<'_, UndoLog>], next: &AtomicU64) -> Vec<u64> {
        let page_size = self.ram.page_size as usize;
        let (mut expected, mut actual) = (vec![0u8; page_size], vec![0u8; page_size]);
        let mut mismatches = Vec::new();
        loop {
            let first = next.fetch_add(VERIFY_CHUNK_PAGES, Ordering::Relaxed);
            if first >= self.ram.total_pages {
                return mismatches;
            }
            for page in first..(first + VERIFY_CHUNK_PAGES).min(self.ram.total_pages) {
                let offset = self.ram.page_offset(page);
                snapshot.copy_out(offset, &mut expected);
                let matches = match undo_logs[(page % self.vcpus as u64) as usize].get(&page) {
                    Some(before) => before == &expected,
                    None => {
                        self.ram.map.copy_out(offset, &mut actual);
                        actual == expected
                    }
                };
                if !matches {
                    mismatches.push(page);
                }
            }
        }
    }
}

/// Locks a mutex; a vCPU that panicked leaves its log usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
