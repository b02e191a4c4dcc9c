//! # Layout
//! Berth's public REST API (Nodion's shape) and its SSE log streams. A stateless process: every
//! request is parsed and validated here ([`body`], `berth_core::validate`), then answered by
//! the scheduler's control service over gRPC ([`handlers`]); [`views`] renders the public JSON
//! and [`error`] is the one mapping from errors to HTTP. [`auth`] authenticates every request
//! (admin token or a project's API key) and names the caller's project on every control call;
//! [`admin`] holds the admin-only routes (API keys).

pub mod admin;
pub mod auth;
pub mod body;
pub mod error;
pub mod handlers;
pub mod views;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use berth_proto::v1::control_service_client::ControlServiceClient;
use std::future::Future;
use std::sync::Arc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct AppState {
    channel: Channel,
    /// Without the caller: only for `AuthenticateApiKey`, which establishes it.
    control: ControlServiceClient<Channel>,
    admin_token: Arc<str>,
}

impl AppState {
    /// `admin_token` is the operator's token (`--token`): it manages nodes and API keys and acts
    /// in project `default`.
    pub fn new(channel: Channel, admin_token: &str) -> AppState {
        AppState {
            control: ControlServiceClient::new(channel.clone()),
            channel,
            admin_token: Arc::from(admin_token),
        }
    }

    /// The control client for the current request: every call carries the caller's project.
    fn control(
        &self,
    ) -> ControlServiceClient<InterceptedService<Channel, auth::CallerInterceptor>> {
        ControlServiceClient::with_interceptor(self.channel.clone(), auth::CallerInterceptor)
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
        .route("/v1/runners/{id}/runs", get(list_runs).post(create_run))
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
        .route(
            "/v1/admin/api_keys",
            get(admin::list_api_keys).post(admin::create_api_key),
        )
        .route("/v1/admin/api_keys/{key_id}", delete(admin::revoke_api_key))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
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
