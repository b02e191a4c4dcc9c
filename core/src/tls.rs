//! TLS on the fleet's gRPC hops (issue #12, item 2): the scheduler serves with a certificate
//! issued by the fleet's own small CA (`berthctl admin tls init` creates both), and the API and
//! the agents verify it against that CA (`--tls-ca`), by the host name or address in the
//! scheduler URL. Plaintext is for loopback only: a scheduler refuses to listen elsewhere
//! without a certificate, and a client refuses an `http://` address that is not loopback.

use std::net::IpAddr;
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a valid URL")]
    Address(String),
    #[error(
        "{0} is https:// but no CA certificate was given to verify the scheduler with (--tls-ca)"
    )]
    NoCa(String),
    #[error(
        "{0} is plaintext http:// to a host that is not loopback: tokens, credentials and run \
         secrets would cross the network in clear; use https:// with --tls-ca"
    )]
    PlaintextBeyondLoopback(String),
    #[error(
        "listening on {0} without TLS: plaintext is for loopback only; give --tls-cert and \
         --tls-key (berthctl admin tls init makes them)"
    )]
    ListenPlaintext(String),
    #[error("{0} needs {1} too")]
    Incomplete(&'static str, &'static str),
}

/// Whether `host` (a URL's host: a name, an IPv4 address or a bracketed IPv6 one) is loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Chooses rustls's cryptography (ring) for the whole process, once. The dependency graph
/// enables more than one provider, and rustls then refuses to guess (it panics on the first
/// handshake); every TLS configuration made here calls this first.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider is installed already (the process chose one itself): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// What a client verifies the scheduler with: only certificates the fleet's CA issued.
pub fn client_config(ca_pem: &[u8]) -> ClientTlsConfig {
    install_crypto();
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

/// The scheduler's TLS settings from its certificate chain and key (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    install_crypto();
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?)))
}

/// The server side's choice: TLS from `cert` and `key` (both or neither), or plaintext, which
/// only a loopback listen address may use.
pub fn server_choice(
    listen: &std::net::SocketAddr,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => server_config(cert, key).map(Some),
        (Some(_), None) => Err(TlsError::Incomplete("--tls-cert", "--tls-key")),
        (None, Some(_)) => Err(TlsError::Incomplete("--tls-key", "--tls-cert")),
        (None, None) if listen.ip().is_loopback() => Ok(None),
        (None, None) => Err(TlsError::ListenPlaintext(listen.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::SchedulerAddrs;

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1", "127.5.0.1", "[::1]", "localhost", "LOCALHOST"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["10.0.0.1", "[2001:db8::1]", "example.org", "localhost.evil"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn plaintext_is_for_loopback_and_https_needs_a_ca() {
        let ok = |list: &str| SchedulerAddrs::parse(list).map(|a| a.check_transport().is_ok());
        assert_eq!(ok("http://127.0.0.1:7070,http://localhost:7071"), Ok(true));
        assert_eq!(ok("http://10.0.0.1:7070"), Ok(false));
        assert_eq!(ok("https://10.0.0.1:7070"), Ok(false), "no CA");
        let with_ca = SchedulerAddrs::parse("https://10.0.0.1:7070,https://sched.internal:7070")
            .map(|a| {
                a.with_ca(b"-----BEGIN CERTIFICATE-----".to_vec())
                    .check_transport()
                    .is_ok()
            });
        assert_eq!(with_ca, Ok(true));
    }

    #[test]
    fn a_scheduler_listens_in_plaintext_only_on_loopback() {
        let lo: std::net::SocketAddr = "127.0.0.1:7070".parse().expect("addr");
        let any: std::net::SocketAddr = "0.0.0.0:7070".parse().expect("addr");
        assert!(matches!(server_choice(&lo, None, None), Ok(None)));
        assert!(matches!(
            server_choice(&any, None, None),
            Err(TlsError::ListenPlaintext(_))
        ));
        assert!(matches!(
            server_choice(&any, Some(Path::new("c.pem")), None),
            Err(TlsError::Incomplete(..))
        ));
    }
}
