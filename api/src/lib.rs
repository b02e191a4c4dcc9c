//! # Layout
//! Berth's public REST API (Nodion's shape) and its SSE log streams. A stateless process: every
//! request is parsed and validated here ([`body`], `berth_core::validate`), then answered by
//! the scheduler's control service over gRPC.
//!
//! - [`routes`]: the route table (verb, path, handler, token or not); [`router`] is built from it.
//! - [`handlers`]: one module per resource (runners, runs, logs and their SSE stream, registries,
//!   nodes, catalog, usage), each with its JSON envelopes; shared id and paging parsing.
//! - [`admin`]: the admin-only routes (API keys).
//! - [`openapi`]: the document generated from the handlers' annotations, and its own route.
//! - [`views`]: the public JSON of each record; [`error`]: the one mapping from errors to HTTP.
//! - [`server`]: the accept loop (hyper, HTTP/1.1) with the limits of [`limits`]: header and
//!   body read timeouts, a connection cap that closes the longest-idle connection to admit a new
//!   one, the per-key cap on log streams.
//! - [`auth`]: authenticates every request (admin token or a project's API key) and names the
//!   caller's project on every control call.
//! - [`scheduler`]: how calls reach whichever scheduler leads (`--scheduler a,b`): which calls
//!   are reads (sent again after an ambiguous failure) and the failover time budget.
//!
//! Dependencies point one way: `routes` → `openapi` → `handlers` → `views`/`body`/`error`.
//! Nothing below `routes` names it, so the table, the handlers and the document form no cycle.
//!
//! [`serve`] takes its listener and shutdown future from the caller, so tests run the real
//! server in process on `127.0.0.1:0`.

pub mod admin;
pub mod auth;
pub mod body;
pub mod cli;
pub mod dashboard;
pub mod error;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod scheduler;
pub mod server;
pub mod views;

pub use limits::ServeLimits;

pub use routes::{routes, Route, Verb};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use berth_core::failover::{FailoverChannel, SchedulerAddrs};
use berth_proto::v1::control_service_client::ControlServiceClient;
use std::future::Future;
use std::sync::Arc;
use tonic::service::interceptor::InterceptedService;

#[derive(Clone)]
pub struct AppState {
    channel: FailoverChannel,
    /// Without the caller: only for `AuthenticateApiKey`, which establishes it.
    control: ControlServiceClient<InterceptedService<FailoverChannel, auth::ClusterToken>>,
    cluster: auth::ClusterToken,
    admin_token: Arc<str>,
    streams: Arc<limits::StreamGauge>,
}

impl AppState {
    /// `schedulers` are every scheduler's address (see [`scheduler`]). `admin_token` is the
    /// operator's token (`--token`): it manages nodes and API keys and acts in project
    /// `default`. `cluster` goes on every call to the scheduler. Must be called inside a Tokio
    /// runtime; nothing connects until the first call, so the API starts (and answers 503) while
    /// no scheduler is up.
    pub fn new(
        schedulers: &SchedulerAddrs,
        admin_token: &str,
        cluster: auth::ClusterToken,
    ) -> AppState {
        let channel = scheduler::channel(schedulers);
        AppState {
            control: ControlServiceClient::with_interceptor(channel.clone(), cluster.clone()),
            channel,
            cluster,
            admin_token: Arc::from(admin_token),
            streams: limits::StreamGauge::new(limits::DEFAULT_MAX_STREAMS_PER_KEY),
        }
    }

    /// At most `max` log streams open at once per API key (the admin token counts as one key).
    pub fn with_max_streams_per_key(mut self, max: usize) -> AppState {
        self.streams = limits::StreamGauge::new(max);
        self
    }

    /// The control client for the current request: every call carries the caller's project.
    pub(crate) fn control(
        &self,
    ) -> ControlServiceClient<InterceptedService<FailoverChannel, auth::CallerInterceptor>> {
        ControlServiceClient::with_interceptor(
            self.channel.clone(),
            auth::CallerInterceptor {
                cluster: self.cluster.clone(),
            },
        )
    }
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
    open.merge(dashboard::router())
        .merge(v1)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// One structured log line per request.
async fn trace_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    // The route's template, not the path: ids must not become label values.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let started = std::time::Instant::now();
    // A span only while traces are exported: it is what carries the trace on to the scheduler
    // (and continues the caller's, given a `traceparent` header).
    let span = if berth_core::telemetry::exporting() {
        let name = format!("{method} {}", route.as_deref().unwrap_or("unmatched"));
        let span = tracing::info_span!(
            "request",
            otel.name = %name,
            otel.kind = "server",
            http.request.method = %method,
            http.route = route.as_deref().unwrap_or(""),
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        berth_core::telemetry::follow_headers(&span, req.headers());
        span
    } else {
        tracing::Span::none()
    };
    let res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("http.response.status_code", res.status().as_u16());
    metrics::request(&method, route, res.status().as_u16(), started.elapsed());
    span.in_scope(|| {
        tracing::info!(
            %method,
            %path,
            status = res.status().as_u16(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "request"
        );
    });
    res
}

/// Serves the API on `listener` with the default [`ServeLimits`] until `shutdown` resolves.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(state, listener, ServeLimits::default(), shutdown).await
}

/// Serves the API on `listener` within `limits` until `shutdown` resolves.
pub async fn serve_with(
    state: AppState,
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::run(router(state), listener, limits, shutdown).await
}
