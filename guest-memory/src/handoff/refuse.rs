//! Refusing a hand-off the agent will not take, whatever it carries: an
//! agent that already has its VM's memory says so to any later VMM (or a
//! second connection of the same one), on both sides of a migration.
//!
//! The VMM's message is read first, up to its newline (at most
//! [`MAX_MESSAGE_BYTES`]), and the descriptors attached to it are closed at
//! once: a VMM whose send had not finished must not fail on a closed socket
//! before it can read why, and no descriptor of another VM's memory stays
//! open here. Then the reply, `{"ok":false,"error":REASON}`, and the
//! connection is closed.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{HandoffReply, MAX_MESSAGE_BYTES, READ_CHUNK};
use crate::fd_passing::recv_with_fds;

/// Answers the hand-off on `stream` with a refusal naming `reason`; a peer
/// gets `timeout` for each read and for the reply. Best effort: a peer that
/// went away meanwhile is no error.
pub fn refuse_handoff(stream: UnixStream, reason: &str, timeout: Duration) {
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut received = 0;
    while received < MAX_MESSAGE_BYTES {
        // Any descriptors attached are dropped (closed) right away.
        match recv_with_fds(stream.as_fd(), &mut buffer) {
            Ok((0, _)) | Err(_) => break,
            Ok((n, _fds)) if buffer[..n].contains(&b'\n') => break,
            Ok((n, _fds)) => received += n,
        }
    }
    let reply = HandoffReply { ok: false, error: Some(reason.to_owned()) };
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = (&stream).write_all(&line);
    }
}
