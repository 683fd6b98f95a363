//! Mutual TLS between the agents and their clients.
//!
//! The source agent hands out a VM's memory and the target agent installs
//! what it receives into a running guest, so both gRPC ports speak TLS and
//! both sides prove who they are: every certificate must chain to the CA the
//! agent is given (`--tls-ca`), a server's certificate must be valid for the
//! name its client dialled, and a client without a certificate, with one
//! from another CA, or with an expired one never gets past the handshake.
//!
//! Certificates are read from PEM files and reloaded when the files change
//! (cert-manager rotates them in Kubernetes) or on SIGHUP. A reload only
//! affects the handshakes after it: the connections already made, and the
//! migration streams they carry, go on undisturbed. A reload that fails
//! (a half-written file, a key that does not match) keeps the certificates
//! in use and says so in the log and in `pageserver_tls_reloads_total`.
//!
//! # Layout
//!
//! - [`files`]: [`TlsFiles`], the three PEM files and what is in them;
//! - [`reloading`]: [`Reloading`], a rustls configuration rebuilt from its
//!   files when they change, and [`watch`], the task that notices;
//! - [`server`]: [`ServerTls`], the acceptor of an agent's gRPC port
//!   (client certificates required);
//! - [`client`]: [`ClientTls`] and the tonic connector that dials a server
//!   and verifies its name, over plain TCP or TLS ([`ClientStream`]);
//! - [`peer`]: the verified certificate of a request's client and the names
//!   it is valid for (who may steer a migration);
//! - [`generate`] (feature `generate`): throwaway CAs and certificates;
//! - [`error`]: what can go wrong.
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod files;
#[cfg(feature = "generate")]
pub mod generate;
pub mod peer;
pub mod reloading;
pub mod server;

pub use client::{ClientStream, ClientTls, connector, endpoint};
pub use error::TlsError;
pub use files::TlsFiles;
pub use peer::{PeerCertificate, ServerNames};
pub use reloading::{Reloading, watch};
pub use server::ServerTls;

/// The one protocol both sides offer in ALPN: gRPC is HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// The cryptography both sides use (ring, as tonic's `tls-ring`).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
