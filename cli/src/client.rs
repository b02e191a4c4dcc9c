//! HTTP to the Berth API: bearer auth, JSON in and out, and the one decoding of its error body
//! `{"code", "errors": [{"field", "message"}]}`.

use crate::config::Config;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// How long an ordinary request may take (a stop waits, bounded, for the run to exit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// A stream with no byte for this long is dead: the API sends a keep-alive every 15 s.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One entry of the API's `errors` list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FieldError {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status.
    #[error("{method} {path} failed ({status}{}):{}", code_suffix(.code), list(.errors))]
    Api {
        method: String,
        path: String,
        status: u16,
        code: String,
        errors: Vec<FieldError>,
    },
    /// The API could not be reached, or the connection broke.
    #[error("cannot reach the Berth API at {url}: {reason}")]
    Network { url: String, reason: String },
    /// The API answered something that is not the JSON we expect.
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

fn code_suffix(code: &str) -> String {
    if code.is_empty() {
        String::new()
    } else {
        format!(" {code}")
    }
}

fn list(errors: &[FieldError]) -> String {
    if errors.is_empty() {
        return " no details".to_owned();
    }
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

/// A reqwest error by its causes, which carry the useful part ("Connection refused"); its own
/// message only repeats the URL.
fn describe(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    let mut out = parts.join(": ");
    if e.is_timeout() && !out.contains("timed out") {
        out.push_str(" (timed out)");
    }
    out
}

/// An error body's parts; anything else becomes a single message.
pub fn decode_error(body: &str) -> (String, Vec<FieldError>) {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        code: String,
        #[serde(default)]
        errors: Vec<FieldError>,
    }
    match serde_json::from_str::<Body>(body) {
        Ok(b) => (b.code, b.errors),
        Err(_) => {
            let text = body.trim();
            let errors = if text.is_empty() {
                vec![]
            } else {
                vec![FieldError {
                    field: String::new(),
                    message: text.chars().take(500).collect(),
                }]
            };
            (String::new(), errors)
        }
    }
}

/// A response that succeeded: its raw body (for `--json`) and the body parsed.
#[derive(Debug, Clone)]
pub struct Answer {
    pub raw: String,
    pub json: Value,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(config: &Config) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("berthctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Network {
                url: config.url.clone(),
                reason: describe(&e),
            })?;
        Ok(Client {
            http,
            base: config.url.clone(),
            token: config.token.clone(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Answer, ClientError> {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Answer, ClientError> {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Answer, ClientError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        let network = |e: reqwest::Error| ClientError::Network {
            url: url.clone(),
            reason: describe(&e),
        };
        let res = req.send().await.map_err(network)?;
        let status = res.status();
        let raw = res.text().await.map_err(network)?;
        if !status.is_success() {
            let (code, errors) = decode_error(&raw);
            return Err(ClientError::Api {
                method: method.to_string(),
                path: path.to_owned(),
                status: status.as_u16(),
                code,
                errors,
            });
        }
        let json = if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).map_err(|e| ClientError::Decode {
                url: url.clone(),
                reason: e.to_string(),
            })?
        };
        Ok(Answer { raw, json })
    }

    /// Opens an SSE stream, resuming after `last_event_id`; answers the response whose body is
    /// the event stream.
    pub async fn open_stream(
        &self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let mut req = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.map_err(|e| ClientError::Network {
            url: url.clone(),
            reason: describe(&e),
        })?;
        let status = res.status();
        if !status.is_success() {
            let raw = res.text().await.unwrap_or_default();
            let (code, errors) = decode_error(&raw);
            return Err(ClientError::Api {
                method: "GET".to_owned(),
                path: path.to_owned(),
                status: status.as_u16(),
                code,
                errors,
            });
        }
        Ok(res)
    }

    pub fn stream_error(&self, path: &str, e: &reqwest::Error) -> ClientError {
        ClientError::Network {
            url: self.url(path),
            reason: describe(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_name_their_fields() {
        let (code, errors) = decode_error(
            r#"{"code":"validation_failed","errors":[{"field":"timeout_seconds","message":"must be between 1 and 86400"}]}"#,
        );
        let e = ClientError::Api {
            method: "POST".into(),
            path: "/v1/runners".into(),
            status: 422,
            code,
            errors,
        };
        assert_eq!(
            e.to_string(),
            "POST /v1/runners failed (422 validation_failed):\n  timeout_seconds: must be between 1 and 86400"
        );
    }

    #[test]
    fn a_body_that_is_not_the_error_shape_is_shown_as_is() {
        let (code, errors) = decode_error("Bad Gateway\n");
        assert_eq!(code, "");
        assert_eq!(errors[0].to_string(), "Bad Gateway");
        let (_, errors) =
            decode_error(r#"{"code":"unavailable","errors":[{"field":"","message":"down"}]}"#);
        assert_eq!(errors[0].to_string(), "down");
        assert!(decode_error("").1.is_empty());
    }
}
