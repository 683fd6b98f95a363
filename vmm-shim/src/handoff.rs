//! The hand-off itself, done from inside QEMU exactly as the VMM stand-in
//! (`demo/src/vmm/{source,target}.rs`) does it: create and register the
//! userfaultfd over QEMU's fresh mapping, connect to the agent, send the
//! layout with the descriptors, wait for its "ok".
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_memory::handoff::{HANDOFF_VERSION, HandoffError, HandoffMessage, send_handoff};
use guest_memory::layout::{GuestLayout, LayoutError, RegionLayout};
use guest_memory::uffd::{UffdError, Userfaultfd};

use crate::config::Config;
use crate::sys;

/// How long the shim waits for the agent's verdict once connected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between connection attempts while the agent is not listening.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum HandoffFailure {
    #[error("the mapping cannot be described: {0}")]
    Layout(#[from] LayoutError),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "registering guest memory with a userfaultfd: {source} (is userfaultfd allowed here? check \
         /dev/userfaultfd, vm.unprivileged_userfaultfd, seccomp and the kernel)"
    )]
    Uffd {
        #[source]
        source: UffdError,
    },
    #[error("no agent listening on {socket} after {waited:.1?}: {source}")]
    Connect {
        socket: PathBuf,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    #[error("hand-off to the agent on {socket} failed: {source}")]
    Handoff {
        socket: PathBuf,
        #[source]
        source: HandoffError,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> HandoffFailure {
    move |source| HandoffFailure::Io { context, source }
}

/// The guest-memory mapping QEMU just created.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub fd: RawFd,
    pub layout: RegionLayout,
}

/// Everything that must stay open while QEMU runs: the connection (its EOF
/// tells the agent the VMM is gone) and our own references to the
/// descriptors handed over (the uffd registration must outlive every guest
/// access, whatever the agent does).
#[derive(Debug)]
#[allow(dead_code, reason = "never read: held open for the life of the process")]
pub struct Kept {
    pub stream: UnixStream,
    pub uffd: Userfaultfd,
    pub memory: OwnedFd,
    pub pagemap: Option<File>,
}

/// Registers `region` with a new userfaultfd for `config.role` and hands it
/// to the agent; returns once the agent has accepted it.
pub fn hand_off(config: &Config, region: Region) -> Result<Kept, HandoffFailure> {
    let layout = region.layout;
    GuestLayout::new(vec![layout])?;
    let memory = sys::dup_cloexec(region.fd).map_err(io_err("duplicating QEMU's guest-memory descriptor"))?;

    let uffd = Userfaultfd::for_role(config.role, &layout).map_err(|source| HandoffFailure::Uffd { source })?;
    // Both roles hand over QEMU's pagemap: the source agent scans it for
    // dirty pages, a target agent taking over a migration for the pages
    // already installed.
    let pagemap = Some(File::open("/proc/self/pagemap").map_err(io_err("opening /proc/self/pagemap"))?);

    let stream = connect(&config.socket, config.connect_timeout)?;
    let message = HandoffMessage {
        version: HANDOFF_VERSION,
        role: config.role,
        vm: config.vm.clone(),
        pid: std::process::id(),
        regions: vec![layout],
        fds: config.role.fds().to_vec(),
        previous_handoffs: 0,
        checkpoint: None,
    };
    let mut fds = vec![memory.as_fd(), uffd.as_fd()];
    fds.extend(pagemap.as_ref().map(|p| p.as_fd()));
    let failed = |source| HandoffFailure::Handoff { socket: config.socket.clone(), source };
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io_err("setting the hand-off reply timeout"))?;
    send_handoff(&stream, &message, &fds).map_err(failed)?;
    stream.set_read_timeout(None).map_err(io_err("clearing the hand-off reply timeout"))?;
    Ok(Kept { stream, uffd, memory, pagemap })
}

/// Connects to the agent's socket, retrying while it is not there yet (the
/// agent may start after QEMU).
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, HandoffFailure> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if started.elapsed() < timeout
                    && matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(HandoffFailure::Connect { socket: socket.to_owned(), waited: started.elapsed(), source });
            }
        }
    }
}
