//! What the stand-in is told on its command line.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::VmmError;
use crate::written::WrittenPages;

/// Which side of the migration the stand-in plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandinRole {
    Source,
    Target,
}

impl FromStr for StandinRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "source" => Ok(Self::Source),
            "target" => Ok(Self::Target),
            other => Err(format!("role {other:?}: expected source or target")),
        }
    }
}

/// Everything the stand-in is told on its command line.
#[derive(Debug, Clone)]
pub struct StandinConfig {
    pub role: StandinRole,
    pub memory_bytes: u64,
    /// A sparse guest: only this many bytes are ever written
    /// ([`WrittenPages::sparse`]); `None`: every page.
    pub written_bytes: Option<u64>,
    pub hugetlb: bool,
    pub vcpus: usize,
    pub seed: u64,
    /// The agent's hand-off socket.
    pub handoff_socket: PathBuf,
    pub vm: String,
    /// Source: page writes per second across all vCPUs.
    pub dirty_rate: u64,
    /// Source: rewrite the whole hot set every this many milliseconds, on
    /// top of `dirty_rate` (0: never; [`crate::hot_sweep`]).
    pub hot_sweep_ms: u64,
    /// Source: where `pause` writes the paused memory.
    pub snapshot: Option<PathBuf>,
    /// Target: how long `resume` runs the guest.
    pub run_ms: u64,
    /// Target: how many pages the guest may write (each costs an undo copy).
    pub max_written_pages: u64,
    /// Source: bytes written at the start of every page that starts with
    /// data, over the seed's content (a marker the tests look for where no
    /// page content may go, such as logs); empty: none.
    pub marker: Vec<u8>,
}

impl StandinConfig {
    /// Page size of the guest memory: 2 MiB with hugetlb, else 4 KiB.
    pub fn page_size(&self) -> u64 {
        if self.hugetlb { 2 << 20 } else { 4096 }
    }

    /// The pages the guest ever writes.
    pub fn written(&self) -> WrittenPages {
        let total_pages = self.memory_bytes / self.page_size();
        match self.written_bytes {
            Some(bytes) => WrittenPages::sparse(total_pages, bytes / self.page_size()),
            None => WrittenPages::dense(total_pages),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), VmmError> {
        let page_size = self.page_size();
        if self.memory_bytes == 0 || self.memory_bytes.checked_rem(page_size) != Some(0) {
            return Err(VmmError::Config(format!(
                "memory size {} is not a positive multiple of the page size {page_size}",
                self.memory_bytes
            )));
        }
        if usize::try_from(self.memory_bytes).is_err() {
            return Err(VmmError::Config(format!("memory size {} does not fit this machine", self.memory_bytes)));
        }
        if self.written_bytes.is_some_and(|bytes| bytes < page_size) {
            return Err(VmmError::Config(format!("a sparse guest writes at least one page ({page_size} bytes)")));
        }
        if self.vcpus == 0 {
            return Err(VmmError::Config("at least one vCPU is needed".into()));
        }
        Ok(())
    }
}
