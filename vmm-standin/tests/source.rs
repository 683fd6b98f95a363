//! The source-role stand-in against a real hand-off socket: the layout and
//! descriptors it hands over, its seed-derived memory, dirty tracking through
//! the passed uffd and pagemap, `write`, `pause` (event on the hand-off
//! connection and on stdout) and the snapshot of the frozen memory.

#![allow(clippy::unwrap_used)]

mod standin;

use std::os::fd::AsFd;
use std::time::Duration;

use guest_memory::MemoryMap;
use guest_memory::handoff::{Role, VmmEvent, receive_handoff};
use guest_memory::memfile::is_zero;
use pageserver_test_support::{HandoffListener, HugePages, TempDir, written_pages};
use standin::Standin;
use vmm_standin::{StandinEvent, pattern};

const SEED: u64 = 7;

fn source_handoff_write_pause_snapshot(hugetlb: bool) {
    let dir = TempDir::new("standin-source");
    let listener = HandoffListener::bind(dir.join("source.sock"));
    let snapshot = dir.join("snapshot");
    let (memory, size, page_size) = if hugetlb { ("32M", 32u64 << 20, 2u64 << 20) } else { ("4M", 4 << 20, 4096) };
    let mut extra = vec!["--vcpus", "2", "--seed", "7", "--dirty-rate", "0", "--snapshot"];
    let snapshot_arg = snapshot.display().to_string();
    extra.push(&snapshot_arg);
    if hugetlb {
        extra.push("--hugetlb");
    }
    let mut vm = Standin::spawn("source", memory, listener.path(), &extra);

    let handoff = receive_handoff(listener.accept(vm.process()), Role::Source).expect("a valid hand-off");
    let total_pages = size / page_size;
    assert_eq!(handoff.message.pid, vm.process().id());
    assert_eq!(handoff.message.vm, "test-vm");
    assert_eq!(handoff.layout.page_size(), page_size);
    assert_eq!(handoff.layout.total_pages(), total_pages);
    assert_eq!(handoff.layout.regions()[0].offset, 0);
    assert!(handoff.pagemap.is_some(), "the source hands over its pagemap");

    let StandinEvent::Ready { pid, page_size: ready_page_size, total_pages: ready_pages, zero_pages, .. } = vm.event()
    else {
        panic!("expected ready");
    };
    assert_eq!((pid, ready_page_size, ready_pages), (vm.process().id(), page_size, total_pages));
    assert!(!zero_pages.is_empty());

    // The memory is exactly the seed's content (no vCPU writes at rate 0).
    let map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, false).unwrap();
    let (mut expected, mut actual) = (vec![0u8; page_size as usize], vec![0u8; page_size as usize]);
    for page in 0..total_pages {
        pattern::initial_page(SEED, page, &mut expected);
        map.copy_out((page * page_size) as usize, &mut actual);
        assert!(expected == actual, "page {page} differs from the seed's content");
    }
    for &page in &zero_pages {
        assert!(pattern::is_initial_hole(SEED, page), "zero page {page} is not a hole");
    }

    // Dirty tracking through the handed-over uffd (WP async) and pagemap.
    let pagemap = handoff.pagemap.as_ref().unwrap().as_fd();
    let base = handoff.layout.regions()[0].base_host_virt_addr;
    written_pages(pagemap, base, size, page_size);
    assert_eq!(written_pages(pagemap, base, size, page_size), Vec::<u64>::new());
    let hole = zero_pages[0];
    assert_eq!(vm.request(&format!("write {hole}")), StandinEvent::Written { page: hole });
    map.copy_out((hole * page_size) as usize, &mut actual);
    assert!(!is_zero(&actual), "write made the hole non-zero");
    assert_eq!(written_pages(pagemap, base, size, page_size), vec![hole]);

    // Bad commands are answered, and the stand-in goes on.
    assert!(matches!(vm.request(&format!("write {total_pages}")), StandinEvent::Error { .. }));
    assert!(matches!(vm.request("touch 1"), StandinEvent::Error { .. }));
    assert!(matches!(vm.request("jump"), StandinEvent::Error { .. }));

    // Pause: the agent hears of it on the hand-off connection.
    let StandinEvent::Paused { at_ns } = vm.request("pause") else { panic!("expected paused") };
    let mut events = handoff.events;
    assert_eq!(events.next_event().unwrap(), Some(VmmEvent::Paused { at_ns }));
    assert_eq!(vm.event(), StandinEvent::SnapshotWritten { path: snapshot.display().to_string() });
    let snapshot_bytes = std::fs::read(&snapshot).unwrap();
    assert_eq!(snapshot_bytes.len() as u64, size);
    let mut live = vec![0u8; size as usize];
    map.copy_out(0, &mut live);
    assert!(snapshot_bytes == live, "the snapshot is the paused memory");
    assert!(matches!(vm.request("pause"), StandinEvent::Error { .. }), "pausing twice is refused");

    assert!(vm.finish(true), "quit exits with 0");
    assert_eq!(events.next_event().unwrap(), None, "the hand-off connection closes with the VMM");
}

#[test]
fn source_handoff_write_pause_snapshot_shmem() {
    source_handoff_write_pause_snapshot(false);
}

#[test]
fn source_handoff_write_pause_snapshot_hugetlb() {
    let _huge_pages = HugePages::reserve(16);
    source_handoff_write_pause_snapshot(true);
}

/// With a dirty rate, the vCPUs change memory until the pause and never
/// after it.
#[test]
fn source_vcpus_dirty_memory_until_paused() {
    let dir = TempDir::new("standin-source");
    let listener = HandoffListener::bind(dir.join("source.sock"));
    let extra = ["--vcpus", "2", "--seed", "3", "--dirty-rate", "20000"];
    let mut vm = Standin::spawn("source", "4M", listener.path(), &extra);
    let handoff = receive_handoff(listener.accept(vm.process()), Role::Source).expect("a valid hand-off");
    assert!(matches!(vm.event(), StandinEvent::Ready { .. }));
    let map = MemoryMap::map(handoff.memory.as_fd(), 0, 4 << 20, false).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut changed = 0;
    let (mut expected, mut actual) = (vec![0u8; 4096], vec![0u8; 4096]);
    for page in 0..1024u64 {
        pattern::initial_page(3, page, &mut expected);
        map.copy_out((page * 4096) as usize, &mut actual);
        changed += u64::from(expected != actual);
    }
    assert!(changed > 0, "vCPUs wrote nothing in 300 ms");

    assert!(matches!(vm.request("pause"), StandinEvent::Paused { .. }));
    let (mut before, mut after) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    map.copy_out(0, &mut before);
    std::thread::sleep(Duration::from_millis(100));
    map.copy_out(0, &mut after);
    assert!(before == after, "memory changed after the pause");
    assert!(vm.finish(false), "EOF on stdin exits with 0");
}
