//! A small OCI distribution (registry v2) client: manifests and blobs, anonymous access, basic
//! auth, and the bearer-token challenge flow. Plain HTTP for loopback and configured insecure
//! registries, HTTPS otherwise.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use crate::image::manifest::{sha256_digest, sniff_media_type, ACCEPTED_MANIFEST_TYPES};
use crate::image::reference::{host_without_port, ImageReference};

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// the request could not be sent or its body not read
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// the registry answered with an unexpected status
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    /// the registry wants an authentication scheme we cannot satisfy
    #[error("{url}: unsupported authentication challenge {challenge:?}")]
    UnsupportedAuth { url: String, challenge: String },
    /// fetching a bearer token failed
    #[error("getting a token from {realm} failed: {message}")]
    Token { realm: String, message: String },
    /// the registry refused the credentials (or wants some and the run has none)
    #[error("401 Unauthorized from {host}: {detail}")]
    Unauthorized { host: String, detail: String },
    /// the content does not hash to the digest it was requested by
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
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
    /// Tells credentials apart in the token cache without keeping the password in the key.
    fn fingerprint(&self) -> String {
        crate::image::manifest::sha256_digest(
            format!("{}\0{}", self.username, self.password).as_bytes(),
        )
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="https://auth",service="reg",scope="repository:a:pull"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

/// The registry client. Cheap to share; tokens are cached per registry and repository.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    insecure: Vec<String>,
    credentials: HashMap<String, Credentials>,
    authorizations: Mutex<HashMap<String, String>>,
}

impl RegistryClient {
    pub fn new(
        insecure: Vec<String>,
        credentials: HashMap<String, Credentials>,
    ) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("berth-node-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|source| RegistryError::Http {
                url: String::new(),
                source,
            })?;
        Ok(Self {
            http,
            insecure,
            credentials,
            authorizations: Mutex::new(HashMap::new()),
        })
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

    fn base_url(&self, image: &ImageReference) -> String {
        format!(
            "{}://{}/v2/{}",
            self.scheme_for(&image.registry),
            image.registry,
            image.repository
        )
    }

    /// Fetches a manifest (or index) by tag or digest, verifying the digest when pinned.
    /// `credentials` (for this call) win over the ones the client was built with.
    pub async fn fetch_manifest(
        &self,
        image: &ImageReference,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base_url(image));
        let response = self
            .get(
                image,
                &url,
                Some(&ACCEPTED_MANIFEST_TYPES.join(", ")),
                credentials,
            )
            .await?;
        let header_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let bytes = response
            .bytes()
            .await
            .map_err(|source| RegistryError::Http {
                url: url.clone(),
                source,
            })?
            .to_vec();
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RegistryError::DigestMismatch {
                expected: reference.to_string(),
                actual: digest,
            });
        }
        let media_type = sniff_media_type(&bytes)
            .filter(|t| ACCEPTED_MANIFEST_TYPES.contains(&t.as_str()))
            .or(header_type)
            .unwrap_or_default();
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Starts downloading a blob; the caller streams the body.
    pub async fn fetch_blob(
        &self,
        image: &ImageReference,
        digest: &str,
        credentials: Option<&Credentials>,
    ) -> Result<Response, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base_url(image));
        self.get(image, &url, None, credentials).await
    }

    fn credentials_for<'a>(
        &'a self,
        registry: &str,
        per_call: Option<&'a Credentials>,
    ) -> Option<&'a Credentials> {
        per_call.or_else(|| self.credentials.get(registry))
    }

    /// Cached authorizations are per repository *and* credentials: a token one run obtained
    /// must never serve a run with other (or wrong) credentials.
    fn auth_key(image: &ImageReference, credentials: Option<&Credentials>) -> String {
        let who = credentials
            .map(Credentials::fingerprint)
            .unwrap_or_default();
        format!("{}/{}#{who}", image.registry, image.repository)
    }

    async fn get(
        &self,
        image: &ImageReference,
        url: &str,
        accept: Option<&str>,
        per_call: Option<&Credentials>,
    ) -> Result<Response, RegistryError> {
        let credentials = self.credentials_for(&image.registry, per_call);
        let key = Self::auth_key(image, credentials);
        let cached = self
            .authorizations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let response = self.send(url, accept, cached.as_deref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return check_status(url, response).await;
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let authorization = self.authorize(image, url, &challenge, credentials).await?;
        let response = self.send(url, accept, Some(&authorization)).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            self.authorizations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Err(RegistryError::Unauthorized {
                host: image.registry.clone(),
                detail: match credentials {
                    Some(c) => format!("the registry rejected the credentials of {:?}", c.username),
                    None => "the registry wants credentials and the run has none".to_string(),
                },
            });
        }
        self.authorizations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, authorization);
        check_status(url, response).await
    }

    async fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(ACCEPT, accept);
        }
        if let Some(auth) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(AUTHORIZATION, auth);
        }
        self.http
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(|source| RegistryError::Http {
                url: url.to_string(),
                source,
            })
    }

    fn basic(credentials: Option<&Credentials>) -> Option<String> {
        credentials.map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    /// Turns a 401 challenge into an `Authorization` header value.
    async fn authorize(
        &self,
        image: &ImageReference,
        url: &str,
        challenge_header: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let unsupported = || RegistryError::UnsupportedAuth {
            url: url.to_string(),
            challenge: challenge_header.to_string(),
        };
        let challenge = parse_challenge(challenge_header).ok_or_else(unsupported)?;
        match challenge.scheme.as_str() {
            "basic" => Self::basic(credentials).ok_or_else(|| RegistryError::Unauthorized {
                host: image.registry.clone(),
                detail: "the registry wants credentials and the run has none".to_string(),
            }),
            "bearer" => {
                let realm = challenge
                    .params
                    .get("realm")
                    .cloned()
                    .ok_or_else(unsupported)?;
                let scope = challenge
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", image.repository));
                let mut query: Vec<(&str, String)> = vec![("scope", scope)];
                if let Some(service) = challenge.params.get("service") {
                    query.push(("service", service.clone()));
                }
                let mut request = self.http.get(&realm).query(&query);
                if let Some(basic) = Self::basic(credentials) {
                    request = request.header(AUTHORIZATION, basic);
                }
                let token_error = |message: String| RegistryError::Token {
                    realm: realm.clone(),
                    message,
                };
                let response = request
                    .send()
                    .await
                    .map_err(|e| token_error(e.to_string()))?;
                if response.status() == StatusCode::UNAUTHORIZED {
                    return Err(RegistryError::Unauthorized {
                        host: image.registry.clone(),
                        detail: format!("the token service {realm} rejected the credentials"),
                    });
                }
                if !response.status().is_success() {
                    return Err(token_error(format!("status {}", response.status())));
                }
                let body: TokenResponse = response
                    .json()
                    .await
                    .map_err(|e| token_error(e.to_string()))?;
                let token = body
                    .token
                    .or(body.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| token_error("no token in response".to_string()))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(unsupported()),
        }
    }
}

async fn check_status(url: &str, response: Response) -> Result<Response, RegistryError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(512);
    Err(RegistryError::Status {
        url: url.to_string(),
        status,
        body: body.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .expect("parses");
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
    }

    #[test]
    fn parses_basic_and_unquoted() {
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).expect("parses");
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c = parse_challenge("Bearer realm=https://x/token, service=x").expect("parses");
        assert_eq!(c.params["realm"], "https://x/token");
        assert_eq!(c.params["service"], "x");
    }

    #[test]
    fn loopback_and_insecure_use_http() {
        let client =
            RegistryClient::new(vec!["reg.lan:5000".into()], HashMap::new()).expect("client");
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
        let image = ImageReference::parse(&format!("{addr}/private/app:latest")).expect("ref");
        let client = RegistryClient::new(vec![], HashMap::new()).expect("client");

        let fetched = client
            .fetch_manifest(&image, "latest", Some(&creds("pass")))
            .await
            .expect("right password");
        assert_eq!(fetched.bytes, br#"{"schemaVersion":2}"#);

        // The authorization cached for the right password must not serve the wrong one.
        let error = client
            .fetch_manifest(&image, "latest", Some(&creds("wrong")))
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
            .fetch_manifest(&image, "latest", None)
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
