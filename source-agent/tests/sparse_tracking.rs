//! Dirty tracking of a sparse guest: only the pages that hold data are
//! sent and protected, and a hole the VMM writes later is still seen, at
//! the latest by the scan after the pause (the final bitmap), even when the
//! VMM's page-table entry for it is gone again before the scan.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;

use common::{RunningServer, TestVmm, dirty_pages};
use guest_memory::memfile::punch_hole;
use guest_memory::sys::Discard;
use pageserver_agent_shell::PeerAllowList;
use pageserver_proto::v1::SetPausedRequest;
use pageserver_proto::v1::migration_source_client::MigrationSourceClient;
use source_agent::{SourceAgent, listen_for_handoff};

const PAGES: u64 = 1024;
const PAGE_SIZE: usize = 4096;
/// The pages that hold data at the hand-off; every other page is a hole.
const WRITTEN: [u64; 3] = [0, 1, 700];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_are_not_sent_and_a_hole_written_later_is_dirty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("handoff.sock");
    let agent = Arc::new(SourceAgent::waiting_for_handoff("test-vm", &socket));
    let _listener =
        listen_for_handoff(&socket, PeerAllowList::own_uid(), None, agent.clone()).expect("listen for the hand-off");
    let server = RunningServer::start(agent).await;
    let mut client = server.client().await;

    let handoff_socket = socket.clone();
    let vmm = tokio::task::spawn_blocking(move || {
        let mut vmm = TestVmm::new(PAGES);
        for page in (0..PAGES).filter(|page| !WRITTEN.contains(page)) {
            punch_hole(vmm.memory.as_fd(), page * PAGE_SIZE as u64, PAGE_SIZE as u64).expect("punch a hole");
        }
        vmm.hand_off(&handoff_socket).expect("the hand-off is accepted");
        vmm
    })
    .await
    .expect("hand-off task");

    let (bitmap, pages) = dirty_pages(&mut client, 0, false).await.expect("since 0");
    assert_eq!(pages, WRITTEN, "since 0: the pages that hold data, not the holes");
    let e1 = bitmap.epoch;

    // A hole written and kept mapped; another written, then dropped from
    // the VMM's page tables (MADV_DONTNEED keeps the file's page) before
    // the scan; a data page written as well. A scan while the VM runs sees
    // what the VMM's page tables show (10 and 700); the one after the pause
    // looks at the file itself, so the final bitmap has 20 as well.
    vmm.write_page(10, 1);
    vmm.write_page(20, 1);
    vmm.map.discard(20 * PAGE_SIZE, PAGE_SIZE, Discard::DontNeed).expect("MADV_DONTNEED");
    vmm.write_page(700, 1);
    let (_, pages) = dirty_pages(&mut client, e1, false).await.expect("since E1");
    assert!(pages.starts_with(&[10]) && pages.ends_with(&[700]) && pages.len() <= 3, "{pages:?}");
    let mut control = MigrationSourceClient::new(server.channel().await);
    control.set_paused(SetPausedRequest { paused: true }).await.expect("SetPaused");
    let (bitmap, pages) = dirty_pages(&mut client, e1, true).await.expect("final since E1");
    assert_eq!(pages, [10, 20, 700]);

    // Once seen, they are protected like any page: nothing new, until the
    // next write (also one whose page-table entry is dropped again).
    control.set_paused(SetPausedRequest { paused: false }).await.expect("SetPaused");
    let (bitmap, pages) = dirty_pages(&mut client, bitmap.epoch, false).await.expect("since E2");
    assert_eq!(pages, Vec::<u64>::new());
    vmm.write_page(20, 2);
    vmm.map.discard(20 * PAGE_SIZE, PAGE_SIZE, Discard::DontNeed).expect("MADV_DONTNEED");
    let (_, pages) = dirty_pages(&mut client, bitmap.epoch, false).await.expect("since E3");
    assert_eq!(pages, [20]);
    server.stop().await;
}
