//! The guest running on the target: vCPU threads that read and write the
//! registered mapping (every first access faults through the target agent)
//! and log what they overwrite ([`crate::undo_log`]).
//!
//! `resume` runs the vCPUs on threads of their own and returns at once, so
//! that the stand-in keeps taking commands while the guest runs, and after
//! it froze: when the agent fails, vCPUs block for ever in faults nobody
//! resolves, and no lock that a command needs is held by a blocked vCPU.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use guest_memory::Userfaultfd;
use guest_memory::memfile::monotonic_ns;
use guest_memory::sys::Discard;

use crate::config::StandinConfig;
use crate::error::{VmmError, io_context};
use crate::pattern::{self, SplitMix64, Stream};
use crate::ram::GuestRam;
use crate::touched::TouchedPages;
use crate::undo_log::UndoLogs;
use crate::written::WrittenPages;

/// Accesses a vCPU makes between two looks at the clock.
const ACCESSES_PER_CLOCK_CHECK: u64 = 64;
/// Share of a vCPU's accesses that are writes (to a page it owns), in percent.
const WRITE_PERCENT: u64 = 30;

/// The target guest's memory and what its vCPUs did to it.
#[derive(Debug)]
pub struct TargetGuest {
    ram: GuestRam,
    /// The registration of `ram` (MINOR + MISSING). Kept as long as a vCPU
    /// may access the memory: without it the kernel would resolve faults on
    /// its own, with zeros or stale pre-copy content.
    _registration: Userfaultfd,
    vcpus: usize,
    seed: u64,
    hot: Vec<u64>,
    /// The pages the guest uses (all, or a sparse guest's clusters).
    written: WrittenPages,
    /// Monotonic time when the first guest access completed; 0 = none yet.
    first_access_done_ns: AtomicU64,
    undo: UndoLogs,
    /// The pages the vCPUs of `resume` runs accessed.
    touched: TouchedPages,
    /// A `resume` run is in progress.
    running: AtomicBool,
    /// Pages punched out (`discard`): zeros, whatever the source held.
    discarded: Mutex<BTreeSet<u64>>,
}

/// What `resume` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRunStats {
    /// When the guest's first access (of this run or an earlier touch) completed.
    pub first_access_done_ns: u64,
    pub accesses: u64,
    pub pages_written: u64,
    /// Distinct pages the vCPUs accessed (in every run so far).
    pub pages_touched: u64,
}

impl TargetGuest {
    /// The guest of `ram`, registered with `registration`.
    pub fn new(ram: GuestRam, registration: Userfaultfd, config: &StandinConfig) -> Self {
        Self {
            hot: config.written().hot_set(config.seed),
            written: config.written(),
            undo: UndoLogs::new(config.vcpus, ram.page_size, config.max_written_pages),
            touched: TouchedPages::new(ram.total_pages),
            ram,
            _registration: registration,
            vcpus: config.vcpus,
            seed: config.seed,
            first_access_done_ns: AtomicU64::new(0),
            running: AtomicBool::new(false),
            discarded: Mutex::default(),
        }
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn undo_logs(&self) -> &UndoLogs {
        &self.undo
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    pub fn first_access_done_ns(&self) -> u64 {
        self.first_access_done_ns.load(Ordering::Relaxed)
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

    /// Writes one word of `page`, which the calling vCPU owns. Before the
    /// page's first write its content is read (this may block on a fault,
    /// with no lock held) and logged; once the budget of written pages is
    /// spent, writes to new pages become reads.
    fn write_word(&self, page: u64, word: u64, value: u64) {
        if !self.undo.contains(page) {
            if !self.undo.reserve_page() {
                self.read_word(page, word);
                return;
            }
            let mut before = vec![0u8; self.ram.page_size as usize];
            self.ram.map.copy_out(self.ram.page_offset(page), &mut before);
            self.undo.insert(page, before);
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

    /// Starts the guest for `duration` on a thread of its own, which runs
    /// the vCPUs and then calls `on_done`. `on_started` is called once the
    /// thread exists and before any vCPU runs (so that its answer comes
    /// before `on_done`'s). Nobody waits for the thread: its vCPUs may block
    /// for ever.
    pub fn resume(
        self: &Arc<Self>,
        duration: Duration,
        on_started: impl FnOnce(),
        on_done: impl FnOnce(GuestRunStats) + Send + 'static,
    ) -> Result<(), VmmError> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(VmmError::AlreadyRunning);
        }
        let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
        let guest = self.clone();
        let spawned = std::thread::Builder::new().name("guest".into()).spawn(move || {
            if wait_for_go.recv().is_ok() {
                let stats = guest.run_vcpus(duration);
                guest.running.store(false, Ordering::SeqCst);
                on_done(stats);
            }
        });
        if let Err(e) = spawned {
            self.running.store(false, Ordering::SeqCst);
            return Err(io_context("starting the guest thread")(e));
        }
        on_started();
        // The thread waits on the other end until now; it cannot be gone.
        let _ = go.send(());
        Ok(())
    }

    /// Runs every vCPU for `duration`: 70% one-word reads anywhere, 30%
    /// one-word writes to owned pages, with the source's hot/cold mix.
    fn run_vcpus(&self, duration: Duration) -> GuestRunStats {
        let deadline = Instant::now() + duration;
        let accesses = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for vcpu in 0..self.vcpus {
                let accesses = &accesses;
                let spawned = std::thread::Builder::new().name(format!("vcpu{vcpu}")).spawn_scoped(scope, move || {
                    accesses.fetch_add(self.run_vcpu(vcpu, deadline), Ordering::Relaxed);
                });
                if let Err(e) = spawned {
                    eprintln!("vmm-standin[target]: cannot start vCPU {vcpu}: {e}");
                }
            }
        });
        GuestRunStats {
            first_access_done_ns: self.first_access_done_ns(),
            accesses: accesses.into_inner(),
            pages_written: self.undo.pages_written(),
            pages_touched: self.touched.count(),
        }
    }

    fn run_vcpu(&self, vcpu: usize, deadline: Instant) -> u64 {
        let mut rng = SplitMix64::new(pattern::derive(self.seed, Stream::TargetVcpu, vcpu as u64, 0));
        let words = self.words_per_page();
        let mut accesses = 0u64;
        loop {
            for _ in 0..ACCESSES_PER_CLOCK_CHECK {
                let page = self.written.pick_page(&mut rng, &self.hot);
                let word = rng.below(words);
                match self.owned_page_near(page, vcpu).filter(|_| rng.percent(WRITE_PERCENT)) {
                    Some(owned) => {
                        self.touched.touch(owned);
                        self.write_word(owned, word, rng.next_u64());
                    }
                    None => {
                        self.touched.touch(page);
                        self.read_word(page, word);
                    }
                }
            }
            accesses += ACCESSES_PER_CLOCK_CHECK;
            if Instant::now() >= deadline {
                return accesses;
            }
        }
    }

    /// Every vCPU waits at a barrier, then reads one word of each page, so
    /// that several threads fault on the same page at once.
    /// Punches `pages` out of guest memory as a balloon does (MADV_REMOVE:
    /// the uffd reports the removal to the agent, and the pages read as
    /// zeros from then on).
    pub fn discard(&self, pages: &[u64]) -> std::io::Result<()> {
        let page_size = self.ram.page_size as usize;
        let mut discarded = self.discarded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for &page in pages {
            self.ram.map.discard(self.ram.page_offset(page), page_size, Discard::Remove)?;
            discarded.insert(page);
        }
        Ok(())
    }

    /// Whether `page` was discarded (its expected content is zeros).
    pub fn is_discarded(&self, page: u64) -> bool {
        self.discarded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(&page)
    }

    /// The vCPUs share pages [first, first + count) (vCPU i reads one word
    /// of pages first+i, first+i+vCPUs, ...), all starting at a barrier;
    /// returns the nanoseconds from the start to the last read.
    pub fn touch_spread(&self, first: u64, count: u64) -> u64 {
        let pages: Vec<u64> = (first..first + count).collect();
        self.touch_shared(&pages)
    }

    /// The vCPUs share `pages`: vCPU i reads the i-th, the (i+vCPUs)-th, ...,
    /// all starting at once. Returns the nanoseconds from the start to the
    /// last read.
    pub fn touch_shared(&self, pages: &[u64]) -> u64 {
        let barrier = Barrier::new(self.vcpus + 1);
        let vcpus = self.vcpus;
        let started = std::thread::scope(|scope| {
            for vcpu in 0..vcpus {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    for &page in pages.iter().skip(vcpu).step_by(vcpus) {
                        self.read_word(page, 0);
                    }
                });
            }
            barrier.wait();
            Instant::now()
        });
        started.elapsed().as_nanos() as u64
    }

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
}

#[cfg(test)]
mod tests;
