//! The stand-in's control protocol: commands on stdin (one per line), events
//! on stdout (one JSON object per line).
//!
//! | command | role | answer |
//! |---|---|---|
//! | `write P` | source | `{"event":"written","page":P}` |
//! | `write-range FIRST COUNT` | source | `{"event":"written-range","first":FIRST,"count":COUNT}`: pages FIRST.. written, as `write` does each |
//! | `pause` | source | `{"event":"paused","at_ns":..}`, then `snapshot-written` |
//! | `resume` | target | `{"event":"resumed"}` at once; `{"event":"guest-done",..}` when `--run-ms` is over |
//! | `touch P1 P2 ..` | target | `{"event":"touched",..}` |
//! | `touch-spread FIRST COUNT` | target | `{"event":"touched-spread","pages":COUNT,"nanos":N}`: the vCPUs share pages FIRST.. (vCPU i reads pages FIRST+i, FIRST+i+vCPUs, ...), all starting at once; N from the start to the last read |
//! | `touch-shared P1 P2 ..` | target | `{"event":"touched-spread","pages":N,"nanos":N}`: as `touch-spread`, over the pages listed (vCPU i reads the i-th, the (i+vCPUs)-th, ...) |
//! | `discard P1 P2 ..` | both | `{"event":"discarded","pages":N}`: the pages are punched out (MADV_REMOVE, as a balloon does); they read as zeros from then on (unless written again) |
//! | `verify PATH` | target | `{"event":"verified",..}` |
//! | `verify-mapped PATH` | target | `{"event":"verified-mapped",..}` |
//! | `quit` (or EOF) | both | exit 0 |
//!
//! Unasked: `agent-gone` when the agent holding the memory goes away, and
//! `handed-off` once a new one took it over (`guest_memory::handoff_link`).
//!
//! A command that cannot be carried out is answered with
//! `{"event":"error","message":..}`; the stand-in keeps running. Commands
//! are served while the target guest runs, so a test can look at a guest
//! that froze (its vCPUs blocked on faults nobody resolves): `verify-mapped`
//! compares only pages that are mapped, so it never blocks, and `quit` exits
//! without waiting for the vCPUs.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{VmmError, io_context};

/// One line of the stand-in's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum StandinEvent {
    /// The agent accepted the hand-off (and, on the source, the vCPUs run).
    Ready {
        pid: u32,
        page_size: u64,
        total_pages: u64,
        /// Up to 16 pages that are holes (all zeros) at this moment (source).
        zero_pages: Vec<u64>,
        /// How the hand-off to the source agent went (source only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracking: Option<TrackingSetup>,
    },
    Written {
        page: u64,
    },
    WrittenRange {
        first: u64,
        count: u64,
    },
    Paused {
        at_ns: u64,
    },
    SnapshotWritten {
        path: String,
    },
    /// The target's vCPUs started; `guest-done` follows when the run is over.
    Resumed,
    GuestDone {
        first_access_done_ns: u64,
        accesses: u64,
        pages_written: u64,
        /// Distinct pages the vCPUs accessed.
        #[serde(default)]
        pages_touched: u64,
    },
    Touched {
        first_access_done_ns: u64,
    },
    TouchedSpread {
        pages: u64,
        nanos: u64,
    },
    Discarded {
        pages: u64,
    },
    Verified {
        /// Every page verified: compared, or a hole in both files.
        verified_pages: u64,
        /// Of those, the pages that are holes in both the snapshot and the
        /// target's file: zeros on both sides, not read (`crate::verify`).
        #[serde(default)]
        hole_pages: u64,
        mismatched_pages: u64,
        first_mismatches: Vec<u64>,
    },
    /// Only the pages present in the target's page tables were compared.
    VerifiedMapped {
        mapped_pages: u64,
        mismatched_pages: u64,
        first_mismatches: Vec<u64>,
    },
    /// The agent holding the memory went away (after `handoffs` hand-offs);
    /// the memory goes to the next agent that listens on the socket.
    AgentGone {
        handoffs: u32,
    },
    /// The memory was handed over again, to a new agent.
    HandedOff {
        handoffs: u32,
    },
    Error {
        message: String,
    },
}

impl StandinEvent {
    /// The `event` tag, e.g. `"guest-done"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready { .. } => "ready",
            Self::Written { .. } => "written",
            Self::WrittenRange { .. } => "written-range",
            Self::Paused { .. } => "paused",
            Self::SnapshotWritten { .. } => "snapshot-written",
            Self::Resumed => "resumed",
            Self::GuestDone { .. } => "guest-done",
            Self::Touched { .. } => "touched",
            Self::TouchedSpread { .. } => "touched-spread",
            Self::Discarded { .. } => "discarded",
            Self::Verified { .. } => "verified",
            Self::VerifiedMapped { .. } => "verified-mapped",
            Self::AgentGone { .. } => "agent-gone",
            Self::HandedOff { .. } => "handed-off",
            Self::Error { .. } => "error",
        }
    }
}

/// The source's hand-off, which starts dirty tracking: the agent accepts it
/// only once its first scan has write-protected the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingSetup {
    /// From connecting to the agent's hand-off socket to its acceptance:
    /// sending the descriptors, the agent's watch of removed pages (its own
    /// mapping of the memory, populated over every data page), and its
    /// first PAGEMAP_SCAN that write-protects every written page.
    pub handoff_us: u64,
    /// The stand-in's page tables (`VmPTE`, KiB) just before the hand-off,
    /// with the memory written and registered for write-protection…
    pub vm_pte_kib_before: u64,
    /// …and right after it, before any vCPU runs: what starting the
    /// tracking added.
    pub vm_pte_kib_after: u64,
}

/// One stdin line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Write(u64),
    /// Pages [first, first + count).
    WriteRange {
        first: u64,
        count: u64,
    },
    Pause,
    Resume,
    Touch(Vec<u64>),
    TouchSpread {
        first: u64,
        count: u64,
    },
    /// Pages the vCPUs share, in this order.
    TouchShared(Vec<u64>),
    Discard(Vec<u64>),
    Verify(PathBuf),
    VerifyMapped(PathBuf),
    Quit,
}

impl Command {
    /// Parses a line; `Ok(None)` for a blank one.
    pub fn parse(line: &str) -> Result<Option<Self>, String> {
        let mut words = line.split_whitespace();
        let Some(verb) = words.next() else { return Ok(None) };
        let rest: Vec<&str> = words.collect();
        let page = |w: &str| w.parse::<u64>().map_err(|_| format!("{verb}: {w:?} is not a page number"));
        let command = match (verb, rest.as_slice()) {
            ("write", [p]) => Self::Write(page(p)?),
            ("write-range", [first, count]) => Self::WriteRange { first: page(first)?, count: page(count)? },
            ("touch-spread", [first, count]) => Self::TouchSpread { first: page(first)?, count: page(count)? },
            ("pause", []) => Self::Pause,
            ("resume", []) => Self::Resume,
            ("touch", pages) if !pages.is_empty() => {
                Self::Touch(pages.iter().map(|p| page(p)).collect::<Result<_, _>>()?)
            }
            ("touch-shared", pages) if !pages.is_empty() => {
                Self::TouchShared(pages.iter().map(|p| page(p)).collect::<Result<_, _>>()?)
            }
            ("discard", pages) if !pages.is_empty() => {
                Self::Discard(pages.iter().map(|p| page(p)).collect::<Result<_, _>>()?)
            }
            ("verify", [path]) => Self::Verify(PathBuf::from(path)),
            ("verify-mapped", [path]) => Self::VerifyMapped(PathBuf::from(path)),
            ("quit", []) => Self::Quit,
            _ => {
                return Err(format!(
                    "unknown command {:?} (expected write P | write-range FIRST COUNT | pause | resume | touch P.. | touch-spread FIRST COUNT | touch-shared P.. | discard P.. | verify PATH | verify-mapped PATH | quit)",
                    line.trim()
                ));
            }
        };
        Ok(Some(command))
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

/// Where events go: one JSON line each, flushed at once. Shared by the
/// command loop and the target guest's thread (`guest-done`).
pub struct EventSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

impl EventSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out: Mutex::new(out) }
    }

    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Writes one event line. A closed stdout is not worth dying for: the
    /// error is logged and the stand-in goes on.
    pub fn emit(&self, event: &StandinEvent) {
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = serde_json::to_writer(&mut *out, event)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(e) = result {
            eprintln!("vmm-standin: cannot write event {}: {e}", event.name());
        }
    }

    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        eprintln!("vmm-standin: {message}");
        self.emit(&StandinEvent::Error { message });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse("write 12"), Ok(Some(Command::Write(12))));
        assert_eq!(Command::parse("  pause "), Ok(Some(Command::Pause)));
        assert_eq!(Command::parse("touch 1 2 3"), Ok(Some(Command::Touch(vec![1, 2, 3]))));
        assert_eq!(Command::parse("verify /x/y"), Ok(Some(Command::Verify("/x/y".into()))));
        assert_eq!(Command::parse("verify-mapped /x"), Ok(Some(Command::VerifyMapped("/x".into()))));
        assert!(Command::parse("verify-mapped").is_err());
        assert_eq!(Command::parse(""), Ok(None));
        assert!(Command::parse("write").is_err());
        assert!(Command::parse("write x").is_err());
        assert!(Command::parse("touch").is_err());
        assert!(Command::parse("dance").is_err());
    }

    #[test]
    fn events_are_tagged_json() {
        let line = serde_json::to_string(&StandinEvent::GuestDone {
            first_access_done_ns: 5,
            accesses: 6,
            pages_written: 7,
            pages_touched: 8,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"event":"guest-done","first_access_done_ns":5,"accesses":6,"pages_written":7,"pages_touched":8}"#
        );
        let ready: StandinEvent =
            serde_json::from_str(r#"{"event":"ready","pid":1,"page_size":4096,"total_pages":2,"zero_pages":[1]}"#)
                .unwrap();
        assert_eq!(ready.name(), "ready");
        assert_eq!(
            serde_json::to_string(&StandinEvent::SnapshotWritten { path: "p".into() }).unwrap(),
            r#"{"event":"snapshot-written","path":"p"}"#
        );
        assert_eq!(serde_json::to_string(&StandinEvent::Resumed).unwrap(), r#"{"event":"resumed"}"#);
        let mapped = StandinEvent::VerifiedMapped { mapped_pages: 3, mismatched_pages: 1, first_mismatches: vec![2] };
        assert_eq!(
            serde_json::to_string(&mapped).unwrap(),
            r#"{"event":"verified-mapped","mapped_pages":3,"mismatched_pages":1,"first_mismatches":[2]}"#
        );
        assert_eq!(mapped.name(), "verified-mapped");
    }
}
