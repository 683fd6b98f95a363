//! The transport-security flags both agents take, and what they resolve
//! to ([`GrpcSecurity`]): mutual TLS with the given files, or plaintext
//! only when asked for (`--plaintext`, logged as a warning) or when the
//! agent listens on loopback only (nobody off the node can reach it).
//! Anything else refuses to start with a message naming the flags to give:
//! an agent reachable from the network never serves guest memory, or
//! takes pages into a guest, in the clear by accident.
#![forbid(unsafe_code)]

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use pageserver_tls::{ClientTls, ServerNames, ServerTls, TlsError, TlsFiles};

use crate::control_access::ControlAccess;

/// `--tls-cert`, `--tls-key`, `--tls-ca`, `--plaintext`, `--control-allow-name`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// This agent's certificate chain (PEM, leaf first): its server
    /// certificate, and on the target agent also its client certificate
    /// towards the source. Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "PAGESERVER_TLS_CERT", value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PAGESERVER_TLS_KEY", value_name = "PATH", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) every peer's certificate must chain to:
    /// clients of this agent, and the source the target agent dials.
    #[arg(long, env = "PAGESERVER_TLS_CA", value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Serve (and dial) without TLS: no encryption and no client
    /// identities; control RPCs from loopback peers only. For development.
    #[arg(long, env = "PAGESERVER_PLAINTEXT", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub plaintext: bool,
    /// The names (DNS or IP subjectAltName) of the client certificates
    /// that may call the control RPCs (SetPaused, Switchover): the
    /// orchestrator's. Other clients get PERMISSION_DENIED.
    #[arg(
        long,
        env = "PAGESERVER_CONTROL_ALLOW_NAME",
        value_name = "NAME[,NAME...]",
        value_delimiter = ',',
        requires = "tls_cert"
    )]
    pub control_allow_name: Vec<String>,
    /// Also serve gRPC health, and nothing else, in the clear on this
    /// address (e.g. 0.0.0.0:50052): for probes without a client
    /// certificate, such as the kubelet's. Service `liveness` is SERVING
    /// while the agent runs; `""` and the agent's service say what the
    /// main port's health says.
    #[arg(long, env = "PAGESERVER_HEALTH_LISTEN", value_name = "HOST:PORT")]
    pub health_listen: Option<String>,
}

/// What the flags resolve to.
#[derive(Debug, Clone)]
pub struct GrpcSecurity {
    /// `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// The files, for a client this agent makes with the same identity.
    pub files: Option<TlsFiles>,
    pub control: ControlAccess,
    /// `--health-listen`.
    pub health_listen: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "{listen} is reachable from other hosts and no TLS was configured: give --tls-cert, --tls-key and \
         --tls-ca (mutual TLS), or --plaintext to serve without TLS"
    )]
    NoTls { listen: String },
    #[error("loading the TLS certificates")]
    Tls(#[source] TlsError),
    #[error("--control-allow-name")]
    ControlNames(#[source] TlsError),
}

/// Whether `listen` (`HOST:PORT`) binds loopback addresses only; `None`
/// if it resolves to nothing (binding it will fail, with its own error).
pub fn is_loopback(listen: &str) -> Option<bool> {
    let addresses: Vec<_> = listen.to_socket_addrs().ok()?.collect();
    (!addresses.is_empty()).then(|| addresses.iter().all(|address| address.ip().is_loopback()))
}

impl SecurityArgs {
    /// The TLS files, if all three were given.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles { cert: self.tls_cert.clone()?, key: self.tls_key.clone()?, ca: self.tls_ca.clone()? })
    }

    /// Resolves the flags for an agent whose gRPC listener is `listen`;
    /// loads the certificates (a bad file is an error now, not at the
    /// first connection).
    pub fn resolve(&self, listen: &str) -> Result<GrpcSecurity, SecurityError> {
        if let Some(files) = self.files() {
            let tls = ServerTls::load(files.clone()).map_err(SecurityError::Tls)?;
            let names = ServerNames::parse(&self.control_allow_name).map_err(SecurityError::ControlNames)?;
            if names.is_empty() {
                tracing::warn!("no --control-allow-name: every client is refused the control RPCs");
            } else {
                tracing::info!(control = %names, "mutual TLS; control RPCs for these certificate names only");
            }
            return Ok(GrpcSecurity {
                tls: Some(tls),
                files: Some(files),
                control: ControlAccess::CertificateNames(names),
                health_listen: self.health_listen.clone(),
            });
        }
        if self.plaintext {
            tracing::warn!(
                %listen,
                "serving gRPC WITHOUT TLS (--plaintext): no encryption, no client identities; \
                 control RPCs are accepted from loopback peers only"
            );
        } else {
            match is_loopback(listen) {
                Some(true) => tracing::info!(%listen, "no TLS configured: serving plaintext on loopback only"),
                Some(false) => return Err(SecurityError::NoTls { listen: listen.to_owned() }),
                // Binding it fails next, saying why.
                None => {}
            }
        }
        Ok(GrpcSecurity {
            tls: None,
            files: None,
            control: ControlAccess::LoopbackPeers,
            health_listen: self.health_listen.clone(),
        })
    }

    /// The client side of the same identity (the target agent dialling its
    /// source), if TLS is configured.
    pub fn client(&self) -> Result<Option<ClientTls>, SecurityError> {
        self.files().map(ClientTls::load).transpose().map_err(SecurityError::Tls)
    }
}

impl GrpcSecurity {
    /// Plaintext, control from loopback: what an in-process test server
    /// on 127.0.0.1 gets.
    pub fn loopback_plaintext() -> Self {
        Self { tls: None, files: None, control: ControlAccess::LoopbackPeers, health_listen: None }
    }
}
