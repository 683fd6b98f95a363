//! The shim preloaded into a QEMU-like test program (`fake_vmm.c`), against
//! a hand-off listener played by the test: the real kernel, real processes,
//! real userfaultfd, SCM_RIGHTS and PAGEMAP_SCAN.
//!
//! - source: the layout matches where the program mapped its memory, and a
//!   page it writes after the hand-off shows up in PAGEMAP_SCAN on the
//!   pagemap it handed over;
//! - target: the test resolves the program's faults (MINOR with
//!   UFFDIO_CONTINUE, MISSING with UFFDIO_COPY), so the registration is real;
//! - refusals: prealloc and mem-lock options, incomplete configuration, no
//!   agent, an agent that refuses, a second or a private mapping;
//! - with the role unset the program runs untouched.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::fd::AsFd;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use guest_memory::MemoryMap;
use guest_memory::handoff::{AgentMessage, HandoffError, Role, receive_handoff};
use pageserver_test_support::{FaultServer, HandoffListener, PATIENCE, TempDir, written_pages};
use support::{FakeVmm, Finished, MemoryFile};

const VM: &str = "shim-test-vm";

fn shim_env<'a>(role: &'a str, memory: &'a MemoryFile, socket: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("PAGESERVER_SHIM_ROLE", role),
        ("PAGESERVER_SHIM_MEM_PATH", memory.path.to_str().unwrap()),
        ("PAGESERVER_SHIM_SOCKET", socket),
        ("PAGESERVER_SHIM_VM", VM),
    ]
}

/// The first word of page `page` as the test program writes it.
fn written_word(page: u64) -> u64 {
    page << 32
}

fn assert_refused(finished: &Finished, needles: &[&str]) {
    assert_eq!(finished.status.code(), Some(1), "exit status; stderr: {}", finished.stderr);
    assert!(finished.stderr.starts_with("pageserver-vmm-shim: "), "stderr: {}", finished.stderr);
    for needle in needles {
        assert!(finished.stderr.contains(needle), "{needle:?} not in stderr: {}", finished.stderr);
    }
}

/// A hand-off socket in a directory of its own (removed with the directory).
fn listener() -> (TempDir, HandoffListener) {
    let dir = TempDir::new("shim-handoff");
    let listener = HandoffListener::bind(dir.join("handoff.sock"));
    (dir, listener)
}

fn source_handoff_and_dirty_tracking(memory: MemoryFile) {
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &[], &shim_env("source", &memory, &socket));

    let handoff = receive_handoff(listener.accept(vm.process()), Role::Source).expect("a valid hand-off");
    let (addr, size) = vm.mapped();
    let region = handoff.layout.regions()[0];
    assert_eq!(handoff.layout.regions().len(), 1);
    assert_eq!((region.base_host_virt_addr, region.size, region.offset), (addr, memory.size, 0));
    assert_eq!((size, region.page_size), (memory.size, memory.page_size));
    assert_eq!(handoff.message.pid, vm.process().id());
    assert_eq!(handoff.message.vm, VM);

    // Dirty tracking on the program's own address space, through the
    // pagemap it opened and the uffd (WP async) it registered.
    let pagemap = handoff.pagemap.as_ref().expect("the source hands over its pagemap").as_fd();
    written_pages(pagemap, addr, size, memory.page_size);
    assert_eq!(written_pages(pagemap, addr, size, memory.page_size), Vec::<u64>::new());
    assert_eq!(vm.request("write 2"), "written 2");
    assert_eq!(written_pages(pagemap, addr, size, memory.page_size), vec![2]);
    assert_eq!(written_pages(pagemap, addr, size, memory.page_size), Vec::<u64>::new(), "re-protected");

    // The memory descriptor is the very file the program writes.
    let map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, false).unwrap();
    assert_eq!(map.read_u64((2 * memory.page_size) as usize), written_word(2));

    // The connection stays open while the program runs, and closes with it.
    let mut events = handoff.events;
    let (tx, rx) = channel();
    std::thread::spawn(move || tx.send(events.next_event().map_err(|e| e.to_string())));
    assert_eq!(rx.recv_timeout(Duration::from_millis(300)).err(), Some(RecvTimeoutError::Timeout));
    assert_eq!(vm.request("quit"), "done");
    let finished = vm.finish();
    assert!(finished.status.success(), "{finished:?}");
    assert!(
        finished.stderr.contains("pageserver-vmm-shim: guest memory handed to the source agent")
            && finished.stderr.contains(&format!("mapped at {addr:#x}, size {size} bytes")),
        "the hand-off is logged: {}",
        finished.stderr
    );
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), Ok(None), "EOF when the VMM exits");
}

#[test]
fn source_handoff_and_dirty_tracking_shmem() {
    source_handoff_and_dirty_tracking(MemoryFile::shmem(16));
}

#[test]
fn source_handoff_and_dirty_tracking_hugetlb() {
    source_handoff_and_dirty_tracking(MemoryFile::hugetlb(4));
}

/// The first word of the pages the test "fetches" for MISSING faults.
const FETCHED: u64 = 0xfe7c_0000_0000_0000;
/// The first word of the page the test "pre-copies".
const PRECOPIED: u64 = 0x9ec0_0000_0000_0000;

/// What the test "fetches" for a MISSING fault on `page`.
fn fetched_page(page: u64, content: &mut [u8]) {
    content.fill(0);
    content[..8].copy_from_slice(&(FETCHED | page).to_ne_bytes());
}

fn target_handoff_and_faults(memory: MemoryFile) {
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &[], &shim_env("target", &memory, &socket));

    let handoff = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a valid hand-off");
    let (addr, size) = vm.mapped();
    let region = handoff.layout.regions()[0];
    assert_eq!((region.base_host_virt_addr, region.size, region.offset), (addr, memory.size, 0));
    assert_eq!((size, region.page_size), (memory.size, memory.page_size));
    assert!(handoff.pagemap.is_some(), "the target's pagemap is handed over too (for a takeover)");

    // "Pre-copy" page 1 through the test's own (unregistered) mapping.
    let agent_map = MemoryMap::map(handoff.memory.as_fd(), 0, size as usize, true).unwrap();
    let page_bytes = memory.page_size as usize;
    agent_map.write_u64(page_bytes, PRECOPIED | 1);

    // MINOR faults are continued, MISSING ones get `fetched_page`.
    let faults = FaultServer::start(handoff.uffd, region, fetched_page);

    // A pre-copied page raises a MINOR fault, a hole a MISSING one; the
    // program sees what the handler decided.
    assert_eq!(vm.request("read 1"), format!("read 1 {:#x}", PRECOPIED | 1));
    assert_eq!(faults.minor_faults(), 1, "the pre-copied page raised a MINOR fault");
    assert_eq!(vm.request("read 3"), format!("read 3 {:#x}", FETCHED | 3));
    assert_eq!(faults.missing_faults(), 1, "the hole raised a MISSING fault");
    // Installed pages are ordinary shared memory again.
    assert_eq!(vm.request("write 1"), "written 1");
    assert_eq!(agent_map.read_u64(page_bytes), written_word(1));
    assert_eq!(vm.request("read 1"), format!("read 1 {:#x}", written_word(1)));
    assert_eq!(faults.minor_faults() + faults.missing_faults(), 2);

    assert_eq!(vm.request("quit"), "done");
    let finished = vm.finish();
    faults.stop();
    assert!(finished.status.success(), "{finished:?}");
    let page_size = memory.page_size;
    assert!(
        finished.stderr.contains("guest memory handed to the target agent")
            && finished.stderr.contains(&format!("page size {page_size} bytes")),
        "the hand-off is logged: {}",
        finished.stderr
    );
}

#[test]
fn target_handoff_and_faults_shmem() {
    target_handoff_and_faults(MemoryFile::shmem(16));
}

#[test]
fn target_handoff_and_faults_hugetlb() {
    target_handoff_and_faults(MemoryFile::hugetlb(4));
}

/// Programs that call `mmap` rather than `mmap64` are handed off too.
/// The target agent dies (its end of the connection closes): the shim
/// hands QEMU's memory, the same uffd and its pagemap to the next agent on
/// the socket, with the checkpoint the first one sent, and faults go on
/// being served by the new one.
#[test]
fn a_dead_agent_is_replaced_by_the_next_one_on_the_socket() {
    let memory = MemoryFile::shmem(16);
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &[], &shim_env("target", &memory, &socket));

    let first = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a valid hand-off");
    assert_eq!(first.message.previous_handoffs, 0);
    let region = first.layout.regions()[0];
    assert_eq!(vm.mapped().0, region.base_host_virt_addr);
    let checkpoint = serde_json::json!({"where": "post-copy", "epoch": 7});
    first.events.send(&AgentMessage::Checkpoint(checkpoint.clone())).expect("checkpoint sent");
    // Let the shim read the checkpoint before the agent "dies".
    std::thread::sleep(Duration::from_millis(100));
    drop(first);

    let second = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a second hand-off");
    assert_eq!(second.message.previous_handoffs, 1);
    assert_eq!(second.message.checkpoint, Some(checkpoint), "the dead agent's checkpoint goes to the next one");
    assert_eq!(second.layout.regions()[0], region, "the same memory");
    assert!(second.pagemap.is_some());
    let faults = FaultServer::start(second.uffd, region, fetched_page);
    assert_eq!(vm.request("read 3"), format!("read 3 {:#x}", FETCHED | 3), "the new agent serves the faults");
    assert_eq!(vm.request("quit"), "done");
    let finished = vm.finish();
    faults.stop();
    assert!(finished.status.success(), "{finished:?}");
    assert!(finished.stderr.contains("memory handed over again"), "{}", finished.stderr);
}

#[test]
fn plain_mmap_is_interposed_too() {
    let memory = MemoryFile::shmem(4);
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &["use-mmap"], &shim_env("target", &memory, &socket));
    let handoff = receive_handoff(listener.accept(vm.process()), Role::Target).expect("a valid hand-off");
    let (addr, _) = vm.mapped();
    assert_eq!(handoff.layout.regions()[0].base_host_virt_addr, addr);
    assert!(vm.finish().status.success());
}

#[test]
fn role_unset_leaves_the_program_alone() {
    let memory = MemoryFile::shmem(4);
    // Even options the shim would refuse, and a socket nobody listens on.
    let env = [("PAGESERVER_SHIM_MEM_PATH", memory.path.to_str().unwrap()), ("PAGESERVER_SHIM_SOCKET", "/nowhere")];
    let mut vm = FakeVmm::spawn(&memory, &["prealloc=on"], &env);
    vm.mapped();
    assert_eq!(vm.request("write 1"), "written 1");
    assert_eq!(vm.request("map-again").split_whitespace().next(), Some("mapped-again"));
    let finished = vm.finish();
    assert!(finished.status.success(), "{finished:?}");
    assert_eq!(finished.stdout, ["done"]);
    assert_eq!(finished.stderr, "", "the shim says nothing");
}

#[test]
fn refuses_prealloc_and_mem_lock_at_load_time() {
    let memory = MemoryFile::shmem(4);
    let socket = "/nowhere/handoff.sock";
    for (args, needles) in [
        (&["prealloc=on"][..], &["refusing to run", "`prealloc=on`", "remove it"][..]),
        (&["-object", "memory-backend-file,id=m,size=1M,prealloc=on"], &["refusing to run", "prealloc=on"]),
        (&["-mem-prealloc"], &["refusing to run", "-mem-prealloc"]),
        (&["-overcommit", "mem-lock=on"], &["refusing to run", "mem-lock=on"]),
    ] {
        for role in ["source", "target"] {
            let started = Instant::now();
            let finished = FakeVmm::spawn(&memory, args, &shim_env(role, &memory, socket)).finish();
            assert_refused(&finished, needles);
            assert!(finished.stdout.is_empty(), "refused before mapping anything: {:?}", finished.stdout);
            assert!(started.elapsed() < Duration::from_secs(5), "refused at once");
        }
    }
}

/// The options are checked when the library is loaded, not at the first
/// mapping: a program that maps nothing is refused too.
#[test]
fn options_are_checked_at_load_time() {
    let output = std::process::Command::new("true")
        .args(["-object", "memory-backend-memfd,id=m,size=1G,prealloc=on"])
        .env("LD_PRELOAD", support::shim_library())
        .envs([
            ("PAGESERVER_SHIM_ROLE", "target"),
            ("PAGESERVER_SHIM_MEM_PATH", "/dev/shm/never-mapped.ram"),
            ("PAGESERVER_SHIM_SOCKET", "/nowhere"),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("pageserver-vmm-shim: refusing to run: `memory-backend-memfd"), "{stderr}");
}

#[test]
fn refuses_incomplete_configuration() {
    let memory = MemoryFile::shmem(4);
    let path = memory.path.to_str().unwrap();
    for (env, needle) in [
        (&[("PAGESERVER_SHIM_ROLE", "target"), ("PAGESERVER_SHIM_MEM_PATH", path)][..], "PAGESERVER_SHIM_SOCKET"),
        (&[("PAGESERVER_SHIM_ROLE", "source"), ("PAGESERVER_SHIM_SOCKET", "/x")], "PAGESERVER_SHIM_MEM_PATH"),
        (
            &[("PAGESERVER_SHIM_ROLE", "sauce"), ("PAGESERVER_SHIM_MEM_PATH", path), ("PAGESERVER_SHIM_SOCKET", "/x")],
            "\"sauce\"",
        ),
        (
            &[
                ("PAGESERVER_SHIM_ROLE", "source"),
                ("PAGESERVER_SHIM_MEM_PATH", "/dev/shm"),
                ("PAGESERVER_SHIM_SOCKET", "/x"),
            ],
            "is a directory",
        ),
    ] {
        let finished = FakeVmm::spawn(&memory, &[], env).finish();
        assert_refused(&finished, &[needle]);
        assert!(finished.stdout.is_empty(), "{:?}", finished.stdout);
    }
}

#[test]
fn no_agent_listening_ends_the_vmm() {
    let memory = MemoryFile::shmem(4);
    let dir = TempDir::new("shim-no-agent");
    let socket = dir.join("absent.sock");
    let socket = socket.to_str().unwrap();
    let mut env = shim_env("source", &memory, socket);
    env.push(("PAGESERVER_SHIM_CONNECT_TIMEOUT", "0.5"));
    let started = Instant::now();
    let finished = FakeVmm::spawn(&memory, &[], &env).finish();
    assert!(started.elapsed() >= Duration::from_millis(500), "retried for the timeout");
    assert_refused(&finished, &["cannot hand guest memory", "to the source agent", "no agent listening on", socket]);
    assert!(finished.stdout.is_empty(), "the program never got its memory: {:?}", finished.stdout);
}

#[test]
fn refused_handoff_ends_the_vmm() {
    let memory = MemoryFile::shmem(4);
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &[], &shim_env("source", &memory, &socket));
    // This "agent" is a target agent: it refuses a source hand-off.
    let refused = receive_handoff(listener.accept(vm.process()), Role::Target);
    assert!(matches!(refused, Err(HandoffError::WrongRole { .. })), "{refused:?}");
    let finished = vm.finish();
    assert_refused(&finished, &["agent refused the hand-off", "this agent is the Target"]);
    assert!(finished.stdout.is_empty(), "{:?}", finished.stdout);
}

#[test]
fn second_mapping_ends_the_vmm() {
    let memory = MemoryFile::shmem(4);
    let (_dir, listener) = listener();
    let socket = listener.path().to_str().unwrap().to_owned();
    let mut vm = FakeVmm::spawn(&memory, &[], &shim_env("source", &memory, &socket));
    let _handoff = receive_handoff(listener.accept(vm.process()), Role::Source).expect("a valid hand-off");
    let (addr, size) = vm.mapped();
    // The program dies inside its second mmap: no answer comes.
    vm.send("map-again");
    let finished = vm.finish();
    assert_refused(
        &finished,
        &["mapped a second time", "would not be tracked", &format!("only the first mapping ({addr:#x}+{size:#x})")],
    );
    assert!(finished.stdout.is_empty(), "{:?}", finished.stdout);
}

#[test]
fn private_mapping_ends_the_vmm() {
    let memory = MemoryFile::shmem(4);
    let finished = FakeVmm::spawn(&memory, &["private"], &shim_env("target", &memory, "/nowhere")).finish();
    assert_refused(&finished, &["without MAP_SHARED", "share=on"]);
    assert!(finished.stdout.is_empty());
}
