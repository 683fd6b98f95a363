//! The target stand-in when its agent stops resolving faults mid-migration
//! (the target agent failed): the guest freezes, its vCPUs blocked for ever,
//! some of them in the middle of a write. The test plays the agent with a
//! fault server that it stops.
//!
//! - `verify-mapped` compares exactly the pages the fault server resolved,
//!   finds them right, catches a page corrupted in the snapshot, and touches
//!   no other page (the fault server sees no fault from it);
//! - it still answers while every vCPU is blocked in a fault (no vCPU holds
//!   a lock it needs);
//! - `quit` ends the stand-in at once, with status 0, vCPUs blocked or not.

#![allow(clippy::unwrap_used)]

mod standin;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_memory::MemoryMap;
use guest_memory::handoff::{Role, receive_handoff};
use pageserver_test_support::{HandoffListener, HugePages, PATIENCE, TempDir};
use standin::{SamplePages, Standin, seed_fault_server, snapshot_and_precopy_even_pages};
use vmm_standin::StandinEvent;

const SEED: u64 = 5;
const VCPUS: usize = 3;
/// "At once", for a `quit` with vCPUs blocked: the stand-in must not wait
/// for them (they never come back).
const QUIT_PATIENCE: Duration = Duration::from_secs(5);

/// vCPU threads (named `vcpuN`) of process `pid` sleeping in a userfaultfd
/// fault (`handle_userfault` in their wait channel).
fn vcpus_blocked_in_faults(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| {
            let task = task.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?;
            let wchan = std::fs::read_to_string(task.join("wchan")).ok()?;
            (name.starts_with("vcpu") && wchan.trim() == "handle_userfault").then_some(())
        })
        .count()
}

fn verified_mapped(vm: &mut Standin, snapshot: &Path) -> (u64, u64, Vec<u64>) {
    match vm.request(&format!("verify-mapped {}", snapshot.display())) {
        StandinEvent::VerifiedMapped { mapped_pages, mismatched_pages, first_mismatches } => {
            (mapped_pages, mismatched_pages, first_mismatches)
        }
        other => panic!("expected verified-mapped, got {other:?}"),
    }
}

fn frozen_guest_verify_mapped_and_quit(hugetlb: bool) {
    let dir = TempDir::new("standin-frozen");
    let listener = HandoffListener::bind(dir.join("target.sock"));
    let (memory, size, page_size) = if hugetlb { ("32M", 32u64 << 20, 2u64 << 20) } else { ("4M", 4 << 20, 4096) };
    let total_pages = size / page_size;
    // A run far longer than the test: the vCPUs are still "running" (blocked) at `quit`.
    let mut extra = vec!["--vcpus", "3", "--seed", "5", "--run-ms", "600000"];
    if hugetlb {
        extra.push("--hugetlb");
    }
    let mut vm = Standin::spawn("target", memory, listener.path(), &extra);
    let handoff = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a valid hand-off");
    assert!(matches!(vm.event(), StandinEvent::Ready { .. }));

    // The source's memory as a snapshot; its even pages "pre-copied".
    let agent_map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, true).unwrap();
    let snapshot = dir.join("snapshot");
    let expected = snapshot_and_precopy_even_pages(&agent_map, SEED, page_size, &snapshot);
    let faults = seed_fault_server(handoff.uffd, handoff.layout.regions()[0], SEED);

    // Map a pre-copied page (MINOR), a missing one and a hole (MISSING),
    // and a page of every vCPU: comparing it needs that vCPU's undo log.
    let SamplePages { precopied, missing, hole } = SamplePages::find(SEED, total_pages);
    let mut touched = BTreeSet::from([precopied, missing, hole]);
    for vcpu in 0..VCPUS as u64 {
        if !touched.iter().any(|p| p % VCPUS as u64 == vcpu) {
            touched.insert(vcpu);
        }
    }
    let pages: Vec<String> = touched.iter().map(u64::to_string).collect();
    assert!(matches!(vm.request(&format!("touch {}", pages.join(" "))), StandinEvent::Touched { .. }));
    assert_eq!(faults.resolved_pages(), touched, "the touches faulted on exactly their pages");

    // verify-mapped compares exactly the pages the fault server resolved,
    // and touches no other: a fault it raised would have been resolved
    // before it answered, so its page would be in the server's set. (The
    // fault counters are no measure here: several vCPUs faulting on one
    // page leave messages that the server may still be working through.)
    assert_eq!(verified_mapped(&mut vm, &snapshot), (touched.len() as u64, 0, vec![]));
    assert_eq!(faults.resolved_pages(), touched, "verify-mapped faulted on an unmapped page");

    // A snapshot page that differs is caught if mapped, and not looked at if not.
    let never_mapped = (0..total_pages).find(|p| !touched.contains(p)).expect("a page never mapped");
    let mut corrupted = expected.clone();
    for page in [missing, never_mapped] {
        corrupted[(page * page_size) as usize + 16] ^= 0xa5;
    }
    let corrupted_path = dir.join("corrupted");
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    assert_eq!(verified_mapped(&mut vm, &corrupted_path), (touched.len() as u64, 1, vec![missing]));

    // The agent stops resolving faults; the resumed guest freezes.
    faults.stop();
    assert_eq!(vm.request("resume"), StandinEvent::Resumed, "resume answers at once");
    let pid = vm.process().id();
    let deadline = Instant::now() + PATIENCE;
    while vcpus_blocked_in_faults(pid) < VCPUS {
        assert!(Instant::now() < deadline, "only {} vCPUs blocked in a fault", vcpus_blocked_in_faults(pid));
        std::thread::sleep(Duration::from_millis(10));
    }

    // Commands are still served: no blocked vCPU holds an undo-log lock,
    // and pages the guest wrote before blocking are compared through
    // their undo copies.
    assert_eq!(verified_mapped(&mut vm, &snapshot), (touched.len() as u64, 0, vec![]));
    assert!(matches!(vm.request("resume"), StandinEvent::Error { .. }), "the guest is already running");

    // quit does not wait for the vCPUs.
    let asked = Instant::now();
    vm.send("quit");
    let status = vm.process().wait(QUIT_PATIENCE);
    assert!(status.success(), "quit with blocked vCPUs: {status}");
    assert!(asked.elapsed() < QUIT_PATIENCE);
}

#[test]
fn frozen_guest_verify_mapped_and_quit_shmem() {
    frozen_guest_verify_mapped_and_quit(false);
}

#[test]
fn frozen_guest_verify_mapped_and_quit_hugetlb() {
    let _huge_pages = HugePages::reserve(16);
    frozen_guest_verify_mapped_and_quit(true);
}
