//! The deterministic guest content both stand-ins and the tests derive from
//! the seed: which pages start as holes, what the others contain, which pages
//! are hot, and the PRNG the vCPUs draw from.

/// splitmix64's finaliser: a cheap, well-mixed 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Domains keep the streams derived from one seed independent.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Stream {
    Hole = 1,
    InitialContent = 2,
    HotSet = 3,
    SourceVcpu = 4,
    CommandWrite = 5,
    TargetVcpu = 6,
}

/// A hash of (seed, stream, a, b), usable as a PRNG seed.
pub fn derive(seed: u64, stream: Stream, a: u64, b: u64) -> u64 {
    let mut h = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    for v in [stream as u64, a, b] {
        h = mix64(h ^ v.wrapping_mul(GOLDEN_GAMMA).wrapping_add(0x632b_e59b_d9b4_e019));
    }
    h
}

/// splitmix64: small, fast, and good enough for test data.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform in `0..bound` (`bound` > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `buf` (a multiple of 8 bytes) with PRNG words.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next_u64().to_ne_bytes());
        }
    }
}

/// Whether page `page` starts as a hole (never written, all zeros): one page
/// in four.
pub fn is_initial_hole(seed: u64, page: u64) -> bool {
    derive(seed, Stream::Hole, page, 0) & 3 == 0 // hash % 4 == 0
}

/// The initial content of page `page` (zeros for a hole).
pub fn initial_page(seed: u64, page: u64, buf: &mut [u8]) {
    if is_initial_hole(seed, page) {
        buf.fill(0);
    } else {
        data_page(seed, page, buf);
    }
}

/// The initial content of page `page` if it is not a hole.
pub fn data_page(seed: u64, page: u64, buf: &mut [u8]) {
    SplitMix64::new(derive(seed, Stream::InitialContent, page, 0)).fill(buf);
}

/// The content `write P` puts in page `page` for the `counter`-th command:
/// never all zeros.
pub fn command_page(seed: u64, page: u64, counter: u64, buf: &mut [u8]) {
    SplitMix64::new(derive(seed, Stream::CommandWrite, page, counter)).fill(buf);
    if let Some(first) = buf.first_mut() {
        *first |= 1;
    }
}

/// The hot set: about 2% of the pages (at least one), sorted, distinct.
pub fn hot_set(seed: u64, total_pages: u64) -> Vec<u64> {
    let want = (total_pages / 50).max(1).min(total_pages);
    let mut rng = SplitMix64::new(derive(seed, Stream::HotSet, total_pages, 0));
    let mut pages: Vec<u64> = Vec::with_capacity(want as usize);
    while (pages.len() as u64) < want {
        let missing = want - pages.len() as u64;
        pages.extend((0..missing).map(|_| rng.below(total_pages)));
        pages.sort_unstable();
        pages.dedup();
    }
    pages
}

/// Picks the page of one guest access: 90% from the hot set, 10% uniform.
pub fn pick_page(rng: &mut SplitMix64, hot: &[u64], total_pages: u64) -> u64 {
    if !hot.is_empty() && rng.percent(90) { hot[rng.below(hot.len() as u64) as usize] } else { rng.below(total_pages) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_holes_are_a_quarter() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut holes = 0;
        for page in 0..4000 {
            initial_page(7, page, &mut a);
            initial_page(7, page, &mut b);
            assert_eq!(a, b);
            if is_initial_hole(7, page) {
                holes += 1;
                assert!(a.iter().all(|&x| x == 0));
            } else {
                assert!(a.iter().any(|&x| x != 0));
            }
        }
        assert!((800..1200).contains(&holes), "{holes} holes");
        initial_page(8, 1, &mut b);
        initial_page(7, 1, &mut a);
        assert_ne!(a, b, "another seed gives other content");
    }

    #[test]
    fn command_pages_differ_per_counter_and_are_not_zero() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        command_page(1, 5, 0, &mut a);
        command_page(1, 5, 1, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn hot_set_is_two_percent_and_distinct() {
        let hot = hot_set(3, 10_000);
        assert_eq!(hot.len(), 200);
        assert!(hot.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(hot_set(3, 10_000), hot);
        assert_eq!(hot_set(3, 1), vec![0]);
        assert_eq!(hot_set(3, 10).len(), 1);
    }
}
