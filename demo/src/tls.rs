//! The demo's mutual TLS, on unless `--plaintext`: a throwaway CA made in
//! the run's work directory, a certificate for each agent (valid for the
//! addresses its clients dial: 127.0.0.1, `localhost`, and with two hosts
//! the link addresses), and one for the demo itself as the orchestrator,
//! the only name the agents let steer the migration
//! (`--control-allow-name`). The files go when the work directory does.

use std::path::Path;

use pageserver_tls::generate::{Authority, Validity};
use pageserver_tls::{ClientTls, TlsFiles};

/// The orchestrator's certificate name: the demo's, as the agents'
/// `--control-allow-name`.
pub const ORCHESTRATOR_NAME: &str = "orchestrator.pageserver.demo";

/// The file names (`STEM.crt`, `STEM.key`) of each agent's certificate.
const SOURCE_STEM: &str = "source-agent";
const TARGET_STEM: &str = "target-agent";

/// The certificates of one run.
#[derive(Debug, Clone)]
pub struct DemoTls {
    ca: std::sync::Arc<Authority>,
    /// The names the agents' certificates are valid for.
    names: Vec<String>,
    source: TlsFiles,
    target: TlsFiles,
    /// The demo's own client identity…
    pub orchestrator: ClientTls,
    /// …and its files, for `pageserver-migrate`.
    orchestrator_files: TlsFiles,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoTlsError {
    #[error("generating the demo's certificates")]
    Generate(#[source] rcgen::Error),
    #[error("writing the demo's certificates to {dir}", dir = dir.display())]
    Write {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the demo's certificates")]
    Load(#[source] pageserver_tls::TlsError),
}

impl DemoTls {
    /// A CA and three certificates in `dir`; the agents' are valid for
    /// `addresses` (IPs or DNS names) besides 127.0.0.1 and `localhost`.
    pub fn create(dir: &Path, addresses: &[String]) -> Result<Self, DemoTlsError> {
        let ca = Authority::new("pageserver demo CA").map_err(DemoTlsError::Generate)?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(addresses.iter().cloned());
        let write = |stem: &str, names: &[String]| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let issued = ca.issue(&names, Validity::Current).map_err(DemoTlsError::Generate)?;
            ca.write(dir, stem, &issued).map_err(|source| DemoTlsError::Write { dir: dir.to_owned(), source })
        };
        let source = write(SOURCE_STEM, &names)?;
        let target = write(TARGET_STEM, &names)?;
        let orchestrator = write("orchestrator", &[ORCHESTRATOR_NAME.to_owned()])?;
        let orchestrator_files = orchestrator.clone();
        let orchestrator = ClientTls::load(orchestrator).map_err(DemoTlsError::Load)?;
        Ok(Self { ca: std::sync::Arc::new(ca), names, source, target, orchestrator, orchestrator_files })
    }

    /// Replaces both agents' certificates and keys with new ones from the
    /// same CA ([`Authority::write`]): an agent reads them at its next
    /// reload.
    pub fn rotate(&self) -> Result<(), DemoTlsError> {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        for (stem, files) in [(SOURCE_STEM, &self.source), (TARGET_STEM, &self.target)] {
            let issued = self.ca.issue(&names, Validity::Current).map_err(DemoTlsError::Generate)?;
            let dir = files.cert.parent().unwrap_or(Path::new(".")).to_owned();
            self.ca.write(&dir, stem, &issued).map_err(|source| DemoTlsError::Write { dir, source })?;
        }
        Ok(())
    }

    /// The orchestrator's certificate, key and CA files.
    pub fn orchestrator_files(&self) -> &TlsFiles {
        &self.orchestrator_files
    }

    /// The source agent's TLS flags.
    pub fn source_args(&self) -> Vec<String> {
        agent_args(&self.source)
    }

    /// The target agent's TLS flags.
    pub fn target_args(&self) -> Vec<String> {
        agent_args(&self.target)
    }
}

fn agent_args(files: &TlsFiles) -> Vec<String> {
    vec![
        format!("--tls-cert={}", files.cert.display()),
        format!("--tls-key={}", files.key.display()),
        format!("--tls-ca={}", files.ca.display()),
        format!("--control-allow-name={ORCHESTRATOR_NAME}"),
    ]
}

/// The URL of an agent at `addr` (`HOST:PORT`): https with TLS.
pub fn url(tls: Option<&DemoTls>, addr: &str) -> String {
    match tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

/// A gRPC channel to the agent at `addr` on this machine's network, as the
/// orchestrator (with TLS) or in the clear.
pub async fn channel(tls: Option<&DemoTls>, addr: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = pageserver_tls::endpoint(&url(tls, addr))?;
    let connector =
        pageserver_tls::connector(tls.map(|tls| tls.orchestrator.clone()), pageserver_tls::client::dial_tcp());
    endpoint.connect_with_connector(connector).await
}
