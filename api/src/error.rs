//! The API's errors and their one mapping to HTTP: every error body has the same shape,
//! `{"code": "...", "errors": [{"field": ..., "message": ...}]}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_core::validate::{FieldError, ValidationErrors};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ApiErrorCode,
    /// At least one; each names the field it is about.
    pub errors: Vec<FieldError>,
}

/// What kind of refusal an error body is; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// 400: not JSON, wrong types, unknown fields or query parameters.
    MalformedRequest,
    /// 401: no bearer token, or neither the admin token nor a valid, unrevoked API key.
    Unauthorized,
    /// 403: a project key on a route for the admin.
    Forbidden,
    /// 404: no such record (in the caller's project).
    NotFound,
    /// 405: the path exists, the method does not.
    MethodNotAllowed,
    /// 408: the request body did not arrive within the body read timeout.
    RequestTimeout,
    /// 409: conflicts with the current state.
    Conflict,
    /// 413: the request body is larger than the route allows.
    PayloadTooLarge,
    /// 422: validation failed; each error names its field.
    ValidationFailed,
    /// 429: too many concurrent log streams for this API key.
    TooManyRequests,
    /// 500.
    Internal,
    /// 503: the scheduler is unavailable.
    Unavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON we expect (syntax, types, unknown fields).
    #[error("malformed request: {message}")]
    Malformed { field: String, message: String },
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("{message}")]
    NotFound { field: String, message: String },
    /// No `Authorization: Bearer` header, or a token that is neither the admin token nor a
    /// valid, unrevoked API key (which of these is not said).
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Authenticated, but not allowed (a project key on an admin route).
    #[error("{0}")]
    Forbidden(String),
    /// The path exists, the method does not.
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    /// The request conflicts with the current state (a concurrent update, a record in use).
    #[error("{message}")]
    Conflict { field: String, message: String },
    /// The body did not arrive within the body read timeout (a slow or stalled client).
    #[error("the request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: u64 },
    /// The body is larger than the route's limit.
    #[error("the request body is larger than this route allows (1 MiB; 2 MiB for one run)")]
    PayloadTooLarge,
    /// The caller holds too many of a bounded resource at once (log streams).
    #[error("{message}")]
    TooManyRequests { field: String, message: String },
    /// The scheduler is down or restarting.
    #[error("the scheduler is unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, ApiErrorCode, Vec<FieldError>) {
        let fe = |field: &str, message: String| {
            vec![FieldError {
                field: field.to_owned(),
                message,
            }]
        };
        match self {
            ApiError::Malformed { field, message } => (
                StatusCode::BAD_REQUEST,
                ApiErrorCode::MalformedRequest,
                fe(field, message.clone()),
            ),
            ApiError::Invalid(v) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ApiErrorCode::ValidationFailed,
                v.0.clone(),
            ),
            ApiError::NotFound { field, message } => (
                StatusCode::NOT_FOUND,
                ApiErrorCode::NotFound,
                fe(field, message.clone()),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                ApiErrorCode::Unauthorized,
                fe("authorization", self.to_string()),
            ),
            ApiError::Forbidden(message) => (
                StatusCode::FORBIDDEN,
                ApiErrorCode::Forbidden,
                fe("authorization", message.clone()),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                ApiErrorCode::MethodNotAllowed,
                fe("method", self.to_string()),
            ),
            ApiError::Conflict { field, message } => (
                StatusCode::CONFLICT,
                ApiErrorCode::Conflict,
                fe(field, message.clone()),
            ),
            ApiError::BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                ApiErrorCode::RequestTimeout,
                fe("body", self.to_string()),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ApiErrorCode::PayloadTooLarge,
                fe("body", self.to_string()),
            ),
            ApiError::TooManyRequests { field, message } => (
                StatusCode::TOO_MANY_REQUESTS,
                ApiErrorCode::TooManyRequests,
                fe(field, message.clone()),
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ApiErrorCode::Unavailable,
                fe("", self.to_string()),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ApiErrorCode::Internal,
                fe("", self.to_string()),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, errors) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut res = (status, axum::Json(ErrorBody { code, errors })).into_response();
        if matches!(
            self,
            ApiError::BodyTimeout { .. } | ApiError::PayloadTooLarge
        ) {
            // The rest of the body is not read: the connection cannot carry another request.
            res.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

/// The scheduler answered with an enum value this API does not know (a newer scheduler).
impl From<berth_core::convert::UnknownEnumValue> for ApiError {
    fn from(e: berth_core::convert::UnknownEnumValue) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let message = s.message().to_owned();
        match s.code() {
            Code::NotFound => {
                let field = if message.starts_with("runner ") {
                    "runner_id"
                } else if message.starts_with("node ") {
                    "node_id"
                } else if message.starts_with("container registry ") {
                    "container_registry_id"
                } else if message.starts_with("api key ") {
                    "key_id"
                } else {
                    "run_id"
                };
                ApiError::NotFound {
                    field: field.to_owned(),
                    message,
                }
            }
            Code::InvalidArgument => match serde_json::from_str::<Vec<FieldErrorIn>>(&message) {
                Ok(list) => ApiError::Invalid(ValidationErrors(
                    list.into_iter()
                        .map(|f| FieldError {
                            field: f.field,
                            message: f.message,
                        })
                        .collect(),
                )),
                Err(_) => ApiError::Invalid(ValidationErrors::single("", message)),
            },
            Code::Aborted => ApiError::Conflict {
                field: "revision".to_owned(),
                message,
            },
            Code::FailedPrecondition | Code::AlreadyExists => ApiError::Conflict {
                field: "id".to_owned(),
                message,
            },
            Code::Unauthenticated => ApiError::Unauthorized,
            Code::PermissionDenied => ApiError::Forbidden(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                ApiError::Unavailable(message)
            }
            // The connection to the scheduler broke mid-call (it was killed or restarted):
            // tonic reports that as `Unknown`; the scheduler itself never answers `Unknown`.
            Code::Unknown if is_transport_failure(&s) => ApiError::Unavailable(message),
            _ => ApiError::Internal(format!("{:?}: {message}", s.code())),
        }
    }
}

/// Whether `s` is tonic's report of a broken connection rather than the scheduler's answer:
/// its source is a transport or HTTP/2 error, or (without a source) its message says so.
pub(crate) fn is_transport_failure(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() {
            return true;
        }
        source = e.source();
    }
    let message = s.message();
    message.starts_with("transport error")
        || message.starts_with("h2 protocol error")
        || message.starts_with("error trying to connect")
        || message.contains("connection reset")
        || message.contains("broken pipe")
}

#[derive(serde::Deserialize)]
struct FieldErrorIn {
    field: String,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: ApiError) -> StatusCode {
        e.parts().0
    }

    #[test]
    fn a_broken_connection_to_the_scheduler_is_503_not_500() {
        for message in [
            "transport error",
            "h2 protocol error: error reading a body from connection",
            "error trying to connect: tcp connect error",
        ] {
            let e = ApiError::from(tonic::Status::unknown(message));
            assert_eq!(status_of(e), StatusCode::SERVICE_UNAVAILABLE, "{message}");
        }
        let e = ApiError::from(tonic::Status::unknown("a bug in the scheduler"));
        assert_eq!(status_of(e), StatusCode::INTERNAL_SERVER_ERROR);
        let e = ApiError::from(tonic::Status::unavailable("connection refused"));
        assert_eq!(status_of(e), StatusCode::SERVICE_UNAVAILABLE);
    }
}
