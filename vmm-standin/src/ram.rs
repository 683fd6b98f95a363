//! Guest RAM: a memfd mapped read-write, as a VMM maps it, and its hand-off
//! to an agent.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use guest_memory::MemoryMap;
use guest_memory::RegionLayout;
use guest_memory::Userfaultfd;
use guest_memory::handoff::{FdKind, Role};
use guest_memory::handoff_link::{HandoffLink, LinkChange, LinkConfig};
use guest_memory::memfile::{ftruncate, memfd_create};

use crate::config::StandinConfig;
use crate::error::{VmmError, io_context};
use crate::protocol::{EventSink, StandinEvent};

/// How long the stand-in waits for the agent's hand-off socket to appear.
pub const HANDOFF_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the stand-in waits for the agent's verdict on a hand-off (the
/// source agent answers after its first scan of the whole memory).
pub const HANDOFF_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest's memory: one region, one file.
#[derive(Debug)]
pub struct GuestRam {
    pub memfd: OwnedFd,
    pub map: MemoryMap,
    pub page_size: u64,
    pub total_pages: u64,
}

impl GuestRam {
    /// A memfd of `size` bytes (all holes) mapped read-write.
    pub fn create(name: &str, size: u64, page_size: u64, hugetlb: bool) -> Result<Self, VmmError> {
        let memfd = memfd_create(name, hugetlb)
            .map_err(io_context(format!("memfd_create({name:?}{})", if hugetlb { ", MFD_HUGETLB" } else { "" })))?;
        ftruncate(memfd.as_fd(), size).map_err(io_context(format!("ftruncate of the memfd to {size} bytes")))?;
        let len = usize::try_from(size).map_err(|_| VmmError::Config(format!("{size} bytes do not fit")))?;
        let map = MemoryMap::map(memfd.as_fd(), 0, len, true).map_err(|e| {
            let hint = if hugetlb {
                " (not enough huge pages? echo N > /proc/sys/vm/nr_hugepages, N = size / 2 MiB)"
            } else {
                ""
            };
            io_context(format!("mapping {size} bytes of guest memory{hint}"))(e)
        })?;
        Ok(Self { memfd, map, page_size, total_pages: size / page_size })
    }

    pub fn size(&self) -> u64 {
        self.total_pages * self.page_size
    }

    /// The single region as the hand-off describes it.
    pub fn region(&self) -> RegionLayout {
        RegionLayout { base_host_virt_addr: self.map.addr(), size: self.size(), offset: 0, page_size: self.page_size }
    }

    /// Byte offset of `page` in the mapping.
    pub fn page_offset(&self, page: u64) -> usize {
        (page * self.page_size) as usize
    }

    /// Checks that a command's page exists.
    /// Checks that pages [first, first + count) are all in the guest.
    pub fn check_range(&self, first: u64, count: u64) -> Result<(), String> {
        match first.checked_add(count) {
            Some(end) if end <= self.total_pages => Ok(()),
            _ => Err(format!("pages {first}+{count} out of range (the guest has {} pages)", self.total_pages)),
        }
    }

    pub fn check_page(&self, page: u64) -> Result<(), String> {
        if page < self.total_pages {
            Ok(())
        } else {
            Err(format!("page {page} out of range (the guest has {} pages)", self.total_pages))
        }
    }
}

/// The userfaultfd `role`'s agent gets over `ram`, as a VMM registers it.
/// A process the kernel does not let create one that also reports
/// kernel-mode faults (no access to /dev/userfaultfd, no CAP_SYS_PTRACE,
/// `vm.unprivileged_userfaultfd=0`: any unprivileged user on a default
/// Debian) gets a user-mode-only one instead, which is all this stand-in
/// needs: its vCPUs are threads touching the memory from user mode, never
/// KVM (a real VMM with KVM needs the full kind).
pub fn guest_userfaultfd(role: Role, ram: &GuestRam) -> Result<Userfaultfd, VmmError> {
    match Userfaultfd::for_role(role, &ram.region()) {
        Err(error) if error.is_creation_not_permitted() => {
            eprintln!(
                "vmm-standin[{}]: {error}; using a userfaultfd that reports user-mode faults only (enough for \
                 this stand-in's guest, whose vCPUs never fault from the kernel)",
                format!("{role:?}").to_lowercase()
            );
            Ok(Userfaultfd::for_role_user_mode_only(role, &ram.region())?)
        }
        other => Ok(other?),
    }
}

/// Hands `ram` to the agent on `config`'s socket with `fds` (in the role's
/// order) and keeps the link: a new agent gets the memory again, and every
/// change is told on `events`.
pub fn hand_off(
    config: &StandinConfig,
    role: Role,
    ram: &GuestRam,
    fds: &[&dyn AsFd],
    events: &Arc<EventSink>,
) -> Result<Arc<HandoffLink>, VmmError> {
    let events = events.clone();
    let link_config = LinkConfig {
        socket: config.handoff_socket.clone(),
        role,
        vm: config.vm.clone(),
        region: ram.region(),
        fds,
        connect_timeout: HANDOFF_CONNECT_TIMEOUT,
        reply_timeout: HANDOFF_REPLY_TIMEOUT,
    };
    Ok(HandoffLink::establish(link_config, move |change| {
        events.emit(&match change {
            LinkChange::AgentGone { handoffs } => StandinEvent::AgentGone { handoffs },
            LinkChange::HandedOff { handoffs } => StandinEvent::HandedOff { handoffs },
        })
    })?)
}

/// The descriptor kinds, for log lines.
pub fn describe_fds(role: Role) -> String {
    role.fds()
        .iter()
        .map(|k| match k {
            FdKind::Memory => "memory",
            FdKind::Uffd => "uffd",
            FdKind::Pagemap => "pagemap",
        })
        .collect::<Vec<_>>()
        .join(", ")
}
