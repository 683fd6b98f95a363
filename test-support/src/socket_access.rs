//! Who may connect to an agent's hand-off socket, as the file system says:
//! its mode and owning group, read from a real agent process's socket, for
//! the `--handoff-group` tests of both agents.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// The permission bits and the owning gid of the socket at `socket`, once
/// the agent `command` starts has said it is listening (it binds its
/// hand-off socket before); the agent is then killed.
pub fn socket_access_of_agent(mut command: Command, socket: &Path) -> (u32, u32) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting the agent");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line);
    let access = std::fs::symlink_metadata(socket).map(|meta| (meta.permissions().mode() & 0o7777, meta.gid()));
    let _ = child.kill();
    let output = child.wait_with_output().expect("waiting for the agent");
    assert!(
        read.is_ok() && line.contains("\"listening\""),
        "the agent did not start: {line:?}; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    access.unwrap_or_else(|e| panic!("stat {}: {e}", socket.display()))
}

/// A group this process does not run as, with its name, from /etc/group
/// (`nogroup` or `nobody` where they exist): one an agent run as root may
/// give its socket to.
pub fn another_group() -> (String, u32) {
    let own = rustix::process::getegid().as_raw();
    let groups = std::fs::read_to_string("/etc/group").expect("reading /etc/group");
    let entries: Vec<(String, u32)> = groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            Some((name.to_owned(), gid))
        })
        .filter(|(_, gid)| *gid != own)
        .collect();
    let preferred = entries.iter().find(|(name, _)| name == "nogroup" || name == "nobody");
    preferred.or(entries.first()).cloned().expect("a group in /etc/group other than this process's")
}
