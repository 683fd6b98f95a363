//! The look against a real memfd, a real guarded mapping and real page
//! tables (this process plays the VMM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use guest_memory::sys::Discard;
use guest_memory::{GuestLayout, MemoryMap, RegionLayout, memfile};

use super::RemovedPages;

const PAGE: u64 = 4096;
const PAGES: u64 = 64;

/// A "VMM": a memfd of [`PAGES`] pages mapped shared, read-write, here.
struct Vmm {
    memfd: OwnedFd,
    map: MemoryMap,
    layout: GuestLayout,
    pagemap: File,
}

impl Vmm {
    fn new() -> Self {
        let memfd = memfile::memfd_create("removed-test", false).expect("memfd");
        memfile::ftruncate(memfd.as_fd(), PAGES * PAGE).expect("ftruncate");
        let map = MemoryMap::map(memfd.as_fd(), 0, (PAGES * PAGE) as usize, true).expect("mmap");
        let region = RegionLayout { base_host_virt_addr: map.addr(), size: PAGES * PAGE, offset: 0, page_size: PAGE };
        let layout = GuestLayout::new(vec![region]).expect("layout");
        let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
        Self { memfd, map, layout, pagemap }
    }

    fn write(&self, page: u64) {
        self.map.copy_in((page * PAGE) as usize, &[0xa5; 64]);
    }

    fn watch(&self) -> RemovedPages {
        let file =
            File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.memfd))).expect("reopen");
        RemovedPages::watch(self.memfd.as_fd(), file, &self.layout).expect("watch")
    }

    fn look(&self, removed: &mut RemovedPages, thorough: bool) -> Vec<u64> {
        let mut changed = Vec::new();
        removed.look(&self.layout, self.pagemap.as_fd(), thorough, |page| changed.push(page)).expect("look");
        changed.sort_unstable();
        changed.dedup();
        changed
    }
}

#[test]
fn a_look_reports_what_holds_data_then_only_what_changed() {
    let vmm = Vmm::new();
    for page in [1, 2, 40] {
        vmm.write(page);
    }
    let mut removed = vmm.watch();
    assert_eq!(vmm.look(&mut removed, false), vec![1, 2, 40], "the first look walks the file whatever asked");
    assert_eq!(vmm.look(&mut removed, true), Vec::<u64>::new(), "nothing changed");
    vmm.write(7);
    memfile::punch_hole(vmm.memfd.as_fd(), 40 * PAGE, PAGE).expect("punch");
    assert_eq!(vmm.look(&mut removed, false), vec![7, 40], "a hole written, a page removed");
    assert!(removed.held_data(7) && !removed.held_data(40));
}

/// A page mapped here other than by the look's own mapping in: the kernel
/// maps a populated page's neighbours that the page cache holds (fault-
/// around), and a neighbour that became data after the look read the
/// file's holes is mapped without being asked for. The next look finds it
/// mapped already; it must still report it, or the write that made it data
/// is lost (scans record only what a look found). Without the check of
/// this mapping's page tables against the last look, this page was never
/// reported: demo migrations under CPU load ended with a wrong page.
#[test]
fn a_page_mapped_here_between_looks_is_reported() {
    let vmm = Vmm::new();
    vmm.write(10);
    let mut removed = vmm.watch();
    assert_eq!(vmm.look(&mut removed, true), vec![10]);
    vmm.write(11);
    // What fault-around does when the look maps page 10's neighbourhood in.
    removed.maps[0].populate_read((11 * PAGE) as usize, PAGE as usize).expect("map page 11 here");
    assert_eq!(vmm.look(&mut removed, false), vec![11], "page 11 holds data it did not hold at the last look");
    assert!(removed.held_data(11));
}

/// A page the VMM wrote and then dropped from its own page tables
/// (`MADV_DONTNEED` keeps a shared file's data) is seen only by walking the
/// file: not by a quick look, by the next thorough one.
#[test]
fn a_page_the_vmm_dropped_is_seen_by_a_thorough_look() {
    let vmm = Vmm::new();
    vmm.write(3);
    let mut removed = vmm.watch();
    assert_eq!(vmm.look(&mut removed, false), vec![3]);
    vmm.write(30);
    vmm.map.discard((30 * PAGE) as usize, PAGE as usize, Discard::DontNeed).expect("MADV_DONTNEED");
    assert_eq!(vmm.look(&mut removed, false), Vec::<u64>::new(), "the VMM's page tables no longer show it");
    assert_eq!(vmm.look(&mut removed, true), vec![30]);
    assert!(removed.held_data(30));
}
