//! [`ServerTls`]: the TLS side of an agent's gRPC port. Every client must
//! present a certificate chaining to `--tls-ca`; the handshake refuses one
//! that does not, or that has expired, or none at all.
#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::TlsError;
use crate::files::{LoadedTls, TlsFiles};
use crate::reloading::{Reload, Reloading};
use crate::{ALPN_H2, provider};

/// An agent's server certificate and the CA its clients must chain to,
/// reloaded as [`crate::reloading`] says.
#[derive(Debug, Clone)]
pub struct ServerTls(Arc<Reloading<ServerConfig>>);

fn build(files: &TlsFiles, loaded: &LoadedTls) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(loaded.roots.clone(), provider())
        .build()
        .map_err(|source| TlsError::Verifier { path: files.ca.clone(), source })?;
    let identity = |source| TlsError::Identity { cert: files.cert.clone(), key: files.key.clone(), source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.chain.clone(), loaded.key.clone_key())
        .map_err(identity)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

impl ServerTls {
    /// Reads the files: an error names the one that is wrong.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(Reloading::load("server", files, build)?)))
    }

    /// The handshake of one new connection, with the certificates in use now.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        TlsAcceptor::from(self.0.current()).accept(io).await
    }

    /// For [`crate::watch`].
    pub fn reloading(&self) -> Arc<dyn Reload> {
        self.0.clone()
    }

    pub fn files(&self) -> &TlsFiles {
        self.0.files()
    }
}
