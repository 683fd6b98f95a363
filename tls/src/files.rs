//! [`TlsFiles`]: where an agent's certificate, its key and the CA its peers
//! must chain to are, and reading them.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TlsError;

const CERT: &str = "certificate (--tls-cert)";
const KEY: &str = "key (--tls-key)";
const CA: &str = "CA (--tls-ca)";

/// The three PEM files of one side of a mutual TLS link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates the peer's chain must end at.
    pub ca: PathBuf,
}

/// What [`TlsFiles`] hold, read and parsed.
#[derive(Debug)]
pub struct LoadedTls {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

/// What the files were when last read: their change is what a reload
/// waits for. Size, modification time and inode of each: cert-manager and
/// kubelet replace a Secret's files through a symlink swap, which changes
/// the inode behind the path even when size and time happen to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesStamp(Vec<Option<(u64, i64, i64, u64)>>);

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

impl TlsFiles {
    /// Reads and parses all three files; any problem is an error naming the
    /// file (nothing half-loaded is ever used).
    pub fn load(&self) -> Result<LoadedTls, TlsError> {
        let pem = |what, path: &Path, source| TlsError::Pem { what, path: path.to_owned(), source };
        let chain = CertificateDer::pem_slice_iter(&read(CERT, &self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem(CERT, &self.cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::Empty { what: CERT, path: self.cert.clone(), expected: "CERTIFICATE" });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(KEY, &self.key)?).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                TlsError::Empty { what: KEY, path: self.key.clone(), expected: "PRIVATE KEY" }
            }
            other => pem(KEY, &self.key, other),
        })?;
        let anchors = CertificateDer::pem_slice_iter(&read(CA, &self.ca)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem(CA, &self.ca, e))?;
        if anchors.is_empty() {
            return Err(TlsError::Empty { what: CA, path: self.ca.clone(), expected: "CERTIFICATE" });
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor).map_err(|source| TlsError::Anchor { path: self.ca.clone(), source })?;
        }
        Ok(LoadedTls { chain, key, roots: Arc::new(roots) })
    }

    /// The files as they are now (a file that cannot be read counts as a
    /// state of its own, so that its return is a change too).
    pub fn stamp(&self) -> FilesStamp {
        FilesStamp(
            [&self.cert, &self.key, &self.ca]
                .into_iter()
                .map(|path| std::fs::metadata(path).ok().map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino())))
                .collect(),
        )
    }
}
