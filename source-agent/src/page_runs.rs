//! Sets of pages as sorted runs (`Range<u64>` of page numbers): what the
//! removed-page watch keeps instead of a flag per page, so that its memory
//! and its work at every scan follow the pages that hold data, not the
//! size of the guest (a 1 TiB guest with 4 GiB written is a few runs).
#![forbid(unsafe_code)]

use std::ops::Range;

/// Sorted, non-overlapping, non-adjacent, non-empty runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRuns(Vec<Range<u64>>);

impl PageRuns {
    /// The runs of `ranges`, in any order, overlapping or not.
    pub fn from_unsorted(mut ranges: Vec<Range<u64>>) -> Self {
        ranges.retain(|r| r.start < r.end);
        ranges.sort_unstable_by_key(|r| r.start);
        let mut runs: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match runs.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => runs.push(range),
            }
        }
        Self(runs)
    }

    pub fn runs(&self) -> &[Range<u64>] {
        &self.0
    }

    /// Whether a run holds `page`.
    pub fn contains(&self, page: u64) -> bool {
        let at = self.0.partition_point(|run| run.end <= page);
        self.0.get(at).is_some_and(|run| run.start <= page)
    }

    /// Calls `f` with each run of `range` that no run of `self` covers.
    pub fn gaps_in(&self, range: Range<u64>, mut f: impl FnMut(Range<u64>)) {
        let mut at = range.start;
        let first = self.0.partition_point(|run| run.end <= range.start);
        for run in &self.0[first..] {
            if run.start >= range.end {
                break;
            }
            if run.start > at {
                f(at..run.start);
            }
            at = at.max(run.end);
        }
        if at < range.end {
            f(at..range.end);
        }
    }

    /// Calls `f` with each run of `self` that `other` does not cover.
    pub fn minus(&self, other: &PageRuns, mut f: impl FnMut(Range<u64>)) {
        for run in &self.0 {
            other.gaps_in(run.clone(), &mut f);
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of runs that happen to hold one
mod tests {
    use super::PageRuns;

    fn gaps(runs: &PageRuns, range: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
        let mut found = Vec::new();
        runs.gaps_in(range, |gap| found.push(gap));
        found
    }

    #[test]
    fn unsorted_overlapping_and_adjacent_ranges_merge() {
        let runs = PageRuns::from_unsorted(vec![10..12, 0..2, 2..3, 11..15, 7..7, 20..21]);
        assert_eq!(runs.runs(), [0..3, 10..15, 20..21]);
    }

    #[test]
    fn gaps_are_what_no_run_covers() {
        let runs = PageRuns::from_unsorted(vec![2..4, 6..8]);
        assert_eq!(gaps(&runs, 0..10), [0..2, 4..6, 8..10]);
        assert_eq!(gaps(&runs, 3..7), [4..6]);
        assert_eq!(gaps(&runs, 2..4), Vec::<std::ops::Range<u64>>::new());
        assert_eq!(gaps(&PageRuns::default(), 5..9), [5..9]);
    }

    #[test]
    fn contains_only_pages_inside_runs() {
        let runs = PageRuns::from_unsorted(vec![2..4, 6..8]);
        let inside: Vec<u64> = (0..10).filter(|&page| runs.contains(page)).collect();
        assert_eq!(inside, [2, 3, 6, 7]);
        assert!(!PageRuns::default().contains(0));
    }

    #[test]
    fn minus_leaves_the_uncovered_parts() {
        let before = PageRuns::from_unsorted(vec![0..10, 20..30]);
        let after = PageRuns::from_unsorted(vec![0..3, 5..10, 25..40]);
        let mut gone = Vec::new();
        before.minus(&after, |run| gone.push(run));
        assert_eq!(gone, [3..5, 20..25]);
    }
}
