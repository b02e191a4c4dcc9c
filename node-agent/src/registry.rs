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

use crate::manifest::{sha256_digest, sniff_media_type, ACCEPTED_MANIFEST_TYPES};
use crate::reference::{host_without_port, ImageReference};

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

/// Username and password for one registry host.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
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
    pub async fn fetch_manifest(
        &self,
        image: &ImageReference,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base_url(image));
        let response = self
            .get(image, &url, Some(&ACCEPTED_MANIFEST_TYPES.join(", ")))
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
    ) -> Result<Response, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base_url(image));
        self.get(image, &url, None).await
    }

    fn auth_key(image: &ImageReference) -> String {
        format!("{}/{}", image.registry, image.repository)
    }

    async fn get(
        &self,
        image: &ImageReference,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let cached = self
            .authorizations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Self::auth_key(image))
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
        let authorization = self.authorize(image, url, &challenge).await?;
        self.authorizations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Self::auth_key(image), authorization.clone());
        let response = self.send(url, accept, Some(&authorization)).await?;
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

    fn basic(&self, registry: &str) -> Option<String> {
        self.credentials.get(registry).map(|c| {
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
    ) -> Result<String, RegistryError> {
        let unsupported = || RegistryError::UnsupportedAuth {
            url: url.to_string(),
            challenge: challenge_header.to_string(),
        };
        let challenge = parse_challenge(challenge_header).ok_or_else(unsupported)?;
        match challenge.scheme.as_str() {
            "basic" => self.basic(&image.registry).ok_or_else(unsupported),
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
                if let Some(basic) = self.basic(&image.registry) {
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
}
