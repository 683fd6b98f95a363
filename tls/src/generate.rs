//! Throwaway certificates (feature `generate`): a CA made on the spot and
//! the certificates it issues, for the demo's default mTLS and the tests.
//! Nothing here is for production, where certificates come from the
//! operator's PKI (cert-manager in Kubernetes).
#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

use crate::files::TlsFiles;

/// Whether an issued certificate is valid now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From 1975 to 4096 (rcgen's default): valid whenever a test runs.
    Current,
    /// Valid only during 2000: expired for good.
    Expired,
}

/// A certificate authority made on the spot.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

impl Authority {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = named(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// The CA's certificate, for `--tls-ca`.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate valid for `names` (DNS names or IP addresses) as a
    /// server and as a client.
    pub fn issue(&self, names: &[&str], validity: Validity) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name = named(names.first().copied().unwrap_or("pageserver"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if validity == Validity::Expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `issued` as `DIR/STEM.crt` and `DIR/STEM.key` (mode 0600) and
    /// this CA as `DIR/ca.crt`: the files one side is given. Each file is
    /// replaced by a rename, as cert-manager's rotation does, the key
    /// first: an agent reloading between the two renames pairs the new key
    /// with the old certificate, fails, keeps the old pair, and takes the
    /// new one at its next reload.
    pub fn write(&self, dir: &Path, stem: &str, issued: &Issued) -> io::Result<TlsFiles> {
        let files = TlsFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join("ca.crt"),
        };
        replace(&files.ca, &self.pem, 0o644)?;
        replace(&files.key, &issued.key_pem, 0o600)?;
        replace(&files.cert, &issued.cert_pem, 0o644)?;
        Ok(files)
    }
}

/// Replaces `path` with `text` (a new file of `mode`, renamed over it).
fn replace(path: &Path, text: &str, mode: u32) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&partial)?;
        file.write_all(text.as_bytes())?;
    }
    std::fs::rename(partial, path)
}
