//! Who may hand guest memory over: the hand-off socket's allow-list of
//! peer uids, checked on every connection, the same for both agents.
//!
//! The socket's mode (0600, see [`crate::handoff_socket`]) already keeps
//! other users out, but only as long as nobody loosens it (a `chmod` to let a
//! VMM of another user in, a directory shared through a group). The kernel
//! knows who is at the other end of a Unix socket (`SO_PEERCRED`: the uid
//! and pid of the process that connected, as of its `connect`), so each
//! agent asks it before it reads a single byte of a hand-off, and refuses a
//! peer whose uid is not on the list ([`PeerAllowList::check`]): the
//! descriptors a hand-off carries give full control of a guest's memory.
//!
//! The list comes from `--handoff-allow-uid UID[,UID...]`
//! (`PAGESERVER_HANDOFF_ALLOW_UID`); without it, only the agent's own uid is
//! allowed.
#![forbid(unsafe_code)]

use std::fmt;
use std::os::unix::net::UnixStream;
use std::str::FromStr;

use crate::error::{PeerAllowListError, PeerRefused};

/// The uids whose processes may hand memory over (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAllowList {
    uids: Vec<u32>,
}

/// Who connected, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    /// 0 if the peer's process is not visible in this pid namespace.
    pub pid: i32,
}

impl PeerAllowList {
    /// Only the uid this process runs as: the default.
    pub fn own_uid() -> Self {
        Self { uids: vec![rustix::process::getuid().as_raw()] }
    }

    /// The uids allowed, in the order given.
    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// The credentials of the process at the other end of `connection`, if
    /// its uid is on the list; otherwise (or if the kernel cannot say) why
    /// it is refused. The refusal's message is meant for the peer's reply.
    pub fn check(&self, connection: &UnixStream) -> Result<PeerCredentials, PeerRefused> {
        // nix, not rustix: rustix's `UCred` holds the pid as a non-zero `Pid`,
        // and the kernel says 0 for a peer in another pid namespace (a VMM in
        // another container of the pod), which rustix turned into an error.
        let credentials = nix::sys::socket::getsockopt(connection, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| PeerRefused::Unknown(e.into()))?;
        let peer = PeerCredentials { uid: credentials.uid(), pid: credentials.pid() };
        if self.uids.contains(&peer.uid) {
            Ok(peer)
        } else {
            Err(PeerRefused::NotAllowed { uid: peer.uid, pid: peer.pid, allowed: self.uids.clone() })
        }
    }
}

/// `UID[,UID...]`, e.g. `0,1000`: the value of `--handoff-allow-uid`.
impl FromStr for PeerAllowList {
    type Err = PeerAllowListError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let uids = text
            .split(',')
            .map(|uid| {
                let uid = uid.trim();
                uid.parse::<u32>().map_err(|source| PeerAllowListError::NotAUid {
                    uid: uid.to_owned(),
                    list: text.to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { uids })
    }
}

/// The list as `--handoff-allow-uid` takes it.
impl fmt::Display for PeerAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uids: Vec<String> = self.uids.iter().map(u32::to_string).collect();
        f.write_str(&uids.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_uids_is_parsed() {
        let list: PeerAllowList = "0,1000, 65534".parse().expect("a valid list");
        assert_eq!(list.uids(), [0, 1000, 65534]);
        assert_eq!(list.to_string(), "0,1000,65534");
        assert_eq!("42".parse::<PeerAllowList>().expect("one uid").uids(), [42]);
    }

    #[test]
    fn bad_lists_are_refused_naming_the_bad_uid() {
        for (text, bad) in
            [("abc", "abc"), ("0,abc", "abc"), ("", ""), ("0,", ""), ("-1", "-1"), ("4294967296", "4294967296")]
        {
            let error = text.parse::<PeerAllowList>().expect_err(text).to_string();
            assert!(error.contains(&format!("{bad:?} is not a uid")), "{text:?}: {error}");
            assert!(error.contains(&format!("{text:?}")), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_default_is_this_process_uid() {
        assert_eq!(PeerAllowList::own_uid().uids(), [rustix::process::getuid().as_raw()]);
    }

    #[test]
    fn a_peer_of_an_allowed_uid_passes_and_another_is_refused_with_its_uid_and_pid() {
        let (here, _there) = UnixStream::pair().expect("socketpair");
        let own = rustix::process::getuid().as_raw();
        let peer = PeerAllowList::own_uid().check(&here).expect("this process's own uid");
        assert_eq!(peer, PeerCredentials { uid: own, pid: std::process::id() as i32 });
        let others = PeerAllowList { uids: vec![own.wrapping_add(1)] };
        let refused = others.check(&here).expect_err("not on the list").to_string();
        let expected = format!(
            "hand-off refused: peer uid {own} (pid {}) is not allowed; this agent accepts uids [{}] \
             (--handoff-allow-uid)",
            std::process::id(),
            own.wrapping_add(1)
        );
        assert_eq!(refused, expected);
    }
}
