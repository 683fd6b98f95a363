//! The source role: a running VM whose memory the source agent serves.
//!
//! Memory is filled from the seed, then registered for asynchronous
//! write-protect (the agent's dirty tracking) and handed off with the VMM's
//! own `/proc/self/pagemap`. vCPU threads dirty it at `--dirty-rate` until
//! `pause`.

use guest_memory::sys::Discard;
use std::fs::File;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_memory::handoff::{Role, VmmEvent};
use guest_memory::memfile::{data_ranges, is_zero, monotonic_ns};
use std::os::fd::AsFd;

use crate::config::StandinConfig;
use crate::error::{VmmError, io_context};
use crate::hot_sweep;

use crate::pattern::{self, SplitMix64, Stream};
use crate::protocol::{Command, EventSink, StandinEvent, TrackingSetup, command_loop};
use crate::ram::{GuestRam, describe_fds, guest_userfaultfd, hand_off};
use crate::written::WrittenPages;

/// How many hole pages the `ready` event lists.
const ZERO_PAGES_REPORTED: usize = 16;
/// Snapshot copy granularity (a multiple of both page sizes).
const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;

pub(crate) fn run(config: &StandinConfig, commands: impl BufRead, events: &Arc<EventSink>) -> Result<(), VmmError> {
    let ram = Arc::new(GuestRam::create(
        &format!("{}-source", config.vm),
        config.memory_bytes,
        config.page_size(),
        config.hugetlb,
    )?);
    let written = config.written();
    let started = Instant::now();
    fill_initial_content(&ram, &written, config.seed, config.vcpus, &config.marker);
    eprintln!(
        "vmm-standin[source]: {} of {} pages of {} bytes filled from seed {} in {:.2?}",
        written.len(),
        ram.total_pages,
        ram.page_size,
        config.seed,
        started.elapsed()
    );

    let uffd = guest_userfaultfd(Role::Source, &ram)?;
    let pagemap = File::open("/proc/self/pagemap").map_err(io_context("opening /proc/self/pagemap"))?;
    let pte_before = vm_pte_kib()?;
    let handoff_started = Instant::now();
    let link = hand_off(config, Role::Source, &ram, &[&ram.memfd, &uffd, &pagemap], events)?;
    let tracking = TrackingSetup {
        handoff_us: handoff_started.elapsed().as_micros() as u64,
        vm_pte_kib_before: pte_before,
        vm_pte_kib_after: vm_pte_kib()?,
    };
    eprintln!(
        "vmm-standin[source]: hand-off to {} accepted ({}) in {} µs; VmPTE {} -> {} KiB",
        config.handoff_socket.display(),
        describe_fds(Role::Source),
        tracking.handoff_us,
        tracking.vm_pte_kib_before,
        tracking.vm_pte_kib_after
    );

    let hot = Arc::new(written.hot_set(config.seed));
    let zero_pages = pick_zero_pages(config.seed, &written, &hot);
    let mut vcpus = Some(DirtyingVcpus::start(&ram, &hot, &written, config)?);
    events.emit(&StandinEvent::Ready {
        pid: std::process::id(),
        page_size: ram.page_size,
        total_pages: ram.total_pages,
        zero_pages,
        tracking: Some(tracking),
    });

    let mut command_writes = 0u64;
    let mut page_buf = vec![0u8; ram.page_size as usize];
    // A page written by a command: new content each time (seed, page and
    // the count of command writes so far).
    let mut write_page = |page: u64| {
        pattern::command_page(config.seed, page, command_writes, &mut page_buf);
        command_writes += 1;
        ram.map.copy_in(ram.page_offset(page), &page_buf);
    };
    command_loop(commands, events, |command| match command {
        Command::Write(page) => {
            ram.check_page(page)?;
            write_page(page);
            events.emit(&StandinEvent::Written { page });
            Ok(())
        }
        Command::WriteRange { first, count } => {
            ram.check_range(first, count)?;
            (first..first + count).for_each(&mut write_page);
            events.emit(&StandinEvent::WrittenRange { first, count });
            Ok(())
        }
        Command::Pause => {
            let running = vcpus.take().ok_or("already paused")?;
            let writes = running.stop();
            let at_ns = monotonic_ns();
            link.send_event(VmmEvent::Paused { at_ns }).map_err(|e| format!("telling the agent: {e}"))?;
            events.emit(&StandinEvent::Paused { at_ns });
            eprintln!("vmm-standin[source]: paused after {writes} vCPU page writes");
            if let Some(path) = &config.snapshot {
                write_snapshot(&ram, path).map_err(|e| e.to_string())?;
                events.emit(&StandinEvent::SnapshotWritten { path: path.display().to_string() });
            }
            Ok(())
        }
        Command::Discard(pages) => {
            // A balloon on the source, during pre-copy: the source agent must
            // report the pages dirty (their content is now zeros).
            pages.iter().try_for_each(|&page| ram.check_page(page))?;
            for &page in &pages {
                let discarded = ram.map.discard(ram.page_offset(page), ram.page_size as usize, Discard::Remove);
                discarded.map_err(|e| format!("discarding page {page}: {e}"))?;
            }
            events.emit(&StandinEvent::Discarded { pages: pages.len() as u64 });
            Ok(())
        }
        Command::Resume
        | Command::Touch(_)
        | Command::TouchSpread { .. }
        | Command::TouchShared(_)
        | Command::Verify(_)
        | Command::VerifyMapped(_) => {
            Err("resume, touch, verify and verify-mapped are target-role commands".to_owned())
        }
        Command::Quit => Ok(()),
    })?;
    // Keep the descriptors (and the hand-off connection) alive until the end.
    drop((vcpus, link, pagemap, uffd));
    Ok(())
}

/// Writes every written non-hole page with its seed-derived content, in
/// parallel; the rest stays holes, never touched.
/// Each page that starts with data gets the seed's content, `marker` over
/// its first bytes.
fn fill_initial_content(ram: &GuestRam, written: &WrittenPages, seed: u64, vcpus: usize, marker: &[u8]) {
    let threads = vcpus.min(std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    std::thread::scope(|scope| {
        for first in 0..threads {
            scope.spawn(move || {
                let mut buf = vec![0u8; ram.page_size as usize];
                for index in (first as u64..written.len()).step_by(threads) {
                    let page = written.page(index);
                    if !written.is_initial_hole(seed, page) {
                        written.initial_page(seed, page, &mut buf);
                        let marked = marker.len().min(buf.len());
                        buf[..marked].copy_from_slice(&marker[..marked]);
                        ram.map.copy_in(ram.page_offset(page), &buf);
                    }
                }
            });
        }
    });
}

/// Up to [`ZERO_PAGES_REPORTED`] holes outside the hot set, spread over the
/// memory (so the vCPUs are unlikely to write them soon). In a sparse guest:
/// the page after each of the first clusters (never written at all).
fn pick_zero_pages(seed: u64, written: &WrittenPages, hot: &[u64]) -> Vec<u64> {
    let total_pages = written.page_count();
    if !written.is_dense() {
        let after = written.clusters().map(|(_, end)| end).filter(|&page| written.is_initial_hole(seed, page));
        return after.filter(|&page| page < total_pages).take(ZERO_PAGES_REPORTED).collect();
    }
    let mut picked: Vec<u64> = Vec::new();
    for slot in 0..ZERO_PAGES_REPORTED as u64 {
        let start = slot * total_pages / ZERO_PAGES_REPORTED as u64;
        let found = (0..total_pages).map(|i| (start + i) % total_pages).find(|&page| {
            pattern::is_initial_hole(seed, page) && hot.binary_search(&page).is_err() && !picked.contains(&page)
        });
        match found {
            Some(page) => picked.push(page),
            None => break,
        }
    }
    picked.sort_unstable();
    picked
}

/// Copies the whole (paused) memory into `path`. Holes of the memory file
/// are skipped without reading them (reading a hole through the mapping
/// would allocate it: a sparse 1 TiB guest would fill up), and all-zero
/// pages are left as holes in the file (they read back as zeros), which
/// saves the memory and the time of writing them.
fn write_snapshot(ram: &GuestRam, path: &Path) -> Result<(), VmmError> {
    let context = || format!("writing the snapshot {}", path.display());
    let file = File::create(path).map_err(io_context(context()))?;
    let mut ranges = Vec::new();
    data_ranges(ram.memfd.as_fd(), 0, ram.size(), |from, to| ranges.push((from as usize, to as usize)))
        .map_err(io_context("looking for the data of the guest memory (SEEK_DATA)"))?;
    let memory = File::from(ram.memfd.try_clone().map_err(io_context("duplicating the memfd"))?);
    for (from, to) in ranges {
        copy_range(ram, &memory, &file, from, to).map_err(io_context(context()))?;
    }
    file.set_len(ram.size()).map_err(io_context(context()))
}

/// Copies bytes [`from`, `to`) of the memory to the same place in `file`,
/// leaving all-zero pages out. The memory is read with `pread`, not through
/// the mapping: a hole read through the mapping would be allocated (and on
/// hugetlbfs, which has no SEEK_HOLE, every hole is in a "data" range), a
/// page the source agent would then see appear after the pause.
fn copy_range(ram: &GuestRam, memory: &File, file: &File, from: usize, to: usize) -> std::io::Result<()> {
    let page_size = ram.page_size as usize;
    let (from, size) = (from - from % page_size, to.next_multiple_of(page_size).min(ram.map.len()));
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES.min(size - from)];
    let mut offset = from;
    while offset < size {
        let len = buf.len().min(size - offset);
        memory.read_exact_at(&mut buf[..len], offset as u64)?;
        let chunk = &buf[..len];
        // Each run of non-zero pages is written with one call.
        let is_zero_page = |page: usize| is_zero(&chunk[page * page_size..(page + 1) * page_size]);
        let pages = len / page_size;
        let mut page = 0;
        while page < pages {
            while page < pages && is_zero_page(page) {
                page += 1;
            }
            let run_start = page;
            while page < pages && !is_zero_page(page) {
                page += 1;
            }
            if run_start < page {
                let run = &chunk[run_start * page_size..page * page_size];
                file.write_all_at(run, (offset + run_start * page_size) as u64)?;
            }
        }
        offset += len;
    }
    Ok(())
}

/// The calling process's page tables (`VmPTE` in `/proc/self/status`), KiB.
fn vm_pte_kib() -> Result<u64, VmmError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(io_context("reading /proc/self/status for VmPTE"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmPTE:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| VmmError::Config("no VmPTE line in /proc/self/status".into()))
}

/// vCPU threads writing 64 bytes at a time into random pages until stopped.
struct DirtyingVcpus {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl DirtyingVcpus {
    fn start(
        ram: &Arc<GuestRam>,
        hot: &Arc<Vec<u64>>,
        written: &WrittenPages,
        config: &StandinConfig,
    ) -> Result<Self, VmmError> {
        let mut vcpus =
            Self { stop: Arc::new(AtomicBool::new(false)), writes: Arc::new(AtomicU64::new(0)), threads: Vec::new() };
        let per_vcpu_rate = config.dirty_rate as f64 / config.vcpus as f64;
        for vcpu in 0..config.vcpus {
            let (ram, hot, stop, writes) = (ram.clone(), hot.clone(), vcpus.stop.clone(), vcpus.writes.clone());
            let written = *written;
            let rng = SplitMix64::new(pattern::derive(config.seed, Stream::SourceVcpu, vcpu as u64, 0));
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{vcpu}"))
                .spawn(move || dirty_until_stopped(&ram, (&written, &hot), rng, per_vcpu_rate, &stop, &writes))
                .map_err(io_context("starting a vCPU thread"))?;
            vcpus.threads.push(thread);
        }
        if config.hot_sweep_ms > 0 {
            let (ram, hot, stop, writes) = (ram.clone(), hot.clone(), vcpus.stop.clone(), vcpus.writes.clone());
            let rng = SplitMix64::new(pattern::derive(config.seed, Stream::SourceVcpu, config.vcpus as u64, 0));
            let every = Duration::from_millis(config.hot_sweep_ms);
            let thread = std::thread::Builder::new()
                .name("hot-sweep".into())
                .spawn(move || hot_sweep::sweep_until_stopped(&ram, &hot, rng, every, &stop, &writes))
                .map_err(io_context("starting the hot-sweep thread"))?;
            vcpus.threads.push(thread);
        }
        Ok(vcpus)
    }

    /// Stops and joins the vCPUs; returns how many page writes they made.
    fn stop(mut self) -> u64 {
        self.stop_and_join();
        self.writes.load(Ordering::Relaxed)
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("vmm-standin[source]: a vCPU thread panicked");
            }
        }
    }
}

impl Drop for DirtyingVcpus {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Longest sleep between checks of the stop flag.
const STOP_POLL: Duration = Duration::from_millis(10);

fn dirty_until_stopped(
    ram: &GuestRam,
    (written, hot): (&WrittenPages, &[u64]),
    mut rng: SplitMix64,
    rate: f64,
    stop: &AtomicBool,
    writes: &AtomicU64,
) {
    if rate <= 0.0 {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(STOP_POLL);
        }
        return;
    }
    // Small batches, paced against a schedule, so the rate holds on average
    // without sleeping after every write.
    let batch = ((rate / 500.0).ceil() as u64).clamp(1, 64);
    let interval = Duration::from_secs_f64(batch as f64 / rate);
    let chunks_per_page = ram.page_size / 64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            let page = written.pick_page(&mut rng, hot);
            let offset = ram.page_offset(page) + (rng.below(chunks_per_page) * 64) as usize;
            for word in 0..8 {
                ram.map.write_u64(offset + word * 8, rng.next_u64());
            }
        }
        writes.fetch_add(batch, Ordering::Relaxed);
        next += interval;
        loop {
            let now = Instant::now();
            if now >= next || stop.load(Ordering::Relaxed) {
                // Do not build up a burst after falling far behind.
                if now > next + Duration::from_millis(100) {
                    next = now;
                }
                break;
            }
            std::thread::sleep((next - now).min(STOP_POLL));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_cold_holes() {
        let hot = pattern::hot_set(9, 10_000);
        let zero = pick_zero_pages(9, &WrittenPages::dense(10_000), &hot);
        assert_eq!(zero.len(), ZERO_PAGES_REPORTED);
        for page in zero {
            assert!(pattern::is_initial_hole(9, page));
            assert!(hot.binary_search(&page).is_err());
        }
        // A tiny guest may have fewer holes than asked for.
        assert!(pick_zero_pages(9, &WrittenPages::dense(2), &[0]).len() <= 1);
        let sparse = WrittenPages::sparse(1 << 20, 1 << 10);
        let zero = pick_zero_pages(9, &sparse, &sparse.hot_set(9));
        assert_eq!(zero.len(), ZERO_PAGES_REPORTED);
        assert!(zero.iter().all(|&page| !sparse.contains(page)));
    }
}
