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
pub mod openapi;
pub mod views;

use axum::extract::Request;
use axum::handler::Handler;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter};
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
    control: ControlServiceClient<InterceptedService<Channel, auth::ClusterToken>>,
    cluster: auth::ClusterToken,
    admin_token: Arc<str>,
}

impl AppState {
    /// `admin_token` is the operator's token (`--token`): it manages nodes and API keys and acts
    /// in project `default`. `cluster` goes on every call to the scheduler.
    pub fn new(channel: Channel, admin_token: &str, cluster: auth::ClusterToken) -> AppState {
        AppState {
            control: ControlServiceClient::with_interceptor(channel.clone(), cluster.clone()),
            channel,
            cluster,
            admin_token: Arc::from(admin_token),
        }
    }

    /// The control client for the current request: every call carries the caller's project.
    fn control(
        &self,
    ) -> ControlServiceClient<InterceptedService<Channel, auth::CallerInterceptor>> {
        ControlServiceClient::with_interceptor(
            self.channel.clone(),
            auth::CallerInterceptor {
                cluster: self.cluster.clone(),
            },
        )
    }
}

/// An HTTP method a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    Post,
    Patch,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    /// Lower case, as OpenAPI names operations.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

/// One entry of [`routes`].
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    /// Whether the bearer token is required.
    pub authenticated: bool,
    handler: MethodRouter<AppState>,
}

fn route<H, T>(verb: Verb, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Route {
        verb,
        path,
        authenticated: true,
        handler: axum::routing::on(verb.filter(), handler),
    }
}

fn public(r: Route) -> Route {
    Route {
        authenticated: false,
        ..r
    }
}

/// `r` with its own request body limit instead of [`body::MAX_BODY_BYTES`].
fn body_limit(r: Route, bytes: usize) -> Route {
    Route {
        handler: r.handler.layer(axum::extract::DefaultBodyLimit::max(bytes)),
        ..r
    }
}

/// Every route of the API. [`router`] is built from this table alone, and a test checks it
/// against the OpenAPI document ([`openapi`]) both ways: a route without its `#[utoipa::path]`
/// (or a documented path that is not served) fails it.
pub fn routes() -> Vec<Route> {
    use handlers::*;
    use Verb::*;
    vec![
        public(route(Get, "/healthz", healthz)),
        public(route(Get, "/v1/openapi.json", openapi_json)),
        route(Get, "/v1/runners", list_runners),
        route(Post, "/v1/runners", create_runner),
        route(Get, "/v1/runners/{id}", get_runner),
        route(Patch, "/v1/runners/{id}", update_runner),
        route(Delete, "/v1/runners/{id}", delete_runner),
        route(Get, "/v1/runners/{id}/runs", list_runs),
        // Uploaded files make a run's body larger than the others.
        body_limit(
            route(Post, "/v1/runners/{id}/runs", create_run),
            body::MAX_RUN_BODY_BYTES,
        ),
        route(Post, "/v1/runners/{id}/runs/batch", create_runs),
        route(Get, "/v1/runners/{id}/runs/{run_id}", get_run),
        route(Post, "/v1/runners/{id}/runs/{run_id}/stop", stop_run),
        route(Get, "/v1/runners/{id}/runs/{run_id}/logs", list_logs),
        route(
            Get,
            "/v1/runners/{id}/runs/{run_id}/logs/stream",
            stream_logs,
        ),
        route(Post, "/v1/runners/{id}/warmup", warmup_runner),
        route(Get, "/v1/container_registries", list_registries),
        route(Post, "/v1/container_registries", create_registry),
        route(Get, "/v1/container_registries/{id}", get_registry),
        route(Delete, "/v1/container_registries/{id}", delete_registry),
        route(Get, "/v1/usage", usage),
        route(Get, "/v1/nodes", list_nodes),
        route(Post, "/v1/nodes/{id}/drain", drain_node),
        route(Post, "/v1/nodes/{id}/resume", resume_node),
        route(Get, "/v1/instance_types", list_instance_types),
        route(Get, "/v1/regions", list_regions),
        route(Get, "/v1/admin/api_keys", admin::list_api_keys),
        route(Post, "/v1/admin/api_keys", admin::create_api_key),
        route(Delete, "/v1/admin/api_keys/{key_id}", admin::revoke_api_key),
    ]
}

pub fn router(state: AppState) -> Router {
    let (mut open, mut v1) = (Router::new(), Router::new());
    for r in routes() {
        if r.authenticated {
            v1 = v1.route(r.path, r.handler);
        } else {
            open = open.route(r.path, r.handler);
        }
    }
    let v1 = v1
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body::MAX_BODY_BYTES));
    open.merge(v1)
        .method_not_allowed_fallback(handlers::method_not_allowed)
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
