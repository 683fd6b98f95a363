//! The target-role stand-in with the test as its fault handler: the test
//! receives the hand-off, "pre-copies" some pages into the memory file,
//! resolves MINOR faults with UFFDIO_CONTINUE and MISSING ones with
//! UFFDIO_COPY, and checks `touch`, `resume` (with the undo log) and
//! `verify` against a snapshot it wrote.

#![allow(clippy::unwrap_used)]

mod harness;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memory::handoff::{Role, receive_handoff};
use guest_memory::sys::{MemoryMap, UffdError, UffdEvent, Userfaultfd};
use harness::{HandoffListener, Standin, reserve_huge_pages, standin_args};
use pageserver_demo::process::WorkDir;
use pageserver_demo::vmm::pattern;
use pageserver_demo::vmm::protocol::StandinEvent;

const SEED: u64 = 11;

#[derive(Default)]
struct FaultCounts {
    minor: AtomicU64,
    missing: AtomicU64,
}

/// Resolves faults forever: MINOR ones (the page is in the file) with
/// UFFDIO_CONTINUE, MISSING ones (a hole) with UFFDIO_COPY of the expected
/// content. Concurrent faults on one page race: EEXIST means another fault
/// won, so the waiters are woken.
fn serve_faults(uffd: Userfaultfd, base: u64, page_size: u64, counts: Arc<FaultCounts>) {
    let mut events = [UffdEvent::Other { event: 0 }; 16];
    let mut content = vec![0u8; page_size as usize];
    loop {
        let n = uffd.read_events(&mut events).expect("reading faults");
        for event in &events[..n] {
            let UffdEvent::PageFault(fault) = event else { panic!("unexpected {event:?}") };
            let page = (fault.address - base) / page_size;
            let addr = base + page * page_size;
            let result = if fault.is_minor() {
                counts.minor.fetch_add(1, Ordering::Relaxed);
                uffd.continue_range(addr, page_size, true)
            } else {
                counts.missing.fetch_add(1, Ordering::Relaxed);
                pattern::initial_page(SEED, page, &mut content);
                uffd.copy(addr, &content, true)
            };
            match result {
                Ok(_) => {}
                Err(UffdError::Exists { .. }) => uffd.wake(addr, page_size).expect("UFFDIO_WAKE"),
                Err(e) => panic!("resolving a fault on page {page}: {e}"),
            }
        }
    }
}

fn target_faults_touch_resume_verify(hugetlb: bool) {
    let dir = WorkDir::create().unwrap();
    let listener = HandoffListener::bind(&dir, "target.sock");
    let (memory, size, page_size) = if hugetlb { ("32M", 32u64 << 20, 2u64 << 20) } else { ("4M", 4 << 20, 4096) };
    let total_pages = size / page_size;
    let mut extra = vec!["--vcpus", "3", "--seed", "11", "--run-ms", "200", "--max-written-pages", "64"];
    if hugetlb {
        extra.push("--hugetlb");
    }
    let mut vm = Standin::spawn(dir.path(), "target", &standin_args("target", memory, &listener.path, &extra));
    let handoff = receive_handoff(listener.accept(), Role::Target).expect("a valid hand-off");
    assert_eq!(handoff.layout.total_pages(), total_pages);
    assert!(handoff.pagemap.is_none());
    let StandinEvent::Ready { zero_pages, .. } = vm.event() else { panic!("expected ready") };
    assert!(zero_pages.is_empty());

    // The expected memory, as a snapshot file; "pre-copy" its even pages.
    let agent_map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, true).unwrap();
    let snapshot = dir.path().join("snapshot");
    let mut expected = vec![0u8; size as usize];
    for (page, chunk) in expected.chunks_exact_mut(page_size as usize).enumerate() {
        pattern::initial_page(SEED, page as u64, chunk);
        if page % 2 == 0 && !pattern::is_initial_hole(SEED, page as u64) {
            agent_map.copy_in(page * page_size as usize, chunk);
        }
    }
    std::fs::write(&snapshot, &expected).unwrap();

    let counts = Arc::new(FaultCounts::default());
    let base = handoff.layout.regions()[0].base_host_virt_addr;
    let (uffd, handler_counts) = (handoff.uffd, counts.clone());
    // Detached: it blocks in read(2) until the test process ends.
    std::thread::spawn(move || serve_faults(uffd, base, page_size, handler_counts));

    // Every vCPU reads a pre-copied page, a page still missing and a hole.
    let find = |pred: &dyn Fn(u64) -> bool| (0..total_pages).find(|&p| pred(p)).expect("such a page");
    let precopied = find(&|p| p % 2 == 0 && !pattern::is_initial_hole(SEED, p));
    let missing = find(&|p| p % 2 == 1 && !pattern::is_initial_hole(SEED, p));
    let hole = find(&|p| pattern::is_initial_hole(SEED, p));
    let StandinEvent::Touched { first_access_done_ns } = vm.request(&format!("touch {precopied} {missing} {hole}"))
    else {
        panic!("expected touched")
    };
    assert!(first_access_done_ns > 0);
    assert!(counts.minor.load(Ordering::Relaxed) >= 1, "the pre-copied page raised a MINOR fault");
    assert!(counts.missing.load(Ordering::Relaxed) >= 2, "the other two raised MISSING faults");

    // The guest runs, writes pages, and the undo log keeps their old content.
    let StandinEvent::GuestDone { first_access_done_ns: after_run, accesses, pages_written } = vm.request("resume")
    else {
        panic!("expected guest-done")
    };
    assert_eq!(after_run, first_access_done_ns, "the first access stays the first");
    assert!(accesses > 0);
    assert!((1..=64).contains(&pages_written), "{pages_written} pages written");
    let mut live = vec![0u8; size as usize];
    agent_map.copy_out(0, &mut live);
    let differing = live.chunks(page_size as usize).zip(expected.chunks(page_size as usize)).filter(|(a, b)| a != b);
    let differing = differing.count() as u64;
    assert!((1..=pages_written).contains(&differing), "{differing} pages differ, {pages_written} written");

    let verified = vm.request(&format!("verify {}", snapshot.display()));
    assert_eq!(
        verified,
        StandinEvent::Verified { verified_pages: total_pages, mismatched_pages: 0, first_mismatches: vec![] }
    );

    // A snapshot that differs in one page is caught.
    let bad_page = total_pages / 2 + 1;
    let mut corrupted = expected.clone();
    corrupted[(bad_page * page_size) as usize + 8] ^= 0x5a;
    let corrupted_path = dir.path().join("corrupted");
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    assert_eq!(
        vm.request(&format!("verify {}", corrupted_path.display())),
        StandinEvent::Verified { verified_pages: total_pages, mismatched_pages: 1, first_mismatches: vec![bad_page] }
    );

    // Bad requests are answered, and the stand-in goes on.
    std::fs::write(dir.path().join("short"), b"short").unwrap();
    assert!(matches!(vm.request(&format!("verify {}/short", dir.path().display())), StandinEvent::Error { .. }));
    assert!(matches!(vm.request(&format!("touch {total_pages}")), StandinEvent::Error { .. }));
    assert!(matches!(vm.request("write 1"), StandinEvent::Error { .. }));
    assert!(vm.finish(true), "quit exits with 0");
}

#[test]
fn target_faults_touch_resume_verify_shmem() {
    target_faults_touch_resume_verify(false);
}

#[test]
fn target_faults_touch_resume_verify_hugetlb() {
    let _huge_pages = reserve_huge_pages(16);
    target_faults_touch_resume_verify(true);
}
