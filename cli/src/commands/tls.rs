//! `berthctl admin tls init`: the fleet's small CA and the schedulers' certificate, so every
//! gRPC hop can be TLS without an outside PKI. Writes into `--dir`:
//! - `ca.pem` (give it to the API and every agent: `--tls-ca`), `ca.key` (0600; only needed to
//!   issue again, keep it offline),
//! - `scheduler.pem` and `scheduler.key` (0600) for `berth-scheduler --tls-cert/--tls-key`,
//!   valid for every `--host` given (names and IP addresses: what the clients put in their
//!   scheduler URLs).
//!
//! An existing CA is never overwritten (clients trust it); `--force` makes a new one.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TlsInitError {
    #[error(
        "{0} exists; pass --force to make a new CA (every client must then trust the new ca.pem)"
    )]
    Exists(PathBuf),
    #[error("--host is required (a name or IP address clients use to reach the scheduler)")]
    NoHost,
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long the CA and the scheduler certificate are valid.
const CA_DAYS: i64 = 10 * 365;
const SERVER_DAYS: i64 = 825;

pub struct Issued {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA and a scheduler certificate it signed, valid for `hosts`.
pub fn issue(hosts: &[String]) -> Result<Issued, TlsInitError> {
    if hosts.is_empty() {
        return Err(TlsInitError::NoHost);
    }
    let now = time::OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Berth fleet CA");
    ca.distinguished_name = dn;
    ca.not_before = now - time::Duration::minutes(5);
    ca.not_after = now + time::Duration::days(CA_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut server = CertificateParams::new(hosts.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "berth-scheduler");
    server.distinguished_name = dn;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - time::Duration::minutes(5);
    server.not_after = now + time::Duration::days(SERVER_DAYS);
    let server_key = KeyPair::generate()?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let server_cert = server.signed_by(&server_key, &issuer)?;
    Ok(Issued {
        ca_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: server_cert.pem(),
        key_pem: server_key.serialize_pem(),
    })
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsInitError> {
    let err = |source| TlsInitError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Issues into `dir`; answers the paths written.
pub fn init(dir: &Path, hosts: &[String], force: bool) -> Result<Vec<PathBuf>, TlsInitError> {
    let ca = dir.join("ca.pem");
    if ca.exists() && !force {
        return Err(TlsInitError::Exists(ca));
    }
    let issued = issue(hosts)?;
    std::fs::create_dir_all(dir).map_err(|source| TlsInitError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = [
        ("ca.key", issued.ca_key_pem.as_str(), 0o600),
        ("scheduler.key", issued.key_pem.as_str(), 0o600),
        ("scheduler.pem", issued.cert_pem.as_str(), 0o644),
        ("ca.pem", issued.ca_pem.as_str(), 0o644),
    ];
    let mut written = Vec::new();
    for (name, text, mode) in files {
        let path = dir.join(name);
        write(&path, text, mode)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_writes_a_ca_and_a_server_certificate_and_keeps_keys_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let written = init(dir.path(), &hosts, false).expect("init");
        assert_eq!(written.len(), 4);
        for (name, mode) in [
            ("ca.key", 0o600),
            ("scheduler.key", 0o600),
            ("ca.pem", 0o644),
        ] {
            let m = std::fs::metadata(dir.path().join(name))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(m & 0o777, mode, "{name}");
        }
        let cert = std::fs::read_to_string(dir.path().join("scheduler.pem")).expect("read");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(matches!(
            init(dir.path(), &hosts, false),
            Err(TlsInitError::Exists(_))
        ));
        assert!(init(dir.path(), &hosts, true).is_ok(), "--force");
        assert!(matches!(issue(&[]), Err(TlsInitError::NoHost)));
    }
}
