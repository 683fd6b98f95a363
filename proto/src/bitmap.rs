//! The wire encoding of dirty bitmaps (`DirtyBitmapChunk`), both ways.
//!
//! A bitmap is a list of [`DirtyRun`]s: maximal runs of consecutive dirty
//! pages, sorted by (region, first index). On the wire each region's runs are
//! packed into `runs` as pairs `(gap, length)`:
//!
//! - `gap` counts clean pages from `base_index` (first pair of a chunk) or from
//!   the end of the previous run in the same chunk;
//! - a chunk holds runs of one region only, and at most
//!   [`MAX_RUNS_PER_CHUNK`] runs; a region with more runs continues in the
//!   next chunk, whose `base_index` restarts the counting (the encoder sets it
//!   to the end of the previous chunk's last run; the decoder accepts any
//!   value that does not go backwards);
//! - every chunk carries the same `epoch`, `paused` and `total_dirty_pages`;
//!   the last chunk of the stream has `last = true`, and a bitmap with no
//!   dirty page is one chunk with no runs.
//!
//! - a final bitmap's last chunk may carry a heat hint (`hot`, see
//!   [`crate::heat`]): an order for the target's pull, never part of the
//!   dirty set.
//!
//! [`encode_chunks`] is what the source agent sends; [`BitmapDecoder`] (or
//! [`decode_chunks`]) is what the target agent uses to read it back, checking
//! every chunk so that a corrupt or truncated stream is an error, never a
//! silently smaller set of dirty pages.
#![forbid(unsafe_code)]

use crate::heat::MAX_HOT_RUNS;
use crate::v1::{DirtyBitmapChunk, HotRun};
use guest_memory::GuestLayout;

/// Most runs (pairs) one chunk carries: 32768 runs are at most ~640 KiB.
pub const MAX_RUNS_PER_CHUNK: usize = 32_768;

/// `len` dirty pages from `first_index` on, in `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyRun {
    pub region: u32,
    pub first_index: u64,
    pub len: u64,
}

impl DirtyRun {
    /// Index one past the run's last page.
    pub fn end_index(&self) -> u64 {
        self.first_index.saturating_add(self.len)
    }
}

/// A decoded bitmap: the pages written after the epoch that was asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Ask `since_epoch = epoch` next time.
    pub epoch: u64,
    /// The VM was paused before the scan: this bitmap is final.
    pub paused: bool,
    /// The source's pause epoch when the scan started (0: running).
    pub pause_epoch: u64,
    /// Sorted, non-overlapping, adjacent runs merged.
    pub runs: Vec<DirtyRun>,
    /// The heat hint as received, unchecked ([`crate::heat::decode`] checks
    /// it); one run more than allowed at most, so that an oversized hint
    /// is still seen as one.
    pub hot: Vec<HotRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("dirty runs are not sorted: {next:?} comes after {previous:?}")]
    Unsorted { previous: DirtyRun, next: DirtyRun },
    #[error("chunk for region {region} has an odd number of run values ({values})")]
    OddRuns { region: u32, values: usize },
    #[error("chunk for region {region} overflows the page index")]
    IndexOverflow { region: u32 },
    #[error("chunk disagrees with the first chunk on {field} ({got} vs {first})")]
    Inconsistent { field: &'static str, first: u64, got: u64 },
    #[error("a chunk arrived after the last one")]
    AfterLast,
    #[error("the bitmap stream ended before its last chunk")]
    Incomplete,
    #[error("the bitmap claims {claimed} dirty pages but its runs hold {decoded}")]
    TotalMismatch { claimed: u64, decoded: u64 },
    #[error("the dirty runs hold more than u64::MAX pages in all")]
    TotalOverflow,
    #[error("dirty run {run:?} does not fit the layout: {reason}")]
    OutsideLayout { run: DirtyRun, reason: String },
}

impl DirtyBitmap {
    /// Number of dirty pages (saturating; a decoded bitmap's runs add up
    /// without overflow, [`BitmapDecoder::finish`] checks it).
    pub fn page_count(&self) -> u64 {
        self.runs.iter().fold(0u64, |total, r| total.saturating_add(r.len))
    }

    /// The runs as (first global page, length), checked against `layout`.
    pub fn global_runs(&self, layout: &GuestLayout) -> Result<Vec<(u64, u64)>, BitmapError> {
        self.runs
            .iter()
            .map(|run| {
                let outside = |reason: String| BitmapError::OutsideLayout { run: *run, reason };
                let pages = layout.region_pages(run.region).map_err(|e| outside(e.to_string()))?;
                if run.end_index() > pages || run.first_index.checked_add(run.len).is_none() {
                    return Err(outside(format!("region {} has {pages} pages", run.region)));
                }
                let first = layout.region_first_page(run.region).map_err(|e| outside(e.to_string()))?;
                Ok((first + run.first_index, run.len))
            })
            .collect()
    }

    /// Every dirty page's global number, checked against `layout`.
    pub fn global_pages(&self, layout: &GuestLayout) -> Result<Vec<u64>, BitmapError> {
        Ok(self.global_runs(layout)?.into_iter().flat_map(|(first, len)| first..first + len).collect())
    }
}

/// Sum of the runs' lengths, unless it overflows.
fn total_pages(runs: &[DirtyRun]) -> Result<u64, BitmapError> {
    runs.iter().try_fold(0u64, |total, r| total.checked_add(r.len)).ok_or(BitmapError::TotalOverflow)
}

/// Appends `run` to sorted `runs`, merging it with the previous run if they
/// touch. A run that ends past `u64::MAX` is an error.
fn push_run(runs: &mut Vec<DirtyRun>, run: DirtyRun) -> Result<(), BitmapError> {
    if run.len == 0 {
        return Ok(());
    }
    if run.first_index.checked_add(run.len).is_none() {
        return Err(BitmapError::IndexOverflow { region: run.region });
    }
    if let Some(previous) = runs.last_mut() {
        let in_order =
            run.region > previous.region || (run.region == previous.region && run.first_index >= previous.end_index());
        if !in_order {
            return Err(BitmapError::Unsorted { previous: *previous, next: run });
        }
        if run.region == previous.region && run.first_index == previous.end_index() {
            previous.len += run.len;
            return Ok(());
        }
    }
    runs.push(run);
    Ok(())
}

/// Encodes sorted, non-overlapping `runs` as the chunks of one bitmap stream.
pub fn encode_chunks(epoch: u64, paused: bool, runs: &[DirtyRun]) -> Result<Vec<DirtyBitmapChunk>, BitmapError> {
    let mut merged = Vec::with_capacity(runs.len());
    for run in runs {
        push_run(&mut merged, *run)?;
    }
    let total_dirty_pages = total_pages(&merged)?;
    let empty_chunk = |region: u32, base_index: u64| DirtyBitmapChunk {
        epoch,
        paused,
        region,
        runs: Vec::new(),
        base_index,
        total_dirty_pages,
        last: false,
        // The source's pause fence is the caller's to set on every chunk,
        // and the heat hint its to add to the last one.
        pause_epoch: 0,
        hot: Vec::new(),
    };

    let mut chunks: Vec<DirtyBitmapChunk> = Vec::new();
    let mut current: Option<DirtyBitmapChunk> = None;
    // End of the previous run in the current chunk (where the next gap starts).
    let mut cursor = 0u64;
    for run in &merged {
        let continues = current.as_ref().is_some_and(|c| c.region == run.region);
        let full = current.as_ref().is_some_and(|c| c.runs.len() / 2 >= MAX_RUNS_PER_CHUNK);
        if !continues || full {
            chunks.extend(current.take());
            if !continues {
                cursor = 0;
            }
            current = Some(empty_chunk(run.region, cursor));
        }
        if let Some(chunk) = current.as_mut() {
            chunk.runs.push(run.first_index - cursor);
            chunk.runs.push(run.len);
        }
        cursor = run.end_index();
    }
    chunks.extend(current);
    if chunks.is_empty() {
        chunks.push(empty_chunk(0, 0));
    }
    if let Some(last) = chunks.last_mut() {
        last.last = true;
    }
    Ok(chunks)
}

/// Reads a bitmap stream chunk by chunk.
#[derive(Debug, Default)]
pub struct BitmapDecoder {
    /// (epoch, paused, total_dirty_pages, pause_epoch) of the first chunk.
    header: Option<(u64, bool, u64, u64)>,
    runs: Vec<DirtyRun>,
    hot: Vec<HotRun>,
    finished: bool,
}

impl BitmapDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one chunk; returns true if it was the last one.
    pub fn push(&mut self, chunk: &DirtyBitmapChunk) -> Result<bool, BitmapError> {
        if self.finished {
            return Err(BitmapError::AfterLast);
        }
        let header = (chunk.epoch, chunk.paused, chunk.total_dirty_pages, chunk.pause_epoch);
        let (epoch, paused, total, pause_epoch) = *self.header.get_or_insert(header);
        for (field, first, got) in [
            ("epoch", epoch, chunk.epoch),
            ("paused", u64::from(paused), u64::from(chunk.paused)),
            ("total_dirty_pages", total, chunk.total_dirty_pages),
            ("pause_epoch", pause_epoch, chunk.pause_epoch),
        ] {
            if first != got {
                return Err(BitmapError::Inconsistent { field, first, got });
            }
        }
        let region = chunk.region;
        let pairs = chunk.runs.chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return Err(BitmapError::OddRuns { region, values: chunk.runs.len() });
        }
        let mut cursor = chunk.base_index;
        for pair in pairs {
            let (gap, len) = (pair[0], pair[1]);
            let first_index = cursor.checked_add(gap).ok_or(BitmapError::IndexOverflow { region })?;
            cursor = first_index.checked_add(len).ok_or(BitmapError::IndexOverflow { region })?;
            push_run(&mut self.runs, DirtyRun { region, first_index, len })?;
        }
        let room = (MAX_HOT_RUNS + 1).saturating_sub(self.hot.len());
        self.hot.extend(chunk.hot.iter().take(room).cloned());
        self.finished = chunk.last;
        Ok(chunk.last)
    }

    /// The whole bitmap, once the last chunk was pushed.
    pub fn finish(self) -> Result<DirtyBitmap, BitmapError> {
        let (epoch, paused, claimed, pause_epoch) = match (self.finished, self.header) {
            (true, Some(header)) => header,
            _ => return Err(BitmapError::Incomplete),
        };
        let decoded = total_pages(&self.runs)?;
        let bitmap = DirtyBitmap { epoch, paused, pause_epoch, runs: self.runs, hot: self.hot };
        if decoded != claimed {
            return Err(BitmapError::TotalMismatch { claimed, decoded });
        }
        Ok(bitmap)
    }
}

/// Decodes a whole bitmap stream.
pub fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a DirtyBitmapChunk>) -> Result<DirtyBitmap, BitmapError> {
    let mut decoder = BitmapDecoder::new();
    for chunk in chunks {
        decoder.push(chunk)?;
    }
    decoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(region: u32, first_index: u64, len: u64) -> DirtyRun {
        DirtyRun { region, first_index, len }
    }

    fn round_trip(runs: &[DirtyRun]) -> (Vec<DirtyBitmapChunk>, DirtyBitmap) {
        let chunks = encode_chunks(7, true, runs).expect("encodes");
        let bitmap = decode_chunks(&chunks).expect("decodes");
        (chunks, bitmap)
    }

    #[test]
    fn round_trip_several_regions() {
        let runs = [run(0, 0, 1), run(0, 3, 2), run(0, 100, 50), run(1, 0, 4), run(3, 9, 1)];
        let (chunks, bitmap) = round_trip(&runs);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].runs, vec![0, 1, 2, 2, 95, 50]);
        assert!(chunks.iter().all(|c| c.epoch == 7 && c.paused && c.total_dirty_pages == 58));
        assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
        assert!(chunks[2].last);
        assert_eq!(
            bitmap,
            DirtyBitmap { epoch: 7, paused: true, pause_epoch: 0, runs: runs.to_vec(), hot: Vec::new() }
        );
    }

    /// The heat hint rides on the final chunk; however large a hostile
    /// stream makes it, the decoder keeps one run more than allowed, and
    /// the hint's own decoding refuses it: the dirty set is untouched.
    #[test]
    fn an_oversized_heat_hint_is_bounded_and_leaves_the_runs_alone() {
        let mut chunks = encode_chunks(7, true, &[run(0, 1, 2)]).expect("encodes");
        let hot = HotRun { region: 0, first_index: 1, len: 1, heat: 9 };
        chunks[0].hot = vec![hot; 3 * MAX_HOT_RUNS];
        let bitmap = decode_chunks(&chunks).expect("decodes");
        assert_eq!(bitmap.runs, vec![run(0, 1, 2)]);
        assert_eq!(bitmap.hot.len(), MAX_HOT_RUNS + 1);
        assert_eq!(
            crate::heat::decode(&bitmap.hot, &one_region(4)),
            Err(crate::heat::HotHintError::TooManyRuns { runs: MAX_HOT_RUNS + 1 })
        );
    }

    fn one_region(pages: u64) -> GuestLayout {
        GuestLayout::new(vec![guest_memory::RegionLayout {
            base_host_virt_addr: 0,
            size: 4096 * pages,
            offset: 0,
            page_size: 4096,
        }])
        .expect("layout")
    }

    #[test]
    fn adjacent_runs_are_merged() {
        let (_, bitmap) = round_trip(&[run(0, 2, 3), run(0, 5, 1)]);
        assert_eq!(bitmap.runs, vec![run(0, 2, 4)]);
    }

    #[test]
    fn empty_bitmap_is_one_last_chunk() {
        let (chunks, bitmap) = round_trip(&[]);
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].last && chunks[0].runs.is_empty() && chunks[0].total_dirty_pages == 0);
        assert!(bitmap.runs.is_empty());
        assert_eq!(bitmap.epoch, 7);
    }

    #[test]
    fn chunk_boundaries_restart_counting_at_base_index() {
        // Every other page dirty: one run per page, more than two chunks' worth.
        let runs: Vec<_> = (0..2 * MAX_RUNS_PER_CHUNK as u64 + 5).map(|i| run(1, 10 + 2 * i, 1)).collect();
        let (chunks, bitmap) = round_trip(&runs);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.runs.len() <= 2 * MAX_RUNS_PER_CHUNK));
        assert_eq!(chunks[0].base_index, 0);
        assert_eq!(chunks[1].base_index, 10 + 2 * (MAX_RUNS_PER_CHUNK as u64 - 1) + 1);
        assert_eq!(chunks[1].runs[..2], [1, 1]);
        assert_eq!(bitmap.runs, runs);
        let layout = GuestLayout::new(vec![
            guest_memory::RegionLayout { base_host_virt_addr: 0, size: 4096 * 4, offset: 0, page_size: 4096 },
            guest_memory::RegionLayout {
                base_host_virt_addr: 1 << 30,
                size: 4096 * 200_000,
                offset: 4096 * 4,
                page_size: 4096,
            },
        ])
        .expect("layout");
        let pages = bitmap.global_pages(&layout).expect("fits");
        assert_eq!(pages.len(), runs.len());
        assert_eq!(pages[0], 4 + 10);
    }

    #[test]
    fn corrupt_streams_are_errors() {
        let chunks = encode_chunks(3, false, &[run(0, 1, 1), run(1, 1, 1)]).expect("encodes");
        assert_eq!(decode_chunks(&chunks[..1]), Err(BitmapError::Incomplete));
        let mut odd = chunks.clone();
        odd[0].runs.push(1);
        assert!(matches!(decode_chunks(&odd), Err(BitmapError::OddRuns { .. })));
        let mut epochs = chunks.clone();
        epochs[1].epoch = 4;
        assert!(matches!(decode_chunks(&epochs), Err(BitmapError::Inconsistent { field: "epoch", .. })));
        let mut total = chunks.clone();
        for c in &mut total {
            c.total_dirty_pages = 5;
        }
        assert_eq!(decode_chunks(&total), Err(BitmapError::TotalMismatch { claimed: 5, decoded: 2 }));
        let twice: Vec<_> = chunks.iter().chain(chunks.iter()).cloned().collect();
        assert!(matches!(decode_chunks(&twice), Err(BitmapError::AfterLast | BitmapError::Unsorted { .. })));
        let backwards = [run(0, 5, 1), run(0, 2, 1)];
        assert!(matches!(encode_chunks(1, false, &backwards), Err(BitmapError::Unsorted { .. })));
    }

    /// Found by `tests/fuzz_bitmap.rs`: runs in two regions whose lengths add
    /// up past `u64::MAX` overflowed the total (a panic with overflow checks,
    /// a wrapped total without).
    #[test]
    fn totals_past_u64_max_are_errors() {
        let mut chunks = encode_chunks(7, false, &[run(0, 0, 1), run(1, 0, 1)]).expect("encodes");
        chunks[0].runs[1] = u64::MAX;
        assert_eq!(decode_chunks(&chunks), Err(BitmapError::TotalOverflow));
        for chunk in &mut chunks {
            chunk.total_dirty_pages = 0; // what the wrapped sum was
        }
        assert_eq!(decode_chunks(&chunks), Err(BitmapError::TotalOverflow));
        let huge = [run(0, 0, u64::MAX), run(1, 0, 1)];
        assert_eq!(encode_chunks(1, false, &huge), Err(BitmapError::TotalOverflow));
        let bitmap = DirtyBitmap { epoch: 1, paused: false, pause_epoch: 0, runs: huge.to_vec(), hot: Vec::new() };
        assert_eq!(bitmap.page_count(), u64::MAX);
    }

    /// Found by `tests/fuzz_bitmap.rs`: the encoder took a run ending past
    /// `u64::MAX` and sent a chunk its own decoder refuses.
    #[test]
    fn runs_ending_past_u64_max_are_not_encoded() {
        assert_eq!(encode_chunks(3, true, &[run(0, 1, u64::MAX)]), Err(BitmapError::IndexOverflow { region: 0 }));
        assert_eq!(encode_chunks(3, true, &[run(0, u64::MAX, 1)]), Err(BitmapError::IndexOverflow { region: 0 }));
        assert!(encode_chunks(3, true, &[run(0, u64::MAX - 1, 1)]).is_ok());
    }

    #[test]
    fn runs_outside_the_layout_are_errors() {
        let layout = GuestLayout::new(vec![guest_memory::RegionLayout {
            base_host_virt_addr: 0,
            size: 4096 * 8,
            offset: 0,
            page_size: 4096,
        }])
        .expect("layout");
        let bitmap = DirtyBitmap { epoch: 2, paused: false, pause_epoch: 0, runs: vec![run(0, 6, 3)], hot: Vec::new() };
        assert!(matches!(bitmap.global_runs(&layout), Err(BitmapError::OutsideLayout { .. })));
        let bitmap = DirtyBitmap { epoch: 2, paused: false, pause_epoch: 0, runs: vec![run(1, 0, 1)], hot: Vec::new() };
        assert!(matches!(bitmap.global_runs(&layout), Err(BitmapError::OutsideLayout { .. })));
    }
}
