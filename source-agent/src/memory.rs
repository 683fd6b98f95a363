//! The guest memory a source agent serves: the memory file's descriptor,
//! its layout, where it came from, and its dirty tracking.
//!
//! Memory comes either from a VMM's hand-off (the memory file's descriptor,
//! plus the userfaultfd and pagemap descriptors that dirty tracking needs,
//! all kept open for the life of the agent) or from a plain memory file (one
//! region at host address 0, never changing). Either way the agent holds the
//! file open read-only (a handed-off descriptor is reopened read-only through
//! `/proc/self/fd`) and reads pages with `pread`: it cannot corrupt the guest
//! it serves, and it maps nothing. A file that shrinks while it is served
//! (a VMM truncating its memfd, someone truncating a memory file) makes the
//! pages past its new end a short read, an error for the requests that ask
//! for them ([`ReadError::ShortRead`]); through a mapping it would have been
//! a SIGBUS that kills the agent. `pread` works the same on memfd (shmem),
//! regular files and hugetlbfs files, and reads holes as zeros without
//! allocating anything.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use guest_memory::handoff::HandoffMessage;
use guest_memory::layout::LayoutError;
use guest_memory::{GuestLayout, RegionLayout, Userfaultfd};

use crate::dirty::{DirtyError, DirtyTracker};
use crate::removed::{RemovedPages, WatchError};

/// The page sizes guest memory comes in: 4 KiB (shmem, files) and 2 MiB
/// (hugetlbfs).
pub const SUPPORTED_PAGE_SIZES: [u64; 2] = [4096, 2 << 20];

/// Where the memory came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryOrigin {
    /// Handed off by a VMM process.
    Vmm { vm: String, pid: u32 },
    /// A plain memory file.
    File { path: PathBuf },
}

impl std::fmt::Display for MemoryOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryOrigin::Vmm { vm, pid } => write!(f, "VM {vm:?} (VMM pid {pid})"),
            MemoryOrigin::File { path } => write!(f, "memory file {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "checking that the VMM's guest memory is registered for write-protection (is the uffd registered in WP mode?): {0}"
    )]
    WriteProtect(#[source] guest_memory::UffdError),
    #[error("opening memory file {path}: {source}", path = path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} holds {len} bytes, less than one {page_size}-byte page", path = path.display())]
    TooSmall { path: PathBuf, len: u64, page_size: u64 },
    #[error("page size {page_size} is not 4096 or 2097152 (2 MiB)")]
    PageSize { page_size: u64 },
    #[error("memory file {path} is not a regular file", path = path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "memory file {path} holds {len} bytes, not a whole number of {page_size}-byte pages ({remainder} bytes \
         past the last whole page): refusing to serve a truncated guest",
        path = path.display()
    )]
    NotWholePages { path: PathBuf, len: u64, page_size: u64, remainder: u64 },
    #[error("invalid memory layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("reopening the handed-off memory file read-only ({path}): {source}")]
    Reopen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the identity (fstat) of the VMM's memory file")]
    Identity(#[source] io::Error),
    #[error("duplicating the memory file's descriptor: {0}")]
    Duplicate(#[source] io::Error),
    #[error("the hand-off carries no pagemap descriptor, which dirty tracking needs")]
    NoPagemap,
    #[error("starting dirty tracking on the VMM's memory (is it registered with a WP_ASYNC userfaultfd?): {0}")]
    StartTracking(#[source] DirtyError),
    #[error("watching the memory file for removed pages: {0}")]
    WatchRemoved(#[source] WatchError),
}

/// Why a page range cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageRangeError {
    #[error("unknown region {region} (the layout has {count} regions)")]
    UnknownRegion { region: u32, count: usize },
    #[error("page {index} is out of range for region {region} ({pages} pages)")]
    OutOfRange { region: u32, index: u64, pages: u64 },
    #[error("pages {first}..{end} of region {region} run past its end ({pages} pages)")]
    PastEnd { region: u32, first: u64, end: u64, pages: u64 },
}

/// Why pages that the layout has could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Range(#[from] PageRangeError),
    #[error(
        "{origin} ends inside pages {first}..{end} of region {region}: read {read} of {len} bytes at file offset \
         {offset:#x} (the file shrank while served)"
    )]
    ShortRead { origin: String, region: u32, first: u64, end: u64, offset: u64, len: usize, read: usize },
    #[error("reading pages {first}..{end} of region {region} of {origin} at file offset {offset:#x}: {source}")]
    Io {
        origin: String,
        region: u32,
        first: u64,
        end: u64,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Descriptors from the VMM that must stay open while we serve its memory.
#[derive(Debug)]
struct VmmDescriptors {
    /// The WP-async registration lives as long as some copy of this uffd.
    _uffd: Userfaultfd,
}

/// Read-only guest memory with its layout and dirty epochs.
#[derive(Debug)]
pub struct SourceMemory {
    layout: GuestLayout,
    /// The memory file, open read-only; pages are read with `pread`.
    file: File,
    dirty: DirtyTracker,
    origin: MemoryOrigin,
    /// `Layout.memory_id`: see [`memory_id`].
    id: String,
    _vmm: Option<VmmDescriptors>,
}

/// The identity of the memory behind `fd`, as `Layout.memory_id` reports
/// it: the file's device and inode, and the VMM's pid for handed-off
/// memory. Every agent the same VMM hands the same memory to reports the
/// same id; another VM's memory (another memfd) never does.
fn memory_id(fd: &impl std::os::fd::AsFd, origin: &MemoryOrigin) -> Result<String, io::Error> {
    let stat = rustix::fs::fstat(fd)?;
    let (dev, ino) = (stat.st_dev, stat.st_ino);
    Ok(match origin {
        MemoryOrigin::Vmm { pid, .. } => format!("vmm-{pid}-{dev:x}-{ino:x}"),
        MemoryOrigin::File { .. } => format!("file-{dev:x}-{ino:x}"),
    })
}

/// A read-only descriptor of the file `fd` refers to (a handed-off
/// descriptor may be open read-write).
fn reopen_read_only(fd: BorrowedFd<'_>) -> Result<File, MemoryError> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    File::open(&path).map_err(|source| MemoryError::Reopen { path, source })
}

/// Fills `buf` (empty, with a capacity of at least `len`) with the file's
/// bytes from `offset` until `len` are read or the file ends.
fn read_full_at(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    while buf.len() < len {
        let done = buf.len();
        // Fills spare capacity only (never reads what it did not write);
        // capacity past `len`, if the allocator gave any, is cut below.
        match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), offset + done as u64) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(())
}

impl SourceMemory {
    /// Opens a memory file read-only as one region of whole pages.
    /// A file that is not whole pages is refused: its tail would be
    /// memory that nobody serves.
    pub fn open_file(path: &Path, page_size: u64) -> Result<Self, MemoryError> {
        if !SUPPORTED_PAGE_SIZES.contains(&page_size) {
            return Err(MemoryError::PageSize { page_size });
        }
        let open_error = |source| MemoryError::Open { path: path.to_owned(), source };
        let file = File::open(path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(MemoryError::NotAFile { path: path.to_owned() });
        }
        let len = meta.len();
        if len < page_size {
            return Err(MemoryError::TooSmall { path: path.to_owned(), len, page_size });
        }
        if len % page_size != 0 {
            return Err(MemoryError::NotWholePages {
                path: path.to_owned(),
                len,
                page_size,
                remainder: len % page_size,
            });
        }
        let layout = GuestLayout::new(vec![RegionLayout { base_host_virt_addr: 0, size: len, offset: 0, page_size }])?;
        let origin = MemoryOrigin::File { path: path.to_owned() };
        let id = memory_id(&file, &origin).map_err(open_error)?;
        Ok(Self { dirty: DirtyTracker::for_file(layout.clone()), layout, file, origin, id, _vmm: None })
    }

    /// Takes a VMM's handed-off memory (reopened read-only) and starts dirty
    /// tracking (the initial scan that write-protects every mapped page).
    pub fn from_handoff(
        message: &HandoffMessage,
        layout: GuestLayout,
        memory: OwnedFd,
        uffd: Userfaultfd,
        pagemap: Option<OwnedFd>,
    ) -> Result<Self, MemoryError> {
        let pagemap = pagemap.ok_or(MemoryError::NoPagemap)?;
        let file = reopen_read_only(memory.as_fd())?;
        // The watch looks for holes with SEEK_DATA, which moves the shared
        // file position; reads use `pread`, which does not.
        let holes = file.try_clone().map_err(MemoryError::Duplicate)?;
        let removed = RemovedPages::watch(memory.as_fd(), holes, &layout).map_err(MemoryError::WatchRemoved)?;
        // The VMM's (writable) descriptor goes here: reads use `file`.
        drop(memory);
        // Only the pages that hold data are write-protected (the scans'
        // PAGEMAP_SCAN, `crate::dirty`): protecting the whole range would
        // leave a marker in every empty page-table entry, so the VMM would
        // need page tables for all of its memory (2 GiB for a 1 TiB guest,
        // made in seconds, even when 4 GiB of it were ever written). A hole
        // the VMM writes later holds data at the next scan's look, which
        // reports it. Turning protection *off* over every region
        // checks that the uffd covers it in write-protect mode, at no such
        // cost; a page it unprotects is data, dirty at epoch 1 anyway.
        // Huge pages (hugetlbfs) are tracked whole, as before sparse guests
        // were: protected up front (4 KiB of page tables per GiB), every page
        // dirty at epoch 1, every scan over all of it (`crate::dirty`).
        for r in layout.regions() {
            let checked = if r.page_size > 4096 {
                uffd.write_protect(r.base_host_virt_addr, r.size)
            } else {
                uffd.write_unprotect(r.base_host_virt_addr, r.size)
            };
            checked.map_err(MemoryError::WriteProtect)?;
        }
        let dirty = DirtyTracker::for_vmm(layout.clone(), pagemap, removed);
        dirty.start_tracking().map_err(MemoryError::StartTracking)?;
        let origin = MemoryOrigin::Vmm { vm: message.vm.clone(), pid: message.pid };
        let id = memory_id(&file, &origin).map_err(MemoryError::Identity)?;
        Ok(Self { layout, file, dirty, origin, id, _vmm: Some(VmmDescriptors { _uffd: uffd }) })
    }

    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    pub fn dirty(&self) -> &DirtyTracker {
        &self.dirty
    }

    pub fn origin(&self) -> &MemoryOrigin {
        &self.origin
    }

    /// The memory's identity (`Layout.memory_id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `"vmm"` or `"file"`, as `GetLayout` reports it.
    pub fn source_kind(&self) -> &'static str {
        match self.origin {
            MemoryOrigin::Vmm { .. } => "vmm",
            MemoryOrigin::File { .. } => "file",
        }
    }

    /// Checks that pages `first..first+count` of `region` exist (count ≥ 1).
    pub fn check_pages(&self, region: u32, first: u64, count: u64) -> Result<(), PageRangeError> {
        let count_regions = self.layout.regions().len();
        let pages = self
            .layout
            .region_pages(region)
            .map_err(|_| PageRangeError::UnknownRegion { region, count: count_regions })?;
        if first >= pages {
            return Err(PageRangeError::OutOfRange { region, index: first, pages });
        }
        match first.checked_add(count) {
            Some(end) if end <= pages => Ok(()),
            end => Err(PageRangeError::PastEnd { region, first, end: end.unwrap_or(u64::MAX), pages }),
        }
    }

    /// Reads `count` pages from `first` of `region`, after checking that
    /// the layout has them, into a buffer of their size that is never
    /// zeroed first (the read fills it; zeroing a 2 MiB reply buffer cost as
    /// much as reading it). Pages the file no longer holds (it shrank) are
    /// a [`ReadError::ShortRead`].
    pub fn read_pages(&self, region: u32, first: u64, count: u64) -> Result<Vec<u8>, ReadError> {
        let page_size = self.page_size();
        self.check_pages(region, first, count.max(1))?;
        let len = (count * page_size) as usize;
        let end = first + count;
        // check_pages found the region, and the layout's offsets do not overflow.
        let offset = self.layout.region(region).map_or(0, |r| r.offset) + first * page_size;
        let origin = || self.origin.to_string();
        let mut buffer = Vec::with_capacity(len);
        match read_full_at(&self.file, &mut buffer, len, offset) {
            Ok(()) if buffer.len() == len => Ok(buffer),
            Ok(()) => {
                let read = buffer.len();
                Err(ReadError::ShortRead { origin: origin(), region, first, end, offset, len, read })
            }
            Err(source) => Err(ReadError::Io { origin: origin(), region, first, end, offset, source }),
        }
    }
}
