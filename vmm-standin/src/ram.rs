//! Guest RAM: a memfd mapped read-write, as a VMM maps it, and connecting to
//! an agent's hand-off socket.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_memory::MemoryMap;
use guest_memory::RegionLayout;
use guest_memory::handoff::{FdKind, Role};
use guest_memory::memfile::{ftruncate, memfd_create};

use crate::error::{VmmError, io_context};

/// How long the stand-in waits for the agent's hand-off socket to appear.
pub const HANDOFF_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub fn check_page(&self, page: u64) -> Result<(), String> {
        if page < self.total_pages {
            Ok(())
        } else {
            Err(format!("page {page} out of range (the guest has {} pages)", self.total_pages))
        }
    }
}

/// Connects to the agent's hand-off socket, retrying while it is not there
/// yet (the agent may start after us).
pub fn connect_handoff(path: &Path, timeout: Duration) -> Result<UnixStream, VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if Instant::now() < deadline
                    && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(io_context(format!("connecting to the hand-off socket {}", path.display()))(e));
            }
        }
    }
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
