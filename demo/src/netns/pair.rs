//! The two namespaces and the veth link between them: made (with an
//! optional rate limit), taken down and up, and removed, also when dropped
//! (on error and on panic).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::NetError;
use super::tool::run;

/// Every namespace the demo makes starts with this (then `PID-N-SIDE`).
pub const NAMESPACE_PREFIX: &str = "psdemo-";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
const SOURCE_VETH: &str = "psdemo-src";
const TARGET_VETH: &str = "psdemo-tgt";
/// A /30: the two hosts and nothing else.
const PREFIX_LEN: u8 = 30;
/// The link's addresses come from 10.200.0.0/13: 2^17 /30 blocks.
const ADDRESS_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
const ADDRESS_BLOCKS: u32 = 1 << 17;
/// The queue a rate-limited end may hold before it drops (tbf `latency`).
const SHAPING_LATENCY: &str = "50ms";

/// One host: its namespace, its end of the link and its address there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub namespace: String,
    pub veth: String,
    pub addr: Ipv4Addr,
}

impl Side {
    /// The namespace's file, which `setns` enters.
    pub fn namespace_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.namespace)
    }

    /// `ip netns exec NAMESPACE PROGRAM ARGS...`, as `ip`'s arguments: runs
    /// the program inside this host's namespace (`ip` execs it, so the child
    /// is the program itself).
    pub fn exec_args(&self, program: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
        let mut all: Vec<OsString> = ["netns", "exec", &self.namespace].map(OsString::from).into();
        all.push(program.into());
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        all
    }

    /// `ip -n NAMESPACE ARGS...`.
    fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        let mut all = vec!["-n", &self.namespace];
        all.extend_from_slice(args);
        Ok(run("ip", &all)?)
    }
}

/// The addresses of migration `n` of process `pid`: the first two hosts of
/// a /30 in 10.200.0.0/13 (source, target).
pub fn link_addresses(pid: u32, n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let block = pid.wrapping_mul(16).wrapping_add(n) % ADDRESS_BLOCKS;
    let net = u32::from(ADDRESS_BASE) + block * 4;
    (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2))
}

/// The two hosts of one migration; removed when dropped.
#[derive(Debug)]
pub struct TwoHosts {
    pub source: Side,
    pub target: Side,
    /// The namespaces made so far, in order.
    made: Vec<String>,
}

impl TwoHosts {
    /// Removes leftovers of dead demos, then makes both namespaces (`lo`
    /// up), the veth link with its addresses, and its rate limit in both
    /// directions if `rate_bits` is given. Whatever was made is removed
    /// again if a step fails.
    pub fn create(rate_bits: Option<u64>) -> Result<Self, NetError> {
        static MIGRATIONS: AtomicU32 = AtomicU32::new(0);
        remove_leftovers();
        let (pid, n) = (std::process::id(), MIGRATIONS.fetch_add(1, Ordering::Relaxed));
        let (source_addr, target_addr) = link_addresses(pid, n);
        let side = |role: &str, veth: &str, addr| Side {
            namespace: format!("{NAMESPACE_PREFIX}{pid}-{n}-{role}"),
            veth: veth.to_owned(),
            addr,
        };
        let mut hosts = TwoHosts {
            source: side("source", SOURCE_VETH, source_addr),
            target: side("target", TARGET_VETH, target_addr),
            made: Vec::new(),
        };
        for namespace in [hosts.source.namespace.clone(), hosts.target.namespace.clone()] {
            run("ip", &["netns", "add", &namespace])?;
            hosts.made.push(namespace);
        }
        let (source, target) = (&hosts.source, &hosts.target);
        // Both ends are made inside their namespaces: none is ever in the
        // root namespace.
        let add = format!(
            "link add {} netns {} type veth peer name {} netns {}",
            source.veth, source.namespace, target.veth, target.namespace
        );
        run("ip", &add.split(' ').collect::<Vec<_>>())?;
        for side in [source, target] {
            side.ip(&["addr", "add", &format!("{}/{PREFIX_LEN}", side.addr), "dev", &side.veth])?;
            side.ip(&["link", "set", "lo", "up"])?;
            side.ip(&["link", "set", &side.veth, "up"])?;
            if let Some(bits) = rate_bits {
                limit_rate(side, bits)?;
            }
        }
        Ok(hosts)
    }

    /// Takes the link down (the target's end) or up again.
    pub fn set_link_up(&self, up: bool) -> Result<(), NetError> {
        self.target.ip(&["link", "set", &self.target.veth, if up { "up" } else { "down" }]).map(drop)
    }

    /// The queueing discipline on each end, as `tc` shows it (source's,
    /// target's).
    pub fn qdiscs(&self) -> Result<(String, String), NetError> {
        let show = |side: &Side| -> Result<String, NetError> {
            let out = run("tc", &["-n", &side.namespace, "qdisc", "show", "dev", &side.veth])?;
            Ok(out.trim().to_owned())
        };
        Ok((show(&self.source)?, show(&self.target)?))
    }

    /// Removes the link and both namespaces; the first error, if any
    /// (every step is tried).
    fn remove(&mut self) -> Result<(), NetError> {
        let mut result = Ok(());
        if self.made.contains(&self.source.namespace) {
            // The link goes at once, even if a dying child still holds its
            // namespace (which lives until the child is gone). No link is no
            // error: its creation may have failed.
            if let Err(e) = self.source.ip(&["link", "del", &self.source.veth])
                && self.source.ip(&["link", "show", &self.source.veth]).is_ok()
            {
                result = Err(e);
            }
        }
        for namespace in self.made.drain(..).rev() {
            if let Err(e) = run("ip", &["netns", "del", &namespace]) {
                result = result.and(Err(e.into()));
            }
        }
        result
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("pageserver-demo: removing the two hosts' namespaces: {e}");
        }
    }
}

/// A token bucket on `side`'s end of the link: what leaves it, so one
/// direction; both ends make both.
fn limit_rate(side: &Side, bits: u64) -> Result<(), NetError> {
    // The bucket holds 1 ms at the rate, and at least one 64 KiB GSO packet.
    let burst = (bits / 8 / 1000).max(64 << 10);
    let tbf = format!(
        "-n {} qdisc replace dev {} root tbf rate {bits}bit burst {burst} latency {SHAPING_LATENCY}",
        side.namespace, side.veth
    );
    run("tc", &tbf.split(' ').collect::<Vec<_>>())?;
    Ok(())
}

/// The process id in a demo namespace's name (`psdemo-PID-N-SIDE`).
fn demo_pid(namespace: &str) -> Option<u32> {
    namespace.strip_prefix(NAMESPACE_PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the namespaces (and links) of demos that no longer run: a demo
/// killed with SIGKILL cannot remove its own.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let namespace = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = demo_pid(&namespace) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let veth = if namespace.ends_with("-source") { SOURCE_VETH } else { TARGET_VETH };
        // The link may be gone already (with the other namespace).
        let _ = run("ip", &["-n", &namespace, "link", "del", veth]);
        match run("ip", &["netns", "del", &namespace]) {
            Ok(_) => eprintln!("pageserver-demo: removed {namespace}, left by process {pid}, which no longer runs"),
            Err(e) => eprintln!("pageserver-demo: cannot remove {namespace}, left by process {pid}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_addresses_are_a_private_slash_30() {
        for (pid, n) in [(1, 0), (4_194_304, 7), (u32::MAX, u32::MAX), (12_345, 1)] {
            let (source, target) = link_addresses(pid, n);
            assert_eq!(u32::from(target), u32::from(source) + 1);
            assert_eq!(u32::from(source) % 4, 1, "{source} is the first host of its /30");
            assert!(source.is_private(), "{source}");
            assert_eq!(source.octets()[1] & 0xf8, 200, "{source} is in 10.200.0.0/13");
        }
        assert_ne!(link_addresses(12_345, 0), link_addresses(12_345, 1));
        assert_ne!(link_addresses(12_345, 0), link_addresses(12_346, 0));
    }

    #[test]
    fn only_demo_namespaces_have_a_pid() {
        assert_eq!(demo_pid("psdemo-4321-0-source"), Some(4321));
        assert_eq!(demo_pid("psdemo-x-0-source"), None);
        assert_eq!(demo_pid("other-4321"), None);
    }
}
