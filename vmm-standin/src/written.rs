//! Which pages of the guest were ever written: all of them (a dense guest,
//! where a quarter of the pages are holes by [`pattern::is_initial_hole`]),
//! or a few clusters spread evenly over the address space (a sparse guest,
//! e.g. 4 GiB written of 1 TiB, `--written`), every other page a hole
//! that nobody ever touches.
//!
//! The vCPUs of both roles draw their pages from the written ones only, so
//! a sparse guest stays sparse: what a migration must move is what was
//! written, and the holes cost neither agent anything per page.

use crate::pattern;

/// At most this many clusters in a sparse guest.
const MAX_CLUSTERS: u64 = 64;

/// The written pages: `clusters` runs of `cluster_pages` pages, one every
/// `stride` pages from page 0. A dense guest is one cluster of every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenPages {
    total_pages: u64,
    clusters: u64,
    cluster_pages: u64,
    stride: u64,
}

impl WrittenPages {
    /// Every page (holes by the seed).
    pub fn dense(total_pages: u64) -> Self {
        Self { total_pages, clusters: 1, cluster_pages: total_pages, stride: total_pages.max(1) }
    }

    /// About `written_pages` pages in up to 64 clusters spread evenly over
    /// `total_pages` (rounded down to whole clusters, at least one page); all
    /// of `total_pages` if that many or more are asked for.
    pub fn sparse(total_pages: u64, written_pages: u64) -> Self {
        if written_pages >= total_pages {
            return Self::dense(total_pages);
        }
        let clusters = MAX_CLUSTERS.min(written_pages).max(1);
        let cluster_pages = (written_pages / clusters).max(1);
        Self { total_pages, clusters, cluster_pages, stride: total_pages / clusters }
    }

    /// Whether this is the dense guest (every page, holes by the seed).
    pub fn is_dense(&self) -> bool {
        self.clusters == 1 && self.cluster_pages == self.total_pages
    }

    /// How many pages were written (a dense guest: every page, holes included).
    pub fn len(&self) -> u64 {
        self.clusters * self.cluster_pages
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `index`-th written page (`index` < [`len`](Self::len)), ascending.
    pub fn page(&self, index: u64) -> u64 {
        (index / self.cluster_pages) * self.stride + index % self.cluster_pages
    }

    /// Whether `page` is in a written cluster.
    pub fn contains(&self, page: u64) -> bool {
        page / self.stride < self.clusters && page % self.stride < self.cluster_pages
    }

    /// The clusters as page ranges [first, end), ascending.
    pub fn clusters(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.clusters).map(|c| (c * self.stride, c * self.stride + self.cluster_pages))
    }

    /// Whether `page` starts as a hole: by the seed in a dense guest, outside
    /// the clusters in a sparse one (whose clusters are written in full).
    pub fn is_initial_hole(&self, seed: u64, page: u64) -> bool {
        if self.is_dense() { pattern::is_initial_hole(seed, page) } else { !self.contains(page) }
    }

    /// The initial content of `page` (zeros for a hole).
    pub fn initial_page(&self, seed: u64, page: u64, buf: &mut [u8]) {
        if self.is_initial_hole(seed, page) { buf.fill(0) } else { pattern::data_page(seed, page, buf) }
    }

    /// The guest's pages, written or not.
    pub fn page_count(&self) -> u64 {
        self.total_pages
    }

    /// The hot set ([`pattern::hot_set`]) drawn from the written pages.
    pub fn hot_set(&self, seed: u64) -> Vec<u64> {
        pattern::hot_set(seed, self.len()).into_iter().map(|index| self.page(index)).collect()
    }

    /// One guest access's page: 90% from `hot`, else any written page.
    /// The same draws as [`pattern::pick_page`] (in a dense guest, the
    /// same pages).
    pub fn pick_page(&self, rng: &mut pattern::SplitMix64, hot: &[u64]) -> u64 {
        if !hot.is_empty() && rng.percent(90) {
            hot[rng.below(hot.len() as u64) as usize]
        } else {
            self.page(rng.below(self.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_spread_and_indexed_in_order() {
        let written = WrittenPages::sparse(1 << 20, 64 * 16);
        assert!(!written.is_dense());
        assert_eq!(written.len(), 1024);
        assert_eq!(written.clusters().count(), 64);
        assert_eq!(written.page(0), 0);
        assert_eq!(written.page(16), 1 << 14);
        assert!((1..written.len()).all(|i| written.page(i - 1) < written.page(i)));
        assert!((0..written.len()).all(|i| written.contains(written.page(i))));
        assert!(!written.contains(16) && written.is_initial_hole(1, 16));
        assert!(!written.is_initial_hole(1, 15));
    }

    #[test]
    fn dense_is_every_page() {
        let written = WrittenPages::sparse(100, 200);
        assert!(written.is_dense());
        assert_eq!(written.len(), 100);
        assert!((0..100).all(|p| written.contains(p) && written.page(p) == p));
    }
}
