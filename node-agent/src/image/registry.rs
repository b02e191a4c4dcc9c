//! The registry side of a pull, over `oci-client`: manifests fetched raw (their exact bytes are
//! what containerd stores, and what their digest names), blobs streamed, anonymous access,
//! HTTP basic auth and the bearer-token flow. Plain HTTP for loopback and configured insecure
//! registries, HTTPS otherwise.
//!
//! oci-client keeps one stored login per registry and caches tokens by repository, not by who
//! asked, so this module keeps one `oci_client::Client` per registry *and* credentials: a token
//! that one run's credentials obtained never serves a run with other (or wrong) credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::image::manifest::{sha256_digest, sniff_media_type, ACCEPTED_MANIFEST_TYPES};

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// the registry refused the credentials (or wants some and the run has none)
    #[error("401 Unauthorized from {host}: {detail}")]
    Unauthorized { host: String, detail: String },
    /// the registry could not be reached, answered with an error, or sent content that does not
    /// match its digest
    #[error("registry {host}: {source}")]
    Request {
        host: String,
        #[source]
        source: OciDistributionError,
    },
    /// the HTTP client for the registry could not be built
    #[error("registry {host}: cannot build an HTTP client: {source}")]
    Client {
        host: String,
        #[source]
        source: OciDistributionError,
    },
}

/// A manifest exactly as the registry sent it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: String,
}

/// Username and password for one registry host. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Tells credentials apart in the client cache without keeping the password in the key.
    fn fingerprint(&self) -> String {
        sha256_digest(format!("{}\0{}", self.username, self.password).as_bytes())
    }
}

/// Strips `:port` from `host:port`, keeping bracketed IPv6 hosts intact.
fn host_without_port(registry: &str) -> &str {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        };
    }
    registry.split(':').next().unwrap_or(registry)
}

/// The registry client. Cheap to share.
#[derive(Default)]
pub struct RegistryClient {
    insecure: Vec<String>,
    /// One oci-client per `<registry>#<credentials fingerprint>`.
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client that speaks plain HTTP to loopback registries and to `insecure` (`host:port`).
    pub fn new(insecure: Vec<String>) -> Self {
        Self {
            insecure,
            clients: Mutex::default(),
        }
    }

    /// `http` for loopback and configured insecure registries, else `https`.
    pub fn scheme_for(&self, registry: &str) -> &'static str {
        let host = host_without_port(registry);
        if matches!(host, "127.0.0.1" | "localhost" | "[::1]")
            || self.insecure.iter().any(|r| r == registry)
        {
            "http"
        } else {
            "https"
        }
    }

    /// The oci-client for `image`'s registry and these credentials, with their login stored.
    async fn client_for(
        &self,
        image: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<Client, RegistryError> {
        let registry = image.resolve_registry();
        let key = format!(
            "{registry}#{}",
            credentials
                .map(Credentials::fingerprint)
                .unwrap_or_default()
        );
        let existing = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let client = match existing {
            Some(client) => client,
            None => {
                let protocol = match self.scheme_for(registry) {
                    "http" => ClientProtocol::Http,
                    _ => ClientProtocol::Https,
                };
                let client = Client::try_from(ClientConfig {
                    protocol,
                    connect_timeout: Some(Duration::from_secs(10)),
                    user_agent: concat!("berth-node-agent/", env!("CARGO_PKG_VERSION")),
                    ..ClientConfig::default()
                })
                .map_err(|source| RegistryError::Client {
                    host: image.registry().to_string(),
                    source,
                })?;
                self.clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_insert(client)
                    .clone()
            }
        };
        client
            .store_auth_if_needed(registry, &registry_auth(credentials))
            .await;
        Ok(client)
    }

    /// Fetches the manifest (or index) `image` names, by its digest when pinned, else by its
    /// tag; a pinned manifest must hash to its digest.
    pub async fn fetch_manifest(
        &self,
        image: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<FetchedManifest, RegistryError> {
        let client = self.client_for(image, credentials).await?;
        let (bytes, _) = client
            .pull_manifest_raw(image, &registry_auth(credentials), ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|e| refusal(image, credentials, e))?;
        let bytes = bytes.to_vec();
        let media_type = sniff_media_type(&bytes).unwrap_or_default();
        Ok(FetchedManifest {
            digest: sha256_digest(&bytes),
            bytes,
            media_type,
        })
    }

    /// Starts downloading a blob of `image`'s repository; the stream checks the bytes against
    /// `digest` and ends with an error if they do not match.
    pub async fn fetch_blob(
        &self,
        image: &Reference,
        digest: &str,
        credentials: Option<&Credentials>,
    ) -> Result<
        impl Stream<Item = Result<impl AsRef<[u8]> + Send, std::io::Error>> + Send + 'static,
        RegistryError,
    > {
        let client = self.client_for(image, credentials).await?;
        let blob = client
            .pull_blob_stream(image, digest)
            .await
            .map_err(|e| refusal(image, credentials, e))?;
        Ok(blob.stream)
    }
}

fn registry_auth(credentials: Option<&Credentials>) -> RegistryAuth {
    match credentials {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    }
}

/// Names a refusal (401, or a token service that rejected the credentials) as such: the pull
/// must not fall back to a local copy then, and the run's error must say why.
fn refusal(
    image: &Reference,
    credentials: Option<&Credentials>,
    error: OciDistributionError,
) -> RegistryError {
    let host = image.registry().to_string();
    match error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized {
            host,
            detail: match credentials {
                Some(c) => format!("the registry rejected the credentials of {:?}", c.username),
                None => "the registry wants credentials and the run has none".to_string(),
            },
        },
        source => RegistryError::Request { host, source },
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    #[test]
    fn loopback_and_insecure_use_http() {
        let client = RegistryClient::new(vec!["reg.lan:5000".into()]);
        assert_eq!(client.scheme_for("127.0.0.1:5055"), "http");
        assert_eq!(client.scheme_for("localhost"), "http");
        assert_eq!(client.scheme_for("[::1]:5000"), "http");
        assert_eq!(client.scheme_for("reg.lan:5000"), "http");
        assert_eq!(client.scheme_for("reg.lan:5001"), "https");
        assert_eq!(client.scheme_for("ghcr.io"), "https");
    }

    /// A registry on 127.0.0.1 that wants `user:pass` by basic auth for everything.
    async fn private_registry() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let expected = format!(
            "authorization: basic {}",
            base64::engine::general_purpose::STANDARD
                .encode("user:pass")
                .to_ascii_lowercase()
        );
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let expected = expected.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    let body = r#"{"schemaVersion":2}"#;
                    let response = if text.lines().any(|l| l.trim() == expected) {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                    };
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn creds(password: &str) -> Credentials {
        Credentials {
            username: "user".to_string(),
            password: password.to_string(),
        }
    }

    #[tokio::test]
    async fn per_call_credentials_authenticate_and_a_wrong_password_is_a_clear_401() {
        let addr = private_registry().await;
        let image: Reference = format!("{addr}/private/app:latest").parse().expect("ref");
        let client = RegistryClient::new(vec![]);

        let fetched = client
            .fetch_manifest(&image, Some(&creds("pass")))
            .await
            .expect("right password");
        assert_eq!(fetched.bytes, br#"{"schemaVersion":2}"#);

        // The authorization cached for the right password must not serve the wrong one.
        let error = client
            .fetch_manifest(&image, Some(&creds("wrong")))
            .await
            .expect_err("wrong password");
        let message = error.to_string();
        assert!(
            matches!(error, RegistryError::Unauthorized { .. }),
            "{message}"
        );
        assert!(
            message.starts_with(&format!("401 Unauthorized from {addr}")),
            "{message}"
        );
        assert!(!message.contains("wrong"), "never the password: {message}");

        let error = client
            .fetch_manifest(&image, None)
            .await
            .expect_err("no credentials");
        assert!(
            error
                .to_string()
                .contains("wants credentials and the run has none"),
            "{error}"
        );
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let shown = format!("{:?}", creds("hunter2"));
        assert!(
            shown.contains("user") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
