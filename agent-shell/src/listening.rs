//! The one line an agent prints on stdout once it is reachable:
//! `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}`. Whoever starts
//! the agent on port 0 reads the addresses it got from it.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;

use serde::Serialize;

/// The `listening` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListeningEvent {
    /// Always `"listening"`.
    pub event: &'static str,
    /// The bound gRPC address.
    pub grpc: String,
    /// The bound `/metrics` address.
    pub metrics: String,
}

impl ListeningEvent {
    pub fn new(grpc: SocketAddr, metrics: SocketAddr) -> Self {
        Self { event: "listening", grpc: grpc.to_string(), metrics: metrics.to_string() }
    }
}

/// Writes the event as one JSON line to `out` and flushes it.
pub fn announce_listening(out: &mut impl Write, event: &ListeningEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_the_documented_json() {
        let event = ListeningEvent::new(
            "127.0.0.1:50051".parse().expect("address"),
            "127.0.0.1:9464".parse().expect("address"),
        );
        let mut out = Vec::new();
        announce_listening(&mut out, &event).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\"event\":\"listening\",\"grpc\":\"127.0.0.1:50051\",\"metrics\":\"127.0.0.1:9464\"}\n"
        );
    }
}
