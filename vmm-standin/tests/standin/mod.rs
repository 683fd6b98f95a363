//! Runs one `vmm-standin` process for a test, which plays the agent, and
//! what the target-role tests prepare alike: the source's memory as a
//! snapshot, half of it "pre-copied", and a fault server for the rest.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use guest_memory::{MemoryMap, RegionLayout, Userfaultfd};
use pageserver_test_support::{FaultServer, PATIENCE, TestChild};
use vmm_standin::{StandinEvent, pattern};

/// A running stand-in: commands in, events out, stderr shown if the test
/// fails. Killed when dropped.
pub struct Standin {
    child: TestChild,
}

impl Standin {
    /// Starts a stand-in in `role` with `memory` (e.g. "4M"), handing off
    /// to `socket`, with `extra` arguments.
    pub fn spawn(role: &str, memory: &str, socket: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-standin"));
        command
            .args(["--role", role, "--memory", memory, "--vm", "test-vm", "--handoff-socket"])
            .arg(socket)
            .args(extra);
        Self { child: TestChild::spawn(&format!("vmm-standin-{role}"), command) }
    }

    /// The process, for the hand-off listener and its id.
    pub fn process(&mut self) -> &mut TestChild {
        &mut self.child
    }

    pub fn send(&mut self, command: &str) {
        self.child.send(command);
    }

    /// The next event, or a panic after [`PATIENCE`].
    pub fn event(&mut self) -> StandinEvent {
        let line = self.child.line().unwrap_or_else(|| panic!("vmm-standin closed its stdout"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event line {line:?}: {e}"))
    }

    /// Sends `command` and returns the event that answers it.
    pub fn request(&mut self, command: &str) -> StandinEvent {
        self.send(command);
        self.event()
    }

    /// Closes stdin (after `quit`, if asked) and returns whether it exited
    /// with 0 within [`PATIENCE`].
    pub fn finish(mut self, with_quit: bool) -> bool {
        if with_quit {
            self.send("quit");
        }
        self.child.close_stdin();
        self.child.wait(PATIENCE).success()
    }
}

/// The source's memory for `seed` (every page's initial content), written to
/// `snapshot` and returned. Its even pages that are not holes are also
/// "pre-copied" into the target's memory file through `agent_map`, as the
/// agent's pre-copy would; the others stay holes (they fault MISSING).
pub fn snapshot_and_precopy_even_pages(agent_map: &MemoryMap, seed: u64, page_size: u64, snapshot: &Path) -> Vec<u8> {
    let mut expected = vec![0u8; agent_map.len()];
    for (page, chunk) in expected.chunks_exact_mut(page_size as usize).enumerate() {
        pattern::initial_page(seed, page as u64, chunk);
        if page % 2 == 0 && !pattern::is_initial_hole(seed, page as u64) {
            agent_map.copy_in(page * page_size as usize, chunk);
        }
    }
    std::fs::write(snapshot, &expected).expect("writing the snapshot");
    expected
}

/// A fault server whose MISSING faults get the seed's content, as if
/// fetched from the source.
pub fn seed_fault_server(uffd: Userfaultfd, region: RegionLayout, seed: u64) -> FaultServer {
    FaultServer::start(uffd, region, move |page, buf| pattern::initial_page(seed, page, buf))
}

/// One page of each kind a target fault tells apart, after
/// [`snapshot_and_precopy_even_pages`].
#[derive(Debug, Clone, Copy)]
pub struct SamplePages {
    /// In the memory file: a MINOR fault.
    pub precopied: u64,
    /// Not pre-copied, not a hole on the source: a MISSING fault.
    pub missing: u64,
    /// A hole on the source too: a MISSING fault.
    pub hole: u64,
}

impl SamplePages {
    /// The first page of each kind for `seed`.
    pub fn find(seed: u64, total_pages: u64) -> Self {
        let first = |pred: &dyn Fn(u64) -> bool| (0..total_pages).find(|&p| pred(p)).expect("such a page");
        Self {
            precopied: first(&|p| p % 2 == 0 && !pattern::is_initial_hole(seed, p)),
            missing: first(&|p| p % 2 == 1 && !pattern::is_initial_hole(seed, p)),
            hole: first(&|p| pattern::is_initial_hole(seed, p)),
        }
    }
}
