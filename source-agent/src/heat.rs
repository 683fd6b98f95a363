//! Page heat: how many scans found each page dirty, and the hottest dirty
//! pages for the final bitmap's hint ([`pageserver_proto::heat`]).
//!
//! Heat costs one byte per page (a saturating `u8`: 256 KiB per GiB of
//! 4 KiB pages, 512 bytes per GiB of 2 MiB pages), next to the four bytes
//! of each page's last-dirty epoch. A page written over and over during
//! pre-copy is found dirty by every round's scan; the guest is likely to
//! touch it again soon after it resumes on the target, so the target's pull
//! fetches it first.
#![forbid(unsafe_code)]

use guest_memory::GuestLayout;
use pageserver_proto::heat::{HotSpan, MAX_HOT_PAGES, MIN_HOT_HEAT, rank};

/// Counts one more scan that found the page dirty.
pub fn warm(heat: &mut u8) {
    *heat = heat.saturating_add(1);
}

/// The hottest pages dirty since `since` (last-dirty epoch newer), with a
/// heat of at least [`MIN_HOT_HEAT`], ranked and bounded by [`rank`].
///
/// Two passes, so that the work and memory stay bounded by the hint, not
/// by the guest: a histogram of the dirty pages' heat finds the coolest
/// heat that still fits in [`MAX_HOT_PAGES`], then only spans at least that
/// hot are collected (at that heat itself, only as many pages as fit, in
/// address order).
pub fn hottest(layout: &GuestLayout, last_dirty: &[u32], heat: &[u8], since: u64) -> Vec<HotSpan> {
    let dirty_heat = |page: usize| match last_dirty.get(page) {
        Some(&epoch) if u64::from(epoch) > since => heat.get(page).copied().filter(|&h| h >= MIN_HOT_HEAT),
        _ => None,
    };
    let mut histogram = [0u64; 256];
    for page in 0..last_dirty.len() {
        if let Some(h) = dirty_heat(page) {
            histogram[usize::from(h)] += 1;
        }
    }
    // The coolest heat to keep, and how many pages of that heat fit.
    let mut cutoff = (u8::MAX, 0u64);
    let mut hotter = 0u64;
    for h in (MIN_HOT_HEAT..=u8::MAX).rev() {
        let here = histogram[usize::from(h)];
        if here == 0 {
            continue;
        }
        cutoff = (h, here.min(MAX_HOT_PAGES - hotter));
        hotter += cutoff.1;
        if hotter >= MAX_HOT_PAGES {
            break;
        }
    }
    let (coolest, mut coolest_budget) = cutoff;
    let mut spans: Vec<HotSpan> = Vec::new();
    for region in 0..layout.regions().len() as u32 {
        let first_page = layout.region_first_page(region).unwrap_or(0) as usize;
        let count = layout.region_pages(region).unwrap_or(0) as usize;
        for index in 0..count {
            let Some(h) = dirty_heat(first_page + index).filter(|&h| h >= coolest) else { continue };
            if h == coolest {
                if coolest_budget == 0 {
                    continue;
                }
                coolest_budget -= 1;
            }
            match spans.last_mut() {
                Some(last)
                    if last.region == region && last.heat == h && last.first_index + last.len == index as u64 =>
                {
                    last.len += 1
                }
                _ => spans.push(HotSpan { region, first_index: index as u64, len: 1, heat: h }),
            }
        }
    }
    rank(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_memory::RegionLayout;

    fn layout(pages: &[u64]) -> GuestLayout {
        let mut offset = 0;
        let regions = pages
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let region =
                    RegionLayout { base_host_virt_addr: (i as u64 + 1) << 32, size: 4096 * n, offset, page_size: 4096 };
                offset += 4096 * n;
                region
            })
            .collect();
        GuestLayout::new(regions).expect("layout")
    }

    #[test]
    fn heat_saturates() {
        let mut heat = 254;
        warm(&mut heat);
        assert_eq!(heat, 255);
        warm(&mut heat);
        assert_eq!(heat, 255);
    }

    #[test]
    fn only_dirty_pages_hot_enough_hottest_first() {
        let layout = layout(&[4, 4]);
        //                 region 0      | region 1
        let last_dirty = [5, 5, 5, 2, /**/ 5, 5, 5, 5];
        let heat = [3, 3, 1, 9, /*     */ 7, 3, 3, 2];
        let spans = hottest(&layout, &last_dirty, &heat, 4);
        let span = |region, first_index, len, heat| HotSpan { region, first_index, len, heat };
        // Page 3 is hot but not dirty since epoch 4; page 2 was dirty once;
        // runs do not cross regions nor heats.
        assert_eq!(spans, vec![span(1, 0, 1, 7), span(0, 0, 2, 3), span(1, 1, 2, 3), span(1, 3, 1, 2)]);
        assert!(hottest(&layout, &last_dirty, &heat, 5).is_empty(), "nothing dirty since the newest epoch");
    }

    #[test]
    fn a_huge_guest_gets_a_bounded_hint_of_its_hottest_pages() {
        let pages = 3 * MAX_HOT_PAGES;
        let layout = layout(&[pages]);
        let last_dirty = vec![2; pages as usize];
        // Every other page has heat 3, the rest 4 (at most 256K runs).
        let heat: Vec<u8> = (0..pages).map(|p| 3 + (p % 2) as u8).collect();
        let spans = hottest(&layout, &last_dirty, &heat, 1);
        assert_eq!(spans.iter().map(|s| s.len).sum::<u64>(), pageserver_proto::heat::MAX_HOT_RUNS as u64);
        assert!(spans.iter().all(|s| s.heat == 4), "only the hottest when they fill the hint");
        assert_eq!(spans.len(), pageserver_proto::heat::MAX_HOT_RUNS);
    }
}
