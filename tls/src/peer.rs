//! Who a request comes from: the verified certificate its client presented
//! in the TLS handshake, and the names it is valid for. The agents give
//! control RPCs only to the orchestrator's names (`--control-allow-name`).
#![forbid(unsafe_code)]

use std::fmt;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::error::TlsError;

/// Names a certificate may be valid for: DNS names or IP addresses,
/// checked as a server's are (its subjectAltName entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames(Vec<ServerName<'static>>);

impl ServerNames {
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, TlsError> {
        names
            .iter()
            .map(|name| {
                let name = name.as_ref().trim().to_owned();
                ServerName::try_from(name.clone()).map_err(|source| TlsError::ServerName { name, source })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ServerNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(|name| name.to_str().into_owned()).collect();
        write!(f, "[{}]", names.join(", "))
    }
}

/// The leaf certificate a client proved it holds the key of (the handshake
/// verified its chain to the CA and its validity).
#[derive(Debug, Clone)]
pub struct PeerCertificate(CertificateDer<'static>);

impl PeerCertificate {
    /// The client certificate of the connection `request` came on; `None`
    /// on a connection without TLS.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
        info.peer_certs()?.first().cloned().map(Self)
    }

    pub fn from_der(der: CertificateDer<'static>) -> Self {
        Self(der)
    }

    /// The first of `names` this certificate is valid for, if any.
    pub fn valid_for<'n>(&self, names: &'n ServerNames) -> Option<&'n ServerName<'static>> {
        let cert = webpki::EndEntityCert::try_from(&self.0).ok()?;
        names.0.iter().find(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
    }
}
