//! The heat hint of a final dirty bitmap (`DirtyBitmapChunk.hot`), both ways.
//!
//! The source counts, per page, the scans that found it dirty (its *heat*:
//! pages the guest rewrites in every pre-copy round are hot, pages written
//! once are not). With the final bitmap it names the hottest dirty pages,
//! hottest first, so that the target's background pull can fetch them
//! before the guest asks for them.
//!
//! The hint is only an order. Which pages are stale is decided by the
//! bitmap's runs alone: the target keeps only the hinted pages that the
//! bitmap marks dirty, and pulls every other stale page after them. A hint
//! that is missing, wrong, or refused (too large, outside the layout) can
//! therefore reorder the pull, never make a stale page fresh.
//!
//! Both sides bound it: the source sends at most [`MAX_HOT_RUNS`] runs and
//! [`MAX_HOT_PAGES`] pages ([`rank`]), and the target refuses anything
//! larger ([`decode`]), whatever the guest's size or the source's intent.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use guest_memory::GuestLayout;

use crate::v1::HotRun;

/// Most runs one hint carries (about 60 KiB on the wire).
pub const MAX_HOT_RUNS: usize = 4096;
/// Most pages one hint names: 256 MiB of 4 KiB pages, more than a pull
/// fetches before the guest's own faults tell it where to go.
pub const MAX_HOT_PAGES: u64 = 65_536;
/// The least heat worth a hint: a page found dirty by one scan only was
/// written once, not over and over.
pub const MIN_HOT_HEAT: u8 = 2;

/// `len` pages from `first_index` on, in `region`, each found dirty by
/// `heat` scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSpan {
    pub region: u32,
    pub first_index: u64,
    pub len: u64,
    pub heat: u8,
}

/// Orders `spans` hottest first (address order within one heat, as given)
/// and keeps what fits in [`MAX_HOT_RUNS`] runs and [`MAX_HOT_PAGES`] pages;
/// a span across the page bound is cut. Spans of zero pages are dropped.
pub fn rank(mut spans: Vec<HotSpan>) -> Vec<HotSpan> {
    spans.retain(|span| span.len > 0);
    spans.sort_by_key(|span| std::cmp::Reverse(span.heat));
    let mut budget = MAX_HOT_PAGES;
    let mut kept = Vec::with_capacity(spans.len().min(MAX_HOT_RUNS));
    for mut span in spans.into_iter().take(MAX_HOT_RUNS) {
        if budget == 0 {
            break;
        }
        span.len = span.len.min(budget);
        budget -= span.len;
        kept.push(span);
    }
    kept
}

/// The wire form of ranked spans.
pub fn encode(spans: &[HotSpan]) -> Vec<HotRun> {
    spans
        .iter()
        .map(|s| HotRun { region: s.region, first_index: s.first_index, len: s.len, heat: u32::from(s.heat) })
        .collect()
}

/// Why a hint is refused (the pull then goes in the target's own order).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotHintError {
    #[error("the hint has {runs} runs, more than the {MAX_HOT_RUNS} allowed")]
    TooManyRuns { runs: usize },
    #[error("the hint names more than the {MAX_HOT_PAGES} pages allowed")]
    TooManyPages,
    #[error("hot run {first_index}+{len} of region {region} does not fit the layout: {reason}")]
    OutsideLayout { region: u32, first_index: u64, len: u64, reason: String },
}

/// The hint's pages as global page numbers, hottest first (the order of
/// `runs` within one heat), each once; checked against `layout` and the
/// bounds before anything is expanded.
pub fn decode(runs: &[HotRun], layout: &GuestLayout) -> Result<Vec<u64>, HotHintError> {
    if runs.len() > MAX_HOT_RUNS {
        return Err(HotHintError::TooManyRuns { runs: runs.len() });
    }
    let total = runs.iter().try_fold(0u64, |total, run| total.checked_add(run.len));
    if total.is_none_or(|total| total > MAX_HOT_PAGES) {
        return Err(HotHintError::TooManyPages);
    }
    let mut located = Vec::with_capacity(runs.len());
    for run in runs {
        let outside = |reason: String| HotHintError::OutsideLayout {
            region: run.region,
            first_index: run.first_index,
            len: run.len,
            reason,
        };
        let pages = layout.region_pages(run.region).map_err(|e| outside(e.to_string()))?;
        if run.first_index.checked_add(run.len).is_none_or(|end| end > pages) {
            return Err(outside(format!("region {} has {pages} pages", run.region)));
        }
        let first = layout.region_first_page(run.region).map_err(|e| outside(e.to_string()))?;
        located.push((run.heat, first + run.first_index, run.len));
    }
    located.sort_by_key(|&(heat, _, _)| std::cmp::Reverse(heat));
    let mut seen = HashSet::new();
    Ok(located.into_iter().flat_map(|(_, first, len)| first..first + len).filter(|&page| seen.insert(page)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_memory::RegionLayout;

    fn layout() -> GuestLayout {
        GuestLayout::new(vec![
            RegionLayout { base_host_virt_addr: 0, size: 4096 * 10, offset: 0, page_size: 4096 },
            RegionLayout { base_host_virt_addr: 1 << 30, size: 4096 * 100, offset: 4096 * 10, page_size: 4096 },
        ])
        .expect("layout")
    }

    fn span(region: u32, first_index: u64, len: u64, heat: u8) -> HotSpan {
        HotSpan { region, first_index, len, heat }
    }

    #[test]
    fn round_trip_is_hottest_first_in_global_pages() {
        let ranked = rank(vec![span(0, 1, 2, 3), span(1, 5, 1, 9), span(1, 50, 2, 3), span(0, 8, 0, 200)]);
        assert_eq!(ranked, vec![span(1, 5, 1, 9), span(0, 1, 2, 3), span(1, 50, 2, 3)]);
        let pages = decode(&encode(&ranked), &layout()).expect("decodes");
        assert_eq!(pages, vec![15, 1, 2, 60, 61]);
    }

    #[test]
    fn the_target_orders_by_heat_and_drops_repeats() {
        let runs = encode(&[span(0, 0, 2, 2), span(0, 1, 3, 7)]);
        assert_eq!(decode(&runs, &layout()).expect("decodes"), vec![1, 2, 3, 0]);
    }

    #[test]
    fn the_source_bounds_what_it_sends() {
        let many: Vec<_> = (0..2 * MAX_HOT_RUNS as u64).map(|i| span(0, i, 1, (i % 200) as u8 + 2)).collect();
        let ranked = rank(many);
        assert_eq!(ranked.len(), MAX_HOT_RUNS);
        assert!(ranked.windows(2).all(|w| w[0].heat >= w[1].heat), "hottest first");
        assert_eq!(ranked[0].heat, 201);
        let huge = rank(vec![span(0, 0, u64::MAX, 5), span(1, 0, 3, 4)]);
        assert_eq!(huge, vec![span(0, 0, MAX_HOT_PAGES, 5)], "a span across the page bound is cut");
    }

    #[test]
    fn hostile_hints_are_refused() {
        let layout = layout();
        let runs = |spans: &[HotSpan]| encode(spans);
        let too_many: Vec<_> = (0..=MAX_HOT_RUNS as u64).map(|i| span(1, i % 100, 1, 3)).collect();
        assert_eq!(decode(&runs(&too_many), &layout), Err(HotHintError::TooManyRuns { runs: MAX_HOT_RUNS + 1 }));
        let pages = [span(1, 0, MAX_HOT_PAGES, 3), span(1, 0, 1, 3)];
        assert_eq!(decode(&runs(&pages), &layout), Err(HotHintError::TooManyPages));
        let wrapping = [span(1, 0, u64::MAX, 3), span(1, 0, 2, 3)];
        assert_eq!(decode(&runs(&wrapping), &layout), Err(HotHintError::TooManyPages));
        for outside in [span(1, 99, 2, 3), span(2, 0, 1, 3), span(0, u64::MAX, 1, 3)] {
            assert!(
                matches!(decode(&runs(&[outside]), &layout), Err(HotHintError::OutsideLayout { .. })),
                "{outside:?}"
            );
        }
        assert_eq!(decode(&[], &layout), Ok(Vec::new()));
    }
}
