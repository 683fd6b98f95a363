//! What can go wrong with certificates: each error names the file and
//! carries its cause, so that an agent refusing to start says which flag
//! points at what.
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the {what} {path}", path = path.display())]
    Read {
        /// Which file: "certificate (--tls-cert)", "key (--tls-key)", "CA (--tls-ca)".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the {what} {path} holds no PEM {expected}", path = path.display())]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("the {what} {path} is not valid PEM", path = path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("a certificate in the CA file {path} cannot be a trust anchor", path = path.display())]
    Anchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA file {path} yields no verifier", path = path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the certificate {cert} and the key {key} do not make a TLS identity", cert = cert.display(), key = key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{name:?} is not a DNS name or an IP address a certificate can be checked against")]
    ServerName {
        name: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
}
