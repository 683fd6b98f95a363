//! The source agent only reads the guest's memory: after a VMM's hand-off to
//! a real `source-agent` process, every mapping that process has of the
//! guest memory file is read-only, as `/proc/PID/maps` shows it. The VMM's
//! descriptor is open for writing (the agent's watch on the file's holes is
//! mapped from it), so nothing but the agent's own care keeps a bug of its
//! from writing into the running guest through a writable mapping.

mod common;

use std::process::Child;

use common::TestVmm;

const PAGES: u64 = 16;

/// The agent process; killed when dropped (also when an assertion fails).
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of `/proc/PID/maps` that map the file of inode `inode` (the
/// sixth field is the path, the fifth the inode).
fn mappings_of(maps: &str, inode: u64) -> Vec<&str> {
    maps.lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 6 && fields[4] == inode.to_string() && fields[5].starts_with("/memfd:")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapping_of_the_guest_memory_in_the_agent_is_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("source.sock");
    let agent = AgentProcess(common::agent_process_waiting(&socket));
    let vmm: TestVmm = common::handed_off(&socket, PAGES).await;
    let inode = rustix::fs::fstat(&vmm.memory).expect("fstat the guest memory").st_ino;
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", agent.0.id())).expect("the agent's maps");
    let guest = mappings_of(&maps, inode);
    // Not vacuous: the agent maps the file (its watch on the holes).
    assert!(!guest.is_empty(), "no mapping of the guest memory (inode {inode}) in the agent:\n{maps}");
    for mapping in guest {
        let permissions = mapping.split_whitespace().nth(1).expect("the permissions field");
        assert!(!permissions.contains('w'), "a writable mapping of the guest memory in the agent: {mapping}");
    }
    drop(agent);
    drop(vmm);
}
