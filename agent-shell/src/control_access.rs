//! Who may steer a migration. `MigrationSource/SetPaused` and
//! `MigrationTarget/Switchover` change what the guest will see: declaring
//! a running VM paused would let a target install pages that are still
//! changing. Page reads and status are for any client the transport let
//! in; these control RPCs only for the orchestrator:
//!
//! - over mutual TLS, a client whose certificate is valid for one of the
//!   names given with `--control-allow-name` (its subjectAltName, checked
//!   as a server's name is: DNS names or IP addresses);
//! - under plaintext there is no identity to check, so only a peer on a
//!   loopback address (a process on the same node) may call them.
//!
//! Everyone else gets PERMISSION_DENIED saying what would be accepted; the
//! agent logs the refusal with the peer's address and counts it in
//! `pageserver_control_denied_total{rpc}`.
#![forbid(unsafe_code)]

use pageserver_tls::{PeerCertificate, ServerNames};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

/// The rule an agent applies to its control RPCs.
#[derive(Debug, Clone)]
pub enum ControlAccess {
    /// Mutual TLS: client certificates valid for one of these names (none:
    /// nobody may steer this agent).
    CertificateNames(ServerNames),
    /// Plaintext: peers on a loopback address.
    LoopbackPeers,
}

fn remote_address<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.get_ref().remote_addr()))
}

impl ControlAccess {
    /// `Ok` if `request` may call `rpc` (e.g. "MigrationTarget/Switchover");
    /// else PERMISSION_DENIED, logged and counted.
    pub fn authorize<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        let peer = remote_address(request);
        let refusal = match self {
            ControlAccess::CertificateNames(names) => match PeerCertificate::of(request) {
                Some(cert) => match cert.valid_for(names) {
                    Some(name) => {
                        tracing::debug!(rpc, name = %name.to_str(), "control call authorised by its certificate");
                        return Ok(());
                    }
                    None if names.is_empty() => {
                        format!("{rpc} is refused to every client: this agent was given no --control-allow-name")
                    }
                    None => format!(
                        "{rpc} is for the orchestrator: the client certificate must be valid for one of {names} \
                         (--control-allow-name), and this one is not"
                    ),
                },
                None => format!("{rpc} needs a client certificate valid for one of {names}: none was presented"),
            },
            ControlAccess::LoopbackPeers => match peer {
                Some(address) if address.ip().is_loopback() => return Ok(()),
                Some(address) => format!(
                    "{rpc} is refused to {address}: without TLS (--plaintext) only clients on this node's \
                     loopback may steer a migration; give the agents certificates to steer it from elsewhere"
                ),
                None => format!("{rpc} is refused: the peer's address is unknown and this agent runs without TLS"),
            },
        };
        let peer = peer.map(|address| address.to_string()).unwrap_or_else(|| "unknown".to_owned());
        tracing::warn!(rpc, %peer, reason = %refusal, "control call refused");
        metrics::counter!("pageserver_control_denied_total", "rpc" => rpc).increment(1);
        Err(Status::permission_denied(refusal))
    }
}

#[cfg(test)]
mod tests;
