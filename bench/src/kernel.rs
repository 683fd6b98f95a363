//! What the kernel allows in-process, with nothing of the agents in the way:
//!
//! - a minimal fault handler (block in `read`, `UFFDIO_CONTINUE`): the
//!   fastest a fresh page can be served on a minor fault;
//! - one `PAGEMAP_SCAN` pass that finds and re-protects the written pages of
//!   a write-protected (WP-async) mapping: the fastest dirty tracking reads;
//! - the size of an encoded dirty bitmap (`DirtyBitmapChunk`s), the least a
//!   bitmap costs on the wire.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use guest_memory::handoff::Role;
use guest_memory::memfile::{ftruncate, memfd_create};
use guest_memory::page_tables::scan_written;
use guest_memory::sys::Discard;
use guest_memory::uffd::{EventBuffer, RegisterMode, features};
use guest_memory::{MemoryMap, RegionLayout, UffdError, UffdEvent, Userfaultfd};
use pageserver_proto::bitmap::{DirtyRun, encode_chunks};
use prost::Message;

use crate::plot::Distribution;
use crate::{BenchOptions, BenchReport, stats};

/// Every mapping here is of 4 KiB shmem pages.
const PAGE: u64 = 4096;
/// The guest of the bitmap rows: 4 GiB of 4 KiB pages.
const BITMAP_GUEST_PAGES: u64 = (4 << 30) / PAGE;
/// Dirty pages come in runs of this many in the clustered bitmap.
const CLUSTER_PAGES: u64 = 64;
/// Ranges one PAGEMAP_SCAN ioctl may return: the source agent's batch.
const SCAN_BATCH_REGIONS: usize = 4096;

/// Measures the kernel rows: `baseline_fresh_fault_p50_us`,
/// `dirty_scan_gib_s`, `bitmap_bytes_per_gib_scattered` and
/// `bitmap_bytes_per_gib_clustered`. A row that fails does not keep the
/// others from being measured; the error names every one that failed.
pub fn measure(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    let reps = opts.repetitions();
    let fault_bytes = if opts.quick { 16 << 20 } else { 64 << 20 };
    let fault = fresh_fault_p50_us(fault_bytes, reps);
    if let Ok(f) = &fault {
        report.note(format!(
            "baseline_fresh_fault_p50_us: {:.1} µs from the handler's read of the event to UFFDIO_CONTINUE done (what \
             the target agent's fault histogram measures); {:.1} µs seen by the faulting thread (fault, wake-up and \
             the other CPU included)",
            f.handler_side, f.guest_side
        ));
        report.distributions.push(Distribution::of_samples("floor: minimal handler, fresh", &f.spans));
    }
    let mut failed = Vec::new();
    let mut record = |key: &str, figure: anyhow::Result<f64>| match figure {
        Ok(value) => report.set(key, value),
        Err(e) => failed.push(format!("{key}: {e:#}")),
    };
    record("baseline_fresh_fault_p50_us", fault.map(|f| f.handler_side));
    record("dirty_scan_gib_s", dirty_scan_gib_s(opts.large_guest_bytes(), reps));
    record("bitmap_bytes_per_gib_scattered", scattered_bitmap_bytes_per_gib());
    record("bitmap_bytes_per_gib_clustered", clustered_bitmap_bytes_per_gib());
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// The latency of a minor fault served by the smallest possible handler,
/// in µs (the median over `reps` of each pass's p50): a shmem memfd of
/// `bytes` is filled through one mapping, so that every page is in the page
/// cache, and read through a second mapping registered for MINOR faults. A
/// handler thread blocks in `read` on the userfaultfd and answers each fault
/// with `UFFDIO_CONTINUE` of its page (waking the faulting thread); this
/// thread reads one word of every page in order and times each read. An
/// agent's fresh fault does this plus its own bookkeeping: this is its floor.
fn fresh_fault_p50_us(bytes: u64, reps: usize) -> anyhow::Result<FaultLatency> {
    let pages = bytes / PAGE;
    // One more page at the end: touched last, it tells the handler to stop.
    let len = (pages + 1) * PAGE;
    let map_len = usize::try_from(len).context("the memfd does not fit the address space")?;
    let memfd = shmem_file("pageserver-bench-fresh-fault", len)?;
    {
        let fill = MemoryMap::map(memfd.as_fd(), 0, map_len, true).context("mapping the memfd to fill it")?;
        for page in 0..=pages {
            fill.write_u64((page * PAGE) as usize, page + 1);
        }
    }
    let guest = MemoryMap::map(memfd.as_fd(), 0, map_len, false).context("mapping the memfd as the guest")?;
    let uffd = Userfaultfd::create(features::MINOR_SHMEM).context("creating a userfaultfd with MINOR_SHMEM")?;
    uffd.register(guest.addr(), len, RegisterMode::MINOR).context("registering the guest mapping for MINOR faults")?;
    let sentinel = pages * PAGE;

    std::thread::scope(|scope| {
        let handler = scope.spawn(|| serve_minor_faults(&uffd, guest.addr(), len, guest.addr() + sentinel));
        let release = ReleaseHandler { guest: &guest, sentinel: sentinel as usize };
        let passes = time_first_reads(&guest, pages, reps);
        drop(release);
        let (handled, spans) =
            handler.join().map_err(|_| anyhow!("the fault handler panicked"))?.context("the fault handler")?;
        let p50s = passes?;
        let expected = pages * reps as u64 + 1;
        if handled != expected {
            bail!("the handler served {handled} faults, {expected} were expected (one per page and pass)");
        }
        let guest_side = stats::median(&p50s).context("no pass measured")?;
        let handler_side = stats::median(&spans).context("no fault served")?;
        Ok(FaultLatency { handler_side, guest_side, spans })
    })
}

/// A fault's latency seen from the handler (event read to `UFFDIO_CONTINUE`
/// done: what the target agent's fault histogram measures) and from the
/// faulting thread (its read, fault and wake-up included), p50, µs.
struct FaultLatency {
    handler_side: f64,
    guest_side: f64,
    /// Every fault's handler-side span, µs.
    spans: Vec<f64>,
}

/// `reps` passes over the first `pages` pages of `guest`, each page read
/// once (one word) and timed; returns the p50 of each pass in µs. Between
/// passes the mapping's page-table entries are dropped (`MADV_DONTNEED`), so
/// that every read faults again; the file keeps its pages.
fn time_first_reads(guest: &MemoryMap, pages: u64, reps: usize) -> anyhow::Result<Vec<f64>> {
    let mut p50s = Vec::with_capacity(reps);
    let mut samples = Vec::with_capacity(pages as usize);
    for pass in 0..reps {
        if pass > 0 {
            guest.discard(0, (pages * PAGE) as usize, Discard::DontNeed).context("dropping the guest's page tables")?;
        }
        samples.clear();
        let mut wrong = 0u64;
        for page in 0..pages {
            let start = Instant::now();
            let word = guest.read_u64((page * PAGE) as usize);
            samples.push(start.elapsed().as_secs_f64() * 1e6);
            wrong += u64::from(word != page + 1);
        }
        if wrong > 0 {
            bail!("{wrong} pages read back wrong in pass {pass}");
        }
        p50s.extend(stats::quantile(&samples, 0.5));
    }
    Ok(p50s)
}

/// Reads the sentinel page when dropped, which stops the handler (also when
/// the measuring side fails or panics: the scope would otherwise wait for
/// the handler forever).
struct ReleaseHandler<'a> {
    guest: &'a MemoryMap,
    sentinel: usize,
}

impl Drop for ReleaseHandler<'_> {
    fn drop(&mut self) {
        self.guest.read_u64(self.sentinel);
    }
}

/// The minimal handler: blocking reads of the userfaultfd, one
/// `UFFDIO_CONTINUE` per fault, until the fault on `sentinel` is served.
/// Returns the number of faults served. On error it unregisters
/// [`base`, `base + len`) first, so that the kernel serves the remaining
/// reads itself and the measuring thread cannot hang.
fn serve_minor_faults(uffd: &Userfaultfd, base: u64, len: u64, sentinel: u64) -> anyhow::Result<(u64, Vec<f64>)> {
    let mut spans = Vec::new();
    let served = serve_until(uffd, sentinel, &mut spans);
    if served.is_err() {
        let _ = uffd.unregister(base, len);
    }
    Ok((served?, spans))
}

fn serve_until(uffd: &Userfaultfd, sentinel: u64, spans: &mut Vec<f64>) -> anyhow::Result<u64> {
    let mut buf = EventBuffer::new(16);
    let mut events = Vec::with_capacity(16);
    let mut served = 0u64;
    loop {
        events.clear();
        uffd.read_events(&mut buf, &mut events).context("reading the userfaultfd")?;
        let read = Instant::now();
        for event in &events {
            let UffdEvent::PageFault(fault) = event else { continue };
            let page = fault.address & !(PAGE - 1);
            match uffd.continue_range(page, PAGE, true) {
                Ok(_) => {}
                // Mapped meanwhile: only the waiting thread needs waking.
                Err(UffdError::Exists { .. }) => uffd.wake(page, PAGE).context("UFFDIO_WAKE")?,
                Err(e) => return Err(e).context("UFFDIO_CONTINUE"),
            }
            spans.push(read.elapsed().as_secs_f64() * 1e6);
            served += 1;
            if page == sentinel {
                return Ok(served);
            }
        }
    }
}

/// The rate of one dirty scan, in GiB of guest memory per second (the
/// median of `reps` scans): a shmem memfd of `bytes`, mapped and written
/// in full, is registered as the source VMM's guest memory is
/// ([`Userfaultfd::for_role`] with [`Role::Source`]: write-protect,
/// WP-async), write-protected, and scanned once so that nothing is left
/// written. Before each timed scan 1% of its pages are written (scattered,
/// a different set each time); the scan then walks `/proc/self/pagemap`
/// over the whole range with `PAGEMAP_SCAN`, reporting the written pages
/// and protecting them again, as the source agent's dirty tracking does,
/// with nothing else.
fn dirty_scan_gib_s(bytes: u64, reps: usize) -> anyhow::Result<f64> {
    let pages = bytes / PAGE;
    let map_len = usize::try_from(bytes).context("the guest does not fit the address space")?;
    let memfd = shmem_file("pageserver-bench-dirty-scan", bytes)?;
    let guest = MemoryMap::map(memfd.as_fd(), 0, map_len, true).context("mapping the guest")?;
    for page in 0..pages {
        guest.write_u64((page * PAGE) as usize, page);
    }
    let (base, end) = (guest.addr(), guest.addr() + bytes);
    let region = RegionLayout { base_host_virt_addr: base, size: bytes, offset: 0, page_size: PAGE };
    let uffd = Userfaultfd::for_role(Role::Source, &region).context("registering the guest for write-protect")?;
    uffd.write_protect(base, bytes).context("write-protecting the guest")?;
    let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut buf = Vec::with_capacity(SCAN_BATCH_REGIONS);
    scan_written(pagemap.as_fd(), base, end, &mut buf, |_, _| {}).context("the first scan")?;

    let mut rates = Vec::with_capacity(reps);
    for rep in 0..reps {
        let written = scattered(pages, pages / 100, 0x5eed + rep as u64);
        for &page in &written {
            guest.write_u64((page * PAGE) as usize, !page);
        }
        let mut found = 0u64;
        let start = Instant::now();
        scan_written(pagemap.as_fd(), base, end, &mut buf, |from, to| found += (to - from) / PAGE)
            .with_context(|| format!("scan {rep}"))?;
        let seconds = start.elapsed().as_secs_f64();
        if found != written.len() as u64 {
            bail!("scan {rep} found {found} written pages, {} were written", written.len());
        }
        rates.push(bytes as f64 / seconds / f64::from(1u32 << 30));
    }
    drop(uffd);
    stats::median(&rates).context("no scan measured")
}

/// The encoded size of the dirty bitmap of a 4 GiB guest of 4 KiB pages
/// with 1% of its pages dirty, each dirty page on its own (chosen at
/// random), in bytes per GiB of guest. The size is that of the
/// `DirtyBitmapChunk` messages [`encode_chunks`] makes, which is what the
/// source agent sends: no bitmap of these pages is smaller on the wire.
fn scattered_bitmap_bytes_per_gib() -> anyhow::Result<f64> {
    let runs = scattered_runs(BITMAP_GUEST_PAGES, BITMAP_GUEST_PAGES / 100, 0xb17);
    bitmap_bytes_per_gib(&runs).context("the scattered bitmap")
}

/// The same as [`scattered_bitmap_bytes_per_gib`] with the dirty pages in
/// runs of [`CLUSTER_PAGES`], as a guest writing whole buffers dirties them.
fn clustered_bitmap_bytes_per_gib() -> anyhow::Result<f64> {
    let runs = clustered_runs(BITMAP_GUEST_PAGES, BITMAP_GUEST_PAGES / 100, CLUSTER_PAGES, 0xc105);
    bitmap_bytes_per_gib(&runs).context("the clustered bitmap")
}

/// Bytes per GiB of the encoded chunks of `runs`, for the 4 GiB guest.
fn bitmap_bytes_per_gib(runs: &[DirtyRun]) -> anyhow::Result<f64> {
    let chunks = encode_chunks(1, false, runs).context("encoding the bitmap")?;
    let bytes: usize = chunks.iter().map(Message::encoded_len).sum();
    let gib = (BITMAP_GUEST_PAGES * PAGE) as f64 / f64::from(1u32 << 30);
    Ok(bytes as f64 / gib)
}

/// `dirty` single-page runs of region 0, at random among `pages`.
fn scattered_runs(pages: u64, dirty: u64, seed: u64) -> Vec<DirtyRun> {
    scattered(pages, dirty, seed).into_iter().map(|first_index| DirtyRun { region: 0, first_index, len: 1 }).collect()
}

/// `dirty` pages of region 0 among `pages` in runs of `cluster` pages (the
/// last run shorter if `cluster` does not divide `dirty`), each run starting
/// at a random multiple of `cluster`.
fn clustered_runs(pages: u64, dirty: u64, cluster: u64, seed: u64) -> Vec<DirtyRun> {
    let mut left = dirty;
    let slots = scattered(pages / cluster, dirty.div_ceil(cluster), seed);
    slots
        .into_iter()
        .map(|slot| {
            let len = left.min(cluster);
            left -= len;
            DirtyRun { region: 0, first_index: slot * cluster, len }
        })
        .collect()
}

/// `count` distinct numbers below `n`, pseudo-random from `seed`
/// (xorshift64*), ascending. The same arguments give the same numbers.
fn scattered(n: u64, count: u64, seed: u64) -> Vec<u64> {
    assert!(count <= n, "{count} distinct numbers below {n}");
    let mut chosen = vec![false; n as usize];
    // Any non-zero state will do; spread the seed's bits first.
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut picked = 0;
    while picked < count {
        let i = (next() % n) as usize;
        if !chosen[i] {
            chosen[i] = true;
            picked += 1;
        }
    }
    (0..n).filter(|&i| chosen[i as usize]).collect()
}

/// A shmem memfd of `len` bytes.
fn shmem_file(name: &str, len: u64) -> anyhow::Result<OwnedFd> {
    let memfd = memfd_create(name, false).context("memfd_create")?;
    ftruncate(memfd.as_fd(), len).with_context(|| format!("sizing the memfd to {len} bytes"))?;
    Ok(memfd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clustered_bitmaps_are_smaller_than_scattered_ones() {
        let scattered = scattered_bitmap_bytes_per_gib().expect("scattered");
        let clustered = clustered_bitmap_bytes_per_gib().expect("clustered");
        assert!(clustered > 0.0 && scattered > 0.0);
        assert!(clustered < scattered, "clustered {clustered} vs scattered {scattered}");
    }

    #[test]
    fn both_bitmaps_hold_the_same_pages() {
        let dirty = BITMAP_GUEST_PAGES / 100;
        let total = |runs: &[DirtyRun]| runs.iter().map(|r| r.len).sum::<u64>();
        assert_eq!(total(&scattered_runs(BITMAP_GUEST_PAGES, dirty, 1)), dirty);
        let clustered = clustered_runs(BITMAP_GUEST_PAGES, dirty, CLUSTER_PAGES, 2);
        assert_eq!(total(&clustered), dirty);
        assert!(clustered.iter().all(|r| r.first_index % CLUSTER_PAGES == 0 && r.end_index() <= BITMAP_GUEST_PAGES));
    }

    #[test]
    fn scattered_numbers_are_distinct_sorted_and_reproducible() {
        let picked = scattered(1000, 100, 7);
        assert_eq!(picked.len(), 100);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert!(picked.iter().all(|&i| i < 1000));
        assert_eq!(picked, scattered(1000, 100, 7));
        assert_ne!(picked, scattered(1000, 100, 8));
        assert_eq!(scattered(10, 10, 3), (0..10).collect::<Vec<_>>());
    }

    /// Needs a userfaultfd that sees kernel faults (root or CAP_SYS_PTRACE).
    #[test]
    fn a_small_fault_handler_serves_every_page() {
        let latency = fresh_fault_p50_us(64 * PAGE, 2).expect("faults served");
        assert!(latency.handler_side > 0.0 && latency.guest_side > 0.0);
    }

    #[test]
    fn a_small_dirty_scan_finds_the_written_pages() {
        let rate = dirty_scan_gib_s(8 << 20, 2).expect("scans");
        assert!(rate > 0.0);
    }
}
