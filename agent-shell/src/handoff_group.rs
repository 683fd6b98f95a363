//! The group a hand-off socket may be shared with (`--handoff-group`), the
//! same flag on both agents.
//!
//! By default the socket is mode 0600: only the agent's own user may
//! connect. A VMM that runs as another user (libvirt's `qemu`, say) needs
//! a way in that does not open the socket to everyone: with
//! `--handoff-group GROUP` the socket belongs to that group and is mode
//! 0660, so members of the group may connect. Connecting is not enough to
//! hand memory over: every peer's uid is still checked against
//! `--handoff-allow-uid` ([`crate::handoff_peers`]).
//!
//! The group is resolved when the flags are parsed (a name through the
//! system's group database, or a numeric gid taken as it is), so a name that
//! does not exist stops the agent before it binds anything; a group the agent
//! may not give its socket to (it is neither root nor a member) stops it when
//! the socket is bound, still before it says it is listening.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use crate::error::HandoffGroupError;

/// A group, resolved to its gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffGroup {
    gid: u32,
    /// As given on the command line, for messages.
    given: String,
}

impl HandoffGroup {
    /// The group's id.
    pub fn gid(&self) -> u32 {
        self.gid
    }
}

/// `--handoff-group`, for a binary's flags (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HandoffGroupArg {
    /// Share the hand-off socket with this group (a name or a numeric gid):
    /// the socket then belongs to it and is mode 0660 instead of 0600, so
    /// that a VMM of another user in that group may connect (its uid must
    /// still be allowed by --handoff-allow-uid). The agent must be a member
    /// of the group, or root.
    #[arg(long = "handoff-group", env = "PAGESERVER_HANDOFF_GROUP", value_name = "GROUP")]
    pub group: Option<HandoffGroup>,
}

/// A group name, or a numeric gid.
impl FromStr for HandoffGroup {
    type Err = HandoffGroupError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let given = text.trim();
        if given.is_empty() {
            return Err(HandoffGroupError::Empty);
        }
        if given.bytes().all(|b| b.is_ascii_digit()) {
            let gid = given
                .parse::<u32>()
                .map_err(|source| HandoffGroupError::NotAGid { given: given.to_owned(), source })?;
            return Ok(Self { gid, given: given.to_owned() });
        }
        match nix::unistd::Group::from_name(given) {
            Ok(Some(group)) => Ok(Self { gid: group.gid.as_raw(), given: given.to_owned() }),
            Ok(None) => Err(HandoffGroupError::NoSuchGroup { name: given.to_owned() }),
            Err(errno) => {
                Err(HandoffGroupError::Lookup { name: given.to_owned(), source: std::io::Error::from(errno) })
            }
        }
    }
}

/// `NAME (gid N)`, or `gid N` when given as a number.
impl fmt::Display for HandoffGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.given == self.gid.to_string() {
            write!(f, "gid {}", self.gid)
        } else {
            write!(f, "{} (gid {})", self.given, self.gid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_numeric_gid_is_taken_as_it_is() {
        let group: HandoffGroup = "4242".parse().expect("a gid");
        assert_eq!(group.gid(), 4242);
        assert_eq!(group.to_string(), "gid 4242");
    }

    #[test]
    fn a_name_is_resolved_through_the_group_database() {
        // Every system has a group 0, whatever it is called.
        let root = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0)).expect("lookup").expect("group 0");
        let group: HandoffGroup = root.name.parse().expect("an existing group");
        assert_eq!(group.gid(), 0);
        assert_eq!(group.to_string(), format!("{} (gid 0)", root.name));
    }

    #[test]
    fn bad_groups_are_refused_with_the_reason() {
        for (text, reason) in [
            ("no-such-group-pageserver", "no group named \"no-such-group-pageserver\""),
            ("", "an empty group"),
            ("4294967296", "\"4294967296\" is not a gid"),
        ] {
            let error = text.parse::<HandoffGroup>().expect_err(text).to_string();
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }
}
