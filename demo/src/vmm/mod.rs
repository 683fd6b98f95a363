//! The VMM stand-in: a process that owns "guest memory" as a VMM does,
//! writes to it like a guest, pauses on request and hands its memory to an
//! agent over the hand-off socket.
//!
//! - [`source`]: fills memory from the seed, registers write-protect dirty
//!   tracking, dirties memory from vCPU threads until paused, writes a
//!   snapshot of the paused memory.
//! - [`target`]: an empty memory registered for MINOR and MISSING faults;
//!   after `resume` its vCPU threads read and write it (every first access
//!   blocks until the target agent resolves the fault), and `verify` compares
//!   it with the source's snapshot.
//! - [`protocol`]: the stdin commands and stdout events.
//! - [`pattern`]: the content every party derives from the seed.

pub mod guest;
pub mod pattern;
pub mod protocol;
pub mod ram;
pub mod source;
pub mod target;

use std::io::BufRead;
use std::path::PathBuf;
use std::str::FromStr;

use guest_memory::handoff::HandoffError;
use guest_memory::sys::UffdError;

use protocol::{Command, EventSink};

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
    pub hugetlb: bool,
    pub vcpus: usize,
    pub seed: u64,
    /// The agent's hand-off socket.
    pub handoff_socket: PathBuf,
    pub vm: String,
    /// Source: page writes per second across all vCPUs.
    pub dirty_rate: u64,
    /// Source: where `pause` writes the paused memory.
    pub snapshot: Option<PathBuf>,
    /// Target: how long `resume` runs the guest.
    pub run_ms: u64,
    /// Target: how many pages the guest may write (each costs an undo copy).
    pub max_written_pages: u64,
}

impl StandinConfig {
    /// Page size of the guest memory: 2 MiB with hugetlb, else 4 KiB.
    pub fn page_size(&self) -> u64 {
        if self.hugetlb { 2 << 20 } else { 4096 }
    }

    fn validate(&self) -> Result<(), VmmError> {
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
        if self.vcpus == 0 {
            return Err(VmmError::Config("at least one vCPU is needed".into()));
        }
        Ok(())
    }
}

/// Why the stand-in could not run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("hand-off: {0}")]
    Handoff(#[from] HandoffError),
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io_context(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let context = context.into();
    move |source| VmmError::Io { context, source }
}

/// Runs the stand-in until `quit` or the end of `commands`.
pub fn run(config: &StandinConfig, commands: impl BufRead, events: &EventSink) -> Result<(), VmmError> {
    config.validate()?;
    match config.role {
        StandinRole::Source => source::run(config, commands, events),
        StandinRole::Target => target::run(config, commands, events),
    }
}

/// Feeds each command line to `handle` until `quit` or EOF. A command that
/// fails is answered with an `error` event and the loop goes on.
pub(crate) fn command_loop(
    commands: impl BufRead,
    events: &EventSink,
    mut handle: impl FnMut(Command) -> Result<(), String>,
) -> Result<(), VmmError> {
    for line in commands.lines() {
        let line = line.map_err(io_context("reading commands from stdin"))?;
        match Command::parse(&line) {
            Ok(None) => {}
            Ok(Some(Command::Quit)) => return Ok(()),
            Ok(Some(command)) => {
                if let Err(message) = handle(command) {
                    events.error(message);
                }
            }
            Err(message) => events.error(message),
        }
    }
    Ok(())
}

/// Checks that `page` exists.
pub(crate) fn check_page(page: u64, total_pages: u64) -> Result<(), String> {
    if page < total_pages {
        Ok(())
    } else {
        Err(format!("page {page} out of range (the guest has {total_pages} pages)"))
    }
}
