//! What a process holds, from /proc: open descriptors, threads, private
//! memory. The demo samples the target agent before its first chaos event
//! and at the end of the migration, so that a leak across reconnects and
//! restarts shows in the report, and both agents at the end (what an agent
//! costs per GiB of guest).
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// One sample of a process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessResources {
    /// Entries of /proc/PID/fd.
    pub fds: u64,
    /// `Threads:` of /proc/PID/status.
    pub threads: u64,
    /// `RssAnon:` of /proc/PID/status (private anonymous memory), KiB.
    pub rss_anon_kib: u64,
    /// `VmPTE:` of /proc/PID/status (its page tables), KiB.
    #[serde(default)]
    pub page_tables_kib: u64,
    /// `VmRSS:` of /proc/PID/status (all resident memory, the guest memory
    /// it maps included), KiB.
    #[serde(default)]
    pub vm_rss_kib: u64,
}

impl ProcessResources {
    /// Private memory: anonymous memory and page tables (not the guest
    /// memory it maps, which is shared), KiB.
    pub fn private_kib(&self) -> u64 {
        self.rss_anon_kib + self.page_tables_kib
    }
}

impl ProcessResources {
    /// Samples process `pid`.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0)
        };
        Ok(Self {
            fds,
            threads: field("Threads:"),
            rss_anon_kib: field("RssAnon:"),
            page_tables_kib: field("VmPTE:"),
            vm_rss_kib: field("VmRSS:"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_descriptors_threads_and_memory() {
        let me = ProcessResources::of(std::process::id()).expect("/proc");
        assert!(me.fds >= 3 && me.threads >= 1 && me.rss_anon_kib > 0 && me.page_tables_kib > 0, "{me:?}");
    }
}
