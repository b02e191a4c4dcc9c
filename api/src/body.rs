//! A JSON body extractor whose errors name the offending field.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// Like `axum::Json`, but an empty body is `T::default()` when `EMPTY_OK`, and every failure is
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
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Malformed {
                field: "body".to_owned(),
                message: e.body_text(),
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return if EMPTY_OK {
                Ok(JsonBody(T::default()))
            } else {
                Err(ApiError::Malformed {
                    field: "body".to_owned(),
                    message: "a JSON object is required".to_owned(),
                })
            };
        }
        parse(&bytes).map(JsonBody)
    }
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde names an unknown field only in its message: "unknown field `x`, expected …".
        let field = if path == "." || path == "?" {
            message
                .split('`')
                .nth(1)
                .filter(|_| message.starts_with("unknown field"))
                .unwrap_or("body")
                .to_owned()
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
}
