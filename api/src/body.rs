//! Extractors whose failures are the API's JSON errors naming the field: a JSON body, a query
//! string, path parameters (axum's own answer such failures in plain text).

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// Like `axum::extract::Query`; a bad or unknown parameter is a 400 naming it.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                ApiError::Malformed {
                    field: unknown_field(&message).unwrap_or(path),
                    message,
                }
            })
    }
}

/// Like `axum::extract::Path`; a parameter that cannot be decoded (not UTF-8) names no record
/// that exists, so it is a 404 like any other unknown id.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::NotFound {
                field: "path".to_owned(),
                message: e.body_text(),
            })
    }
}

/// serde names an unknown field only in its message: "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<String> {
    message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field"))
        .map(str::to_owned)
}

/// Like `axum::Json`, but an empty body (zero bytes, or `null`) is `T::default()` when `EMPTY_OK`, and every failure is
/// an [`ApiError::Malformed`] that names the field (its JSON path).
pub struct JsonBody<T, const EMPTY_OK: bool = false>(pub T);

/// Request bodies above this are refused…
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// …except a single run's (`POST /v1/runners/{id}/runs`), which may carry up to
/// `FILES_MAX_TOTAL_BYTES` (1 MiB) of uploaded files, base64-encoded (4/3 of that) in JSON.
pub const MAX_RUN_BODY_BYTES: usize = 2 * 1024 * 1024;

impl<S, T, const EMPTY_OK: bool> FromRequest<S> for JsonBody<T, EMPTY_OK>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let timeout = req.extensions().get::<BodyReadTimeout>().map(|t| t.0);
        let read = Bytes::from_request(req, state);
        let read = match timeout {
            Some(limit) => {
                tokio::time::timeout(limit, read)
                    .await
                    .map_err(|_| ApiError::BodyTimeout {
                        seconds: limit.as_secs(),
                    })?
            }
            None => read.await,
        };
        let bytes = read.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::Malformed {
                    field: "body".to_owned(),
                    message: e.body_text(),
                }
            }
        })?;
        // No body at all is "nothing to override" where that is allowed; a body of only
        // whitespace is not a JSON document, so it is malformed like any other.
        if EMPTY_OK && bytes.is_empty() {
            return Ok(JsonBody(T::default()));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::Malformed {
                field: "body".to_owned(),
                message: "a JSON object is required".to_owned(),
            });
        }
        require_object(&bytes, EMPTY_OK)?;
        if EMPTY_OK {
            // `null` is the same as no body.
            return parse::<Option<T>>(&bytes).map(|v| JsonBody(v.unwrap_or_default()));
        }
        parse(&bytes).map(JsonBody)
    }
}

/// Every request body is a JSON object (or `null` where no body is allowed): serde would also
/// read a struct from an array of its fields in order, so `[]` would be a body whose fields all
/// have defaults.
fn require_object(bytes: &[u8], null_ok: bool) -> Result<(), ApiError> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| bytes[i]) {
        Some(b'{') => Ok(()),
        Some(b'n') if null_ok => Ok(()),
        _ => Err(ApiError::Malformed {
            field: "body".to_owned(),
            message: "a JSON object is required".to_owned(),
        }),
    }
}

/// How long a request body may take to arrive, whole; put on each request by [`crate::serve`].
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub std::time::Duration);

/// One JSON value, and nothing after it but whitespace.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = parse_value(de)?;
    de.end().map_err(|e| ApiError::Malformed {
        field: "body".to_owned(),
        message: format!("trailing data after the JSON value: {e}"),
    })?;
    Ok(value)
}

fn parse_value<'de, T: DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'de>>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if path == "." || path == "?" {
            unknown_field(&message).unwrap_or_else(|| "body".to_owned())
        } else {
            path
        };
        ApiError::Malformed { field, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::validate::RunnerInput;

    fn field(body: &str) -> String {
        match parse::<RunnerInput>(body.as_bytes()) {
            Err(ApiError::Malformed { field, .. }) => field,
            other => panic!("expected a malformed error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(r#"{"name": 5}"#), "name");
        assert_eq!(
            field(r#"{"env_variables": [{"env_key": 1}]}"#),
            "env_variables[0].env_key"
        );
        assert_eq!(field(r#"{"nme": "x"}"#), "nme");
        assert_eq!(field("{"), "body");
    }

    #[test]
    fn a_body_must_be_an_object() {
        for bad in ["[]", " [0]", "5", "\"x\"", "true"] {
            assert!(require_object(bad.as_bytes(), true).is_err(), "{bad}");
        }
        assert!(require_object(b"null", false).is_err());
        assert!(require_object(b"null", true).is_ok());
        assert!(require_object(b" \n{}", false).is_ok());
    }

    #[test]
    fn trailing_data_after_the_json_value_is_refused() {
        let ok = r#"{"name": "abc"}"#;
        assert!(parse::<RunnerInput>(format!("{ok} \n").as_bytes()).is_ok());
        for bad in [format!("{ok}{ok}"), format!("{ok} x"), format!("{ok}]")] {
            assert_eq!(field(&bad), "body", "{bad}");
        }
    }

    fn unknown_field<T: serde::de::DeserializeOwned>(body: &str) -> Option<String> {
        match parse::<T>(body.as_bytes()) {
            Err(ApiError::Malformed { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn every_body_rejects_unknown_fields_naming_them() {
        use berth_core::validate::{RegistryInput, RunInput};
        assert_eq!(
            unknown_field::<RunnerInput>(r#"{"nam": "x"}"#).as_deref(),
            Some("nam")
        );
        assert_eq!(
            unknown_field::<RunInput>(r#"{"cmd": "x"}"#).as_deref(),
            Some("cmd")
        );
        assert_eq!(
            unknown_field::<RegistryInput>(r#"{"pasword": "x"}"#).as_deref(),
            Some("pasword")
        );
        assert_eq!(
            unknown_field::<RunInput>(r#"{"env_variables": [{"env_key": "A", "value": "x"}]}"#)
                .as_deref(),
            Some("env_variables[0].value")
        );
        // Known fields alone parse.
        assert!(parse::<RunInput>(br#"{"command": "x", "env_variables": []}"#).is_ok());
    }
}
