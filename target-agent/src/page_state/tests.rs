//! Every transition and every refusal of the page-state machine.

use super::*;

/// A fault on `page` that must be resolved locally.
fn local(states: &PageStates, page: u64, minor: bool) -> LocalResolution {
    match states.on_fault(page, minor) {
        FaultAction::Local(resolution) => resolution,
        other => panic!("page {page}: expected a local resolution, got {other:?}"),
    }
}

fn fetch(states: &PageStates, page: u64) -> Claim {
    match states.on_fault(page, true) {
        FaultAction::Fetch(claim) => claim,
        other => panic!("page {page}: expected to own the fetch, got {other:?}"),
    }
}

fn sum(counts: [u64; 6]) -> u64 {
    counts.iter().sum()
}

#[test]
fn a_new_guest_is_all_unknown_holes() {
    let s = PageStates::new(5);
    assert_eq!(s.counts(), [5, 0, 0, 0, 0, 0]);
    assert!((0..5).all(|p| !s.is_present(p)));
}

#[test]
fn a_fault_on_an_unknown_page_claims_it_for_demand() {
    let s = PageStates::new(4);
    let claim = fetch(&s, 2);
    assert_eq!((claim.page(), claim.was_known(), claim.origin()), (2, false, FetchOrigin::Demand));
    assert_eq!(s.state(2), PageState::FetchingUnknown);
}

#[test]
fn a_claim_is_exclusive_and_later_faults_wait() {
    let s = PageStates::new(4);
    let claim = s.claim(1, FetchOrigin::Background).expect("unknown pages can be claimed");
    assert_eq!(s.claim(1, FetchOrigin::Background), None, "a second claim is refused");
    assert_eq!(s.on_fault(1, true), FaultAction::Wait { known: false });
    assert_eq!(s.on_fault(1, false), FaultAction::Wait { known: false });
    s.finish_fetch(claim).expect("the holder finishes");
    assert_eq!(s.state(1), PageState::Installed);
}

#[test]
fn finishing_a_fetch_installs_and_marks_present() {
    let s = PageStates::new(4);
    let claim = fetch(&s, 3);
    assert!(!s.is_present(3));
    assert_eq!(s.finish_fetch(claim), Ok(()));
    assert_eq!(s.state(3), PageState::Installed);
    assert!(s.is_present(3));
}

#[test]
fn installed_is_final() {
    let s = PageStates::new(2);
    s.finish_fetch(fetch(&s, 0)).expect("install");
    assert_eq!(s.claim(0, FetchOrigin::Demand), None, "an installed page is never fetched again");
    assert_eq!(s.claim(0, FetchOrigin::Background), None);
    assert_eq!(s.apply_final_bitmap(&[0]), Vec::<u64>::new(), "the bitmap does not touch it");
    assert_eq!(s.state(0), PageState::Installed);
    // Faults on it (the VMM zapped its mapping) are resolved locally.
    let r = local(&s, 0, true);
    assert_eq!(r.fill(), LocalFill::Continue);
    assert!(!s.finish_local(r), "it was installed already");
    assert_eq!(s.state(0), PageState::Installed);
}

#[test]
fn the_final_bitmap_marks_stale_first_and_spares_claimed_pages() {
    let s = PageStates::new(6);
    let early = fetch(&s, 2); // a fault before the bitmap
    let stale = s.apply_final_bitmap(&[1, 2, 4]);
    assert_eq!(stale, vec![1, 4], "page 2 was claimed already");
    let states: Vec<PageState> = (0..6).map(|p| s.state(p)).collect();
    use PageState::*;
    assert_eq!(states, vec![Fresh, Stale, FetchingUnknown, Fresh, Stale, Fresh]);
    assert_eq!(s.finish_fetch(early), Ok(()), "the early claim still finishes");
    assert_eq!(s.state(2), Installed);
}

#[test]
fn stale_pages_are_claimed_as_known() {
    let s = PageStates::new(3);
    s.apply_final_bitmap(&[1]);
    let claim = fetch(&s, 1);
    assert!(claim.was_known());
    assert_eq!(s.state(1), PageState::FetchingStale);
    assert_eq!(s.on_fault(1, true), FaultAction::Wait { known: true });
    assert_eq!(s.finish_fetch(claim), Ok(()));
}

#[test]
fn fresh_pages_are_never_claimed() {
    let s = PageStates::new(3);
    s.set_present(0);
    s.apply_final_bitmap(&[]);
    assert_eq!(s.claim(0, FetchOrigin::Background), None);
    assert_eq!(s.claim(1, FetchOrigin::Demand), None);
}

#[test]
fn a_minor_fault_on_a_fresh_page_continues_it() {
    let s = PageStates::new(2);
    s.set_present(0);
    s.apply_final_bitmap(&[]);
    let r = local(&s, 0, true);
    assert_eq!((r.page(), r.fill()), (0, LocalFill::Continue));
    assert!(s.finish_local(r));
    assert_eq!(s.state(0), PageState::Installed);
}

#[test]
fn a_missing_fault_on_a_fresh_hole_zero_fills_it() {
    let s = PageStates::new(2);
    s.apply_final_bitmap(&[]);
    let r = local(&s, 1, false);
    assert_eq!(r.fill(), LocalFill::ZeroFill);
    assert!(s.finish_local(r));
    assert_eq!(s.state(1), PageState::Installed);
    assert!(s.is_present(1), "a zero fill allocates the page");
}

#[test]
fn a_missing_fault_on_an_installed_page_zero_fills_it() {
    // The VMM punched the page out after it was installed (MADV_REMOVE):
    // the kernel's MISSING is the truth, not our PRESENT flag.
    let s = PageStates::new(1);
    s.finish_fetch(fetch(&s, 0)).expect("install");
    assert_eq!(local(&s, 0, false).fill(), LocalFill::ZeroFill);
}

#[test]
fn a_finished_claim_for_a_page_in_another_state_is_refused() {
    let s = PageStates::new(2);
    s.finish_fetch(fetch(&s, 0)).expect("install");
    // Only this module makes claims, so a claim for a page that is not
    // being fetched can only be forged here, in its own tests.
    let forged = Claim { page: 0, from: PageState::Stale, origin: FetchOrigin::Background };
    assert_eq!(
        s.finish_fetch(forged),
        Err(ClaimMismatch { page: 0, from: PageState::FetchingStale, actual: PageState::Installed })
    );
}

#[test]
fn fresh_runs_skip_holes_claims_and_stale_pages() {
    let s = PageStates::new(10);
    for p in [0, 1, 2, 4, 5, 7, 8, 9] {
        s.set_present(p);
    }
    let claimed = fetch(&s, 8);
    s.apply_final_bitmap(&[5]);
    let runs: Vec<(u64, u64)> = s.fresh_present_runs().iter().map(|r| (r.first(), r.end())).collect();
    assert_eq!(runs, vec![(0, 3), (4, 5), (7, 8), (9, 10)]);
    let _ = claimed;
}

#[test]
fn a_fresh_run_installs_only_what_is_still_fresh() {
    let s = PageStates::new(4);
    (0..4).for_each(|p| s.set_present(p));
    s.apply_final_bitmap(&[]);
    let runs = s.fresh_present_runs();
    assert_eq!(runs.len(), 1);
    // A fault installs page 1 between the scan and the bulk install.
    assert!(s.finish_local(local(&s, 1, true)));
    let installed: u64 = runs.into_iter().map(|r| s.finish_fresh_run(r)).sum();
    assert_eq!(installed, 3);
    assert_eq!(s.counts()[PageState::Installed as usize], 4);
}

#[test]
fn counts_always_cover_every_page() {
    let s = PageStates::new(8);
    let a = fetch(&s, 0);
    let _b = s.claim(6, FetchOrigin::Background);
    s.apply_final_bitmap(&[1, 2]);
    s.finish_fetch(a).expect("install");
    let counts = s.counts();
    assert_eq!(sum(counts), 8);
    // unknown, fresh (3, 4, 5, 7), stale (1, 2), fetching unknown (6), fetching stale, installed (0)
    assert_eq!(counts, [0, 4, 2, 1, 0, 1]);
    assert_eq!(s.fetching(), 1);
}

/// The counts as the page bytes say, one by one.
fn recount(s: &PageStates) -> [u64; 6] {
    let mut counts = [0u64; 6];
    for page in 0..s.len() {
        counts[s.state(page) as usize] += 1;
    }
    counts
}

/// The kept counts follow every kind of transition, made from several
/// threads at once: faults (fetched, local, zero-filled), background
/// claims, the final bitmap, bulk runs and a takeover's installs.
#[test]
fn kept_counts_equal_a_recount_after_concurrent_transitions() {
    let s = PageStates::new(4096);
    for page in (0..4096).step_by(3) {
        s.set_present(page);
    }
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let s = &s;
            scope.spawn(move || {
                for page in (thread..2048).step_by(4) {
                    match s.on_fault(page, page % 2 == 0) {
                        FaultAction::Fetch(claim) if page % 8 != 1 => s.finish_fetch(claim).expect("owner"),
                        FaultAction::Local(resolution) => {
                            s.finish_local(resolution);
                        }
                        _ => {}
                    }
                }
            });
        }
        scope.spawn(|| {
            for page in 1024..3072 {
                if let Some(claim) = s.claim(page, FetchOrigin::Background) {
                    s.finish_fetch(claim).expect("owner");
                }
            }
        });
    });
    let dirty: Vec<u64> = (2048..4096).step_by(5).collect();
    s.apply_final_bitmap(&dirty);
    assert_eq!(s.counts(), recount(&s), "after the bitmap");
    for run in s.fresh_present_runs() {
        s.finish_fresh_run(run);
    }
    for page in (3072..4096).filter(|page| page % 7 == 0) {
        match s.on_fault(page, false) {
            FaultAction::Local(resolution) => {
                s.finish_local(resolution);
            }
            FaultAction::Fetch(claim) => s.finish_fetch(claim).expect("owner"),
            FaultAction::Wait { .. } => {}
        }
    }
    assert_eq!(s.counts(), recount(&s), "at the end");
    assert_eq!(sum(s.counts()), 4096);
    let taken = PageStates::new(16);
    taken.take_over(&[1, 5, 9]);
    assert_eq!(taken.counts(), recount(&taken));
    assert_eq!(taken.counts()[PageState::Installed as usize], 3);
}

#[test]
fn concurrent_faults_fetch_a_page_exactly_once() {
    let s = std::sync::Arc::new(PageStates::new(64));
    let owners: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = &s;
                scope.spawn(move || {
                    let mut owned = 0;
                    for page in 0..64 {
                        if let FaultAction::Fetch(claim) = s.on_fault(page, true) {
                            owned += 1;
                            s.finish_fetch(claim).expect("only the owner finishes");
                        }
                    }
                    owned
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic")).collect()
    });
    assert_eq!(owners.iter().sum::<u64>(), 64, "each page owned by exactly one fault: {owners:?}");
    assert_eq!(s.counts()[PageState::Installed as usize], 64);
}

#[test]
fn a_removed_page_is_never_pulled_and_a_hole_there_is_zeros() {
    let s = PageStates::new(4);
    s.set_present(1);
    s.set_present(2);
    assert_eq!(s.apply_final_bitmap(&[0, 1]), [0, 1]);
    for page in [0, 1, 2] {
        s.mark_removed(page);
    }
    // The background pull leaves removed stale pages alone.
    assert!(s.claim(0, FetchOrigin::Background).is_none());
    assert!(s.claim(1, FetchOrigin::Background).is_none());
    // The bulk install leaves removed fresh pages alone.
    assert!(s.fresh_present_runs().iter().all(|run| !(run.first()..run.end()).contains(&2)));
    // Punched out (MISSING): zeros by the VMM's doing, a local zero fill.
    let zero = local(&s, 0, false);
    assert_eq!(zero.fill(), LocalFill::ZeroFill);
    assert!(s.finish_local(zero));
    assert_eq!(s.state(0), PageState::Installed);
    // Only unmapped (MINOR: the page cache holds our stale copy): fetched.
    let claim = fetch(&s, 1);
    assert!(claim.was_known());
    assert_eq!(sum(s.counts()), 4);
}
