//! The target-role stand-in with the test as its fault handler: the test
//! receives the hand-off, "pre-copies" some pages into the memory file,
//! resolves MINOR faults with UFFDIO_CONTINUE and MISSING ones with
//! UFFDIO_COPY, and checks `touch`, `resume` (with the undo log) and
//! `verify` against a snapshot it wrote.

#![allow(clippy::unwrap_used)]

mod standin;

use std::os::fd::AsFd;

use guest_memory::MemoryMap;
use guest_memory::handoff::{Role, receive_handoff};
use pageserver_test_support::{HandoffListener, HugePages, TempDir};
use standin::{SamplePages, Standin, seed_fault_server, snapshot_and_precopy_even_pages};
use vmm_standin::StandinEvent;

const SEED: u64 = 11;

fn target_faults_touch_resume_verify(hugetlb: bool) {
    let dir = TempDir::new("standin-target");
    let listener = HandoffListener::bind(dir.join("target.sock"));
    let (memory, size, page_size) = if hugetlb { ("32M", 32u64 << 20, 2u64 << 20) } else { ("4M", 4 << 20, 4096) };
    let total_pages = size / page_size;
    let mut extra = vec!["--vcpus", "3", "--seed", "11", "--run-ms", "200", "--max-written-pages", "64"];
    if hugetlb {
        extra.push("--hugetlb");
    }
    let mut vm = Standin::spawn("target", memory, listener.path(), &extra);
    let handoff = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a valid hand-off");
    assert_eq!(handoff.layout.total_pages(), total_pages);
    assert!(handoff.pagemap.is_some(), "the target VMM hands over its pagemap (for a takeover)");
    let StandinEvent::Ready { zero_pages, .. } = vm.event() else { panic!("expected ready") };
    assert!(zero_pages.is_empty());

    // The expected memory, as a snapshot file; "pre-copy" its even pages.
    let agent_map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, true).unwrap();
    let snapshot = dir.join("snapshot");
    let expected = snapshot_and_precopy_even_pages(&agent_map, SEED, page_size, &snapshot);

    // MISSING faults get the expected content, as if fetched.
    let faults = seed_fault_server(handoff.uffd, handoff.layout.regions()[0], SEED);

    // Every vCPU reads a pre-copied page, a page still missing and a hole.
    let SamplePages { precopied, missing, hole } = SamplePages::find(SEED, total_pages);
    let StandinEvent::Touched { first_access_done_ns } = vm.request(&format!("touch {precopied} {missing} {hole}"))
    else {
        panic!("expected touched")
    };
    assert!(first_access_done_ns > 0);
    assert!(faults.minor_faults() >= 1, "the pre-copied page raised a MINOR fault");
    assert!(faults.missing_faults() >= 2, "the other two raised MISSING faults");

    // The guest runs, writes pages, and the undo log keeps their old content.
    assert_eq!(vm.request("resume"), StandinEvent::Resumed, "resume answers at once");
    let StandinEvent::GuestDone { first_access_done_ns: after_run, accesses, pages_written, pages_touched } =
        vm.event()
    else {
        panic!("expected guest-done")
    };
    // Every page written was touched; no page is counted twice.
    assert!(
        pages_written <= pages_touched && pages_touched <= total_pages.min(accesses),
        "{pages_touched} pages touched, {pages_written} written, {accesses} accesses"
    );
    assert_eq!(after_run, first_access_done_ns, "the first access stays the first");
    assert!(accesses > 0);
    assert!((1..=64).contains(&pages_written), "{pages_written} pages written");
    // Verifying reads every page, so the pages the guest did not happen to
    // touch are faulted in (and filled) too.
    let verified = vm.request(&format!("verify {}", snapshot.display()));
    assert_eq!(
        verified,
        StandinEvent::Verified {
            verified_pages: total_pages,
            hole_pages: 0,
            mismatched_pages: 0,
            first_mismatches: vec![]
        }
    );
    let mut live = vec![0u8; size as usize];
    agent_map.copy_out(0, &mut live);
    let differing = live.chunks(page_size as usize).zip(expected.chunks(page_size as usize)).filter(|(a, b)| a != b);
    let differing = differing.count() as u64;
    assert!((1..=pages_written).contains(&differing), "{differing} pages differ, {pages_written} written");

    // A snapshot that differs in one page is caught.
    let bad_page = total_pages / 2 + 1;
    let mut corrupted = expected.clone();
    corrupted[(bad_page * page_size) as usize + 8] ^= 0x5a;
    let corrupted_path = dir.join("corrupted");
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    assert_eq!(
        vm.request(&format!("verify {}", corrupted_path.display())),
        StandinEvent::Verified {
            verified_pages: total_pages,
            hole_pages: 0,
            mismatched_pages: 1,
            first_mismatches: vec![bad_page]
        }
    );

    // Bad requests are answered, and the stand-in goes on.
    std::fs::write(dir.join("short"), b"short").unwrap();
    assert!(matches!(vm.request(&format!("verify {}/short", dir.path().display())), StandinEvent::Error { .. }));
    assert!(matches!(vm.request(&format!("touch {total_pages}")), StandinEvent::Error { .. }));
    assert!(matches!(vm.request("write 1"), StandinEvent::Error { .. }));
    assert!(vm.finish(true), "quit exits with 0");
    faults.stop();
}

#[test]
fn target_faults_touch_resume_verify_shmem() {
    target_faults_touch_resume_verify(false);
}

#[test]
fn target_faults_touch_resume_verify_hugetlb() {
    let _huge_pages = HugePages::reserve(16);
    target_faults_touch_resume_verify(true);
}
