//! # Layout
//! Berth's public REST API (Nodion's shape) and its SSE log streams. A stateless process: every
//! request is parsed and validated here ([`body`], `berth_core::validate`), then answered by
//! the scheduler's control service over gRPC ([`handlers`]); [`views`] renders the public JSON
//! and [`error`] is the one mapping from errors to HTTP.

pub mod body;
pub mod error;
pub mod handlers;
pub mod views;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use berth_proto::v1::control_service_client::ControlServiceClient;
use error::ApiError;
use std::future::Future;
use std::sync::Arc;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct AppState {
    control: ControlServiceClient<Channel>,
    token: Arc<str>,
}

impl AppState {
    pub fn new(control: ControlServiceClient<Channel>, token: &str) -> AppState {
        AppState {
            control,
            token: Arc::from(token),
        }
    }

    fn control(&self) -> ControlServiceClient<Channel> {
        self.control.clone()
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn require_token(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if token_matches(t.as_bytes(), s.token.as_bytes()) => Ok(next.run(req).await),
        _ => Err(ApiError::Unauthorized),
    }
}

pub fn router(state: AppState) -> Router {
    use handlers::*;
    let v1 = Router::new()
        .route("/v1/runners", get(list_runners).post(create_runner))
        .route(
            "/v1/runners/{id}",
            get(get_runner).patch(update_runner).delete(delete_runner),
        )
        .route(
            "/v1/runners/{id}/runs",
            get(list_runs)
                .post(create_run)
                .layer(axum::extract::DefaultBodyLimit::max(
                    body::MAX_RUN_BODY_BYTES,
                )),
        )
        .route("/v1/runners/{id}/runs/batch", post(create_runs))
        .route("/v1/runners/{id}/runs/{run_id}", get(get_run))
        .route("/v1/runners/{id}/runs/{run_id}/stop", post(stop_run))
        .route("/v1/runners/{id}/runs/{run_id}/logs", get(list_logs))
        .route(
            "/v1/runners/{id}/runs/{run_id}/logs/stream",
            get(stream_logs),
        )
        .route("/v1/runners/{id}/warmup", post(warmup_runner))
        .route(
            "/v1/container_registries",
            get(list_registries).post(create_registry),
        )
        .route(
            "/v1/container_registries/{id}",
            get(get_registry).delete(delete_registry),
        )
        .route("/v1/usage", get(usage))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}/drain", post(drain_node))
        .route("/v1/nodes/{id}/resume", post(resume_node))
        .route("/v1/instance_types", get(list_instance_types))
        .route("/v1/regions", get(list_regions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(body::MAX_BODY_BYTES));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(v1)
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// One structured log line per request.
async fn trace_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    tracing::info!(
        %method,
        %path,
        status = res.status().as_u16(),
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "request"
    );
    res
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }
}
