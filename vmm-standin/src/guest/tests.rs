//! A vCPU blocked for ever in a fault in the middle of its first write to a
//! page (the agent is gone) must not keep a verification from comparing its
//! other pages: it holds no lock while it faults.

#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use guest_memory::handoff::Role;
use guest_memory::uffd::EventBuffer;
use guest_memory::{MemoryMap, UffdEvent, Userfaultfd};
use pageserver_test_support::TempDir;

use super::TargetGuest;
use crate::config::{StandinConfig, StandinRole};
use crate::ram::GuestRam;
use crate::verify::{Scope, VerifyOutcome};

const PAGE: u64 = 4096;
const PAGES: u64 = 8;
/// Both owned by vCPU 0 of 2.
const MAPPED_PAGE: u64 = 2;
const BLOCKED_PAGE: u64 = 4;
const FIRST_WORD: u64 = 0x1234_5678;

#[test]
fn verify_mapped_answers_while_a_vcpu_is_blocked_in_a_write() {
    let dir = TempDir::new("standin-guest");
    let config = StandinConfig {
        written_bytes: None,
        role: StandinRole::Target,
        memory_bytes: PAGES * PAGE,
        hugetlb: false,
        vcpus: 2,
        seed: 1,
        handoff_socket: dir.join("unused.sock"),
        vm: "unit".into(),
        dirty_rate: 0,
        hot_sweep_ms: 0,
        snapshot: None,
        run_ms: 0,
        max_written_pages: PAGES,
        marker: Vec::new(),
    };
    let ram = GuestRam::create("unit-target", PAGES * PAGE, PAGE, false).unwrap();
    let base = ram.map.addr();
    let uffd = Userfaultfd::for_role(Role::Target, &ram.region()).unwrap();
    // The agent's copy of the userfaultfd, played by the test; nothing
    // resolves faults.
    let agent = Userfaultfd::from_handoff(uffd.as_fd().try_clone_to_owned().unwrap());
    agent.set_nonblocking().unwrap();

    // One page "pre-copied" into the file and mapped (no fault needed).
    let file = MemoryMap::map(ram.memfd.as_fd(), 0, (PAGES * PAGE) as usize, true).unwrap();
    file.write_u64((MAPPED_PAGE * PAGE) as usize, FIRST_WORD);
    agent.continue_range(base + MAPPED_PAGE * PAGE, PAGE, false).unwrap();
    let guest = Arc::new(TargetGuest::new(ram, uffd, &config));

    // vCPU 0 writes a hole: reading its old content faults, for ever.
    let vcpu = guest.clone();
    std::thread::spawn(move || vcpu.write_word(BLOCKED_PAGE, 0, 1));
    let (mut buf, mut faults) = (EventBuffer::new(1), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.is_empty() {
        assert!(Instant::now() < deadline, "the write did not fault");
        agent.read_events(&mut buf, &mut faults).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(faults[..], [UffdEvent::PageFault(f)] if f.address == base + BLOCKED_PAGE * PAGE), "{faults:?}");

    // verify-mapped needs vCPU 0's log for the mapped page, and gets it.
    let mut snapshot = vec![0u8; (PAGES * PAGE) as usize];
    snapshot[(MAPPED_PAGE * PAGE) as usize..][..8].copy_from_slice(&FIRST_WORD.to_ne_bytes());
    let path = dir.join("snapshot");
    std::fs::write(&path, &snapshot).unwrap();
    let (done, outcome) = channel();
    std::thread::spawn(move || done.send(guest.verify(&path, Scope::MappedPages).map_err(|e| e.to_string())));
    let outcome = outcome.recv_timeout(Duration::from_secs(10)).expect("verify-mapped waits for the blocked vCPU");
    assert_eq!(
        outcome,
        Ok(VerifyOutcome { compared_pages: 1, hole_pages: 0, mismatched_pages: 0, first_mismatches: vec![] })
    );
}
