//! The hand-off itself, done from inside QEMU exactly as the VMM stand-in
//! (`demo/src/vmm/{source,target}.rs`) does it: create and register the
//! userfaultfd over QEMU's fresh mapping, connect to the agent, send the
//! layout with the descriptors, wait for its "ok"; then keep the link
//! (`guest_memory::handoff_link`): if the agent dies, the memory goes to the
//! next agent on the socket, with the dead one's checkpoint.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use guest_memory::handoff_link::{HandoffLink, LinkChange, LinkConfig, LinkError};
use guest_memory::layout::{GuestLayout, LayoutError, RegionLayout};
use guest_memory::uffd::{UffdError, Userfaultfd};

use crate::config::Config;
use crate::sys;

/// How long the shim waits for the agent's verdict once connected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

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
    #[error("{0}")]
    Link(#[from] LinkError),
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
    pub link: Arc<HandoffLink>,
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

    let fds: [&dyn AsFd; 3] = [&memory, &uffd, pagemap.as_ref().expect("opened above")];
    let link_config = LinkConfig {
        socket: config.socket.clone(),
        role: config.role,
        vm: config.vm.clone(),
        region: layout,
        fds: &fds,
        connect_timeout: config.connect_timeout,
        reply_timeout: REPLY_TIMEOUT,
    };
    let role = config.role;
    // A new agent gets the memory again when this one goes away: say so on
    // QEMU's stderr. (A source agent started again learns that the VM is
    // paused from the orchestrator's SetPaused, as the first one did.)
    let link = HandoffLink::establish(link_config, move |change| match change {
        LinkChange::AgentGone { .. } => {
            eprintln!("pageserver-vmm-shim: the {role:?} agent went away; the memory goes to the next one")
        }
        LinkChange::HandedOff { handoffs } => {
            eprintln!("pageserver-vmm-shim: memory handed over again to a new {role:?} agent (hand-off {handoffs})")
        }
    })?;
    Ok(Kept { link, uffd, memory, pagemap })
}
