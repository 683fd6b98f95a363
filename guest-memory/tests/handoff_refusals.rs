//! The agent's end of the hand-off against hostile or broken VMMs, in one
//! process over a socket pair: each bad hand-off is refused with its reason
//! (also in the reply line the VMM reads), and every descriptor it carried
//! is closed (this process's descriptor count is the same after as before).
//!
//! One test in its own binary, so that no other test opens descriptors
//! meanwhile.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use guest_memory::handoff::{
    FdKind, HANDOFF_VERSION, Handoff, HandoffError, HandoffMessage, MAX_MESSAGE_BYTES, Role, receive_handoff,
};
use guest_memory::layout::LayoutError;
use guest_memory::{RegionLayout, Userfaultfd, memfile};

const PAGE: u64 = 4096;
const PAGES: u64 = 8;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn region(base: u64, size: u64, offset: u64, page_size: u64) -> RegionLayout {
    RegionLayout { base_host_virt_addr: base, size, offset, page_size }
}

fn message(regions: Vec<RegionLayout>, fds: Vec<FdKind>) -> Vec<u8> {
    let message = HandoffMessage {
        version: HANDOFF_VERSION,
        role: Role::Source,
        vm: "vm".into(),
        pid: 1,
        regions,
        fds,
        previous_handoffs: 0,
        checkpoint: None,
    };
    let mut line = serde_json::to_vec(&message).expect("serialize");
    line.push(b'\n');
    line
}

fn good_message() -> Vec<u8> {
    message(vec![region(1 << 30, PAGES * PAGE, 0, PAGE)], vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap])
}

/// Sends `bytes` with `fds` attached to the first of them as a VMM would
/// (then closes its sending side), lets the agent's end receive it, and
/// returns the agent's result and the reply line the VMM read.
fn hand_off(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> (Result<Handoff, HandoffError>, String) {
    let (vmm, agent) = UnixStream::pair().expect("socket pair");
    std::thread::scope(|scope| {
        let vmm = &vmm;
        let sender = scope.spawn(move || {
            let first = bytes.len().min(4096);
            // The agent may stop reading early (and close): errors are expected.
            if send_any_fds(vmm.as_fd(), &bytes[..first], fds).is_ok() {
                let _ = (&*vmm).write_all(&bytes[first..]);
            }
            let _ = vmm.shutdown(std::net::Shutdown::Write);
            let mut reply = String::new();
            let _ = BufReader::new(vmm).read_line(&mut reply);
            reply
        });
        let result = receive_handoff(agent, Role::Source);
        (result, sender.join().expect("the VMM thread"))
    })
}

/// Like `send_with_fds`, without its limit on the number of descriptors.
fn send_any_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    use std::mem::MaybeUninit;

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(fds.is_empty() || control.push(SendAncillaryMessage::ScmRights(fds)), "at most 16 fds");
    Ok(rustix::net::sendmsg(socket, &[std::io::IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL)?)
}

/// A refused hand-off: its error, which the reply line carries too.
fn refused(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> HandoffError {
    let (result, reply) = hand_off(bytes, fds);
    let error = result.expect_err("a refusal");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("a JSON reply line");
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"], error.to_string(), "the VMM reads why");
    error
}

struct Descriptors {
    memory: OwnedFd,
    uffd: Userfaultfd,
    pagemap: std::fs::File,
    pipe: (std::io::PipeReader, std::io::PipeWriter),
    null: std::fs::File,
}

fn descriptors() -> Descriptors {
    let memory = memfile::memfd_create("handoff-refusals", false).expect("memfd");
    memfile::ftruncate(memory.as_fd(), PAGES * PAGE).expect("ftruncate");
    Descriptors {
        memory,
        uffd: Userfaultfd::create(0).expect("userfaultfd"),
        pagemap: std::fs::File::open("/proc/self/pagemap").expect("pagemap"),
        pipe: std::io::pipe().expect("pipe"),
        null: std::fs::File::open("/dev/null").expect("/dev/null"),
    }
}

#[test]
fn hostile_handoffs_are_refused_and_leak_no_descriptor() {
    let d = descriptors();
    let (memory, uffd, pagemap) = (d.memory.as_fd(), d.uffd.as_fd(), d.pagemap.as_fd());
    let (pipe, null) = (d.pipe.0.as_fd(), d.null.as_fd());
    let good = good_message();
    let before = open_descriptors();

    assert!(matches!(refused(b"not json\n", &[]), HandoffError::Json(_)));
    assert!(matches!(refused(b"", &[]), HandoffError::Closed));
    let error = refused(b"{\"version\":1", &[memory]);
    assert!(matches!(error, HandoffError::Unterminated { len: 12 }), "{error}");
    assert!(matches!(refused(&good, &[]), HandoffError::FdCount { named: 3, attached: 0 }));
    let error = refused(&good, &[memory, uffd, pagemap, null]);
    assert!(matches!(error, HandoffError::FdCount { named: 3, attached: 4 }), "{error}");
    // More than the receive buffer holds: the ones past it are closed by the
    // kernel, the rest by the agent.
    let error = refused(&good, &[memory; 16]);
    assert!(error.to_string().contains("more than 8 fds attached"), "{error}");

    for (fds, kind, actual) in [
        ([memory, pipe, pagemap], FdKind::Uffd, "pipe:["),
        ([memory, null, pagemap], FdKind::Uffd, "/dev/null"),
        ([pipe, uffd, pagemap], FdKind::Memory, "pipe:["),
        ([null, uffd, pagemap], FdKind::Memory, "/dev/null"),
        ([memory, uffd, memory], FdKind::Pagemap, "/memfd:handoff-refusals"),
    ] {
        match refused(&good, &fds) {
            HandoffError::FdType { kind: k, actual: a } if k == kind && a.starts_with(actual) => {}
            other => panic!("{kind:?} as {actual}: {other}"),
        }
    }
    let twice = message(vec![region(1 << 30, PAGE, 0, PAGE)], vec![FdKind::Memory, FdKind::Memory, FdKind::Uffd]);
    assert!(matches!(refused(&twice, &[memory, memory, uffd]), HandoffError::FdKinds { .. }));

    let all = vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap];
    let past_end = message(vec![region(1 << 30, PAGES * PAGE, PAGE, PAGE)], all.clone());
    let error = refused(&past_end, &[memory, uffd, pagemap]);
    assert!(matches!(error, HandoffError::MemoryTooSmall { need: 36864, have: 32768 }), "{error}");
    let huge = 2 << 20;
    memfile::ftruncate(memory, huge).expect("grow the memfd to a huge page");
    let error = refused(&message(vec![region(1 << 30, huge, 0, huge)], all.clone()), &[memory, uffd, pagemap]);
    assert!(matches!(error, HandoffError::PageSizeMismatch { file: 4096, layout: 2097152 }), "{error}");
    memfile::ftruncate(memory, PAGES * PAGE).expect("shrink the memfd back");
    let overlapping = message(vec![region(1 << 30, 4 * PAGE, 0, PAGE), region(1 << 30, PAGE, 4 * PAGE, PAGE)], all);
    match refused(&overlapping, &[memory, uffd, pagemap]) {
        HandoffError::Layout(LayoutError::Overlap { what: "host addresses", .. }) => {}
        other => panic!("overlapping regions: {other}"),
    }

    // 10 MiB without a newline, and a valid-looking message over the limit:
    // refused once the limit is read.
    let endless = vec![b'{'; 10 << 20];
    assert!(matches!(refused(&endless, &[memory, uffd, pagemap]), HandoffError::TooLarge));
    let mut long = serde_json::to_value(HandoffMessage {
        version: HANDOFF_VERSION,
        role: Role::Source,
        vm: "x".repeat(MAX_MESSAGE_BYTES),
        pid: 1,
        regions: vec![region(1 << 30, PAGE, 0, PAGE)],
        fds: vec![FdKind::Memory, FdKind::Uffd, FdKind::Pagemap],
        previous_handoffs: 0,
        checkpoint: None,
    })
    .expect("a JSON value")
    .to_string()
    .into_bytes();
    long.push(b'\n');
    let error = refused(&long, &[memory, uffd, pagemap]);
    assert!(matches!(error, HandoffError::TooLarge), "{error}");
    assert!(error.to_string().contains(&format!("larger than {MAX_MESSAGE_BYTES} bytes")), "{error}");

    // A proper hand-off is accepted; its descriptors close with it.
    let (accepted, reply) = hand_off(&good, &[memory, uffd, pagemap]);
    let accepted = accepted.expect("a proper hand-off");
    assert_eq!(reply, "{\"ok\":true}\n");
    assert_eq!(accepted.layout.total_pages(), PAGES);
    drop(accepted);

    assert_eq!(open_descriptors(), before, "every received descriptor is closed");
}
