//! # Layout
//! The control plane. One process owns the state store and serves two gRPC services on one port:
//! - [`agent_service`]: node agents dial in and keep one bidirectional stream each.
//! - [`control_service`]: the public API (a separate, stateless process) reads and changes state.
//!
//! Both are adapters over [`engine::Scheduler`], which owns the store, the connected nodes and
//! the runs that have not ended, and decides placement through the pure [`placement`] module.
//! Each service is the one place that converts its protocol's protobuf types to and from the
//! domain types the engine speaks: [`agent_service`] for agents' reports and commands
//! ([`berth_core::agent`], sent through an [`berth_core::agent::AgentLink`]),
//! [`control_service`] for the API's requests. The engine is a small core
//! (`engine.rs`: state, store loading, the staged commit-then-dispatch pipeline) with one
//! child module per concern under `engine/` (runners, runs, logs, queue, nodes, reports, images,
//! registries, usage, API keys). `README.md` beside this crate walks the pipeline from queue
//! to lease.

pub mod agent_service;
pub mod cli;
pub mod control_service;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod placement;
pub mod webhooks;

use berth_core::store::Store;
use berth_proto::v1::agent_service_server::AgentServiceServer;
use berth_proto::v1::control_service_server::ControlServiceServer;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Refuses every control call that does not present the cluster token, when the scheduler has
/// one: without it anyone who reaches the port could call the control service as the admin.
/// Only the API holds it; agents present node credentials instead (see `agent_service`). While paused
/// (a leader on etcd that cannot confirm its lease, see [`berth_core::store::LeaseState`]) it
/// refuses every new call as `UNAVAILABLE`, marked as not served so that clients send even a
/// write again: another scheduler may lead by now, and this one's memory may be stale.
#[derive(Clone)]
pub struct ClusterGate {
    token: Option<Arc<str>>,
    paused: Arc<AtomicBool>,
}

impl ClusterGate {
    pub fn new(token: Option<&str>) -> ClusterGate {
        ClusterGate {
            token: token.map(Arc::from),
            paused: Arc::default(),
        }
    }

    /// The gate of `AgentService`: agents authenticate with node credentials, never with the
    /// cluster token (only the API holds that), so it only pauses with this one.
    pub fn for_agents(&self) -> ClusterGate {
        ClusterGate {
            token: None,
            paused: self.paused.clone(),
        }
    }

    /// Whether callers must present the cluster token (and agents a node credential).
    pub fn is_closed(&self) -> bool {
        self.token.is_some()
    }

    /// Pauses (true) or resumes (false) serving new calls.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }
}

impl tonic::service::Interceptor for ClusterGate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let presented = req
            .metadata()
            .get(berth_core::auth::CLUSTER_TOKEN_METADATA)
            .map(|v| v.as_bytes());
        if !berth_core::auth::cluster_token_ok(self.token.as_deref(), presented) {
            return Err(tonic::Status::unauthenticated(
                "missing or wrong cluster token (x-berth-cluster-token)",
            ));
        }
        if self.paused.load(Ordering::Acquire) {
            let mut status = tonic::Status::unavailable(
                "this scheduler cannot confirm its leadership with etcd right now; try again",
            );
            status.metadata_mut().insert(
                berth_core::failover::NOT_SERVED_METADATA,
                tonic::metadata::MetadataValue::from_static("leadership-unconfirmed"),
            );
            return Err(status);
        }
        Ok(req)
    }
}

/// Serves both services on `listener` until `shutdown` resolves; with `gate` holding a token,
/// only callers presenting it are served. Plaintext: see [`serve_tls`].
pub async fn serve<S: Store>(
    scheduler: Arc<engine::Scheduler<S>>,
    listener: tokio::net::TcpListener,
    gate: ClusterGate,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_tls(scheduler, listener, gate, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (see [`berth_core::tls`]).
pub async fn serve_tls<S: Store>(
    scheduler: Arc<engine::Scheduler<S>>,
    listener: tokio::net::TcpListener,
    gate: ClusterGate,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = incoming(listener);
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    let expiry = tokio::spawn(expire_nodes_forever(scheduler.clone()));
    let sweep = tokio::spawn(sweep_idempotency_forever(scheduler.clone()));
    let retries = tokio::spawn(place_due_retries_forever(scheduler.clone()));
    let schedules = tokio::spawn(fire_schedules_forever(scheduler.clone()));
    let webhooks = tokio::spawn(webhooks::deliver_forever(
        scheduler.clone(),
        Arc::new(webhooks::HttpSender {
            allow_private_networks: scheduler.config().webhook_allow_private_networks,
            allowed_hosts: scheduler.config().webhook_allowed_hosts.clone(),
        }),
    ));
    let sample = tokio::spawn(metrics::sample_forever(scheduler.clone()));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let served = server
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .initial_stream_window_size(Some(berth_core::failover::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(berth_core::failover::HTTP2_CONNECTION_WINDOW))
        .trace_fn(rpc_span)
        .add_service(AgentServiceServer::with_interceptor(
            agent_service::AgentApi {
                scheduler: scheduler.clone(),
                require_credentials: gate.is_closed(),
            },
            gate.for_agents(),
        ))
        .add_service(ControlServiceServer::with_interceptor(
            control_service::ControlApi { scheduler },
            gate,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown);
    // Attached agents hold their streams open for as long as the connection lives, so a
    // graceful drain would wait for them forever (a restart through deploy/up.sh then waited
    // 10 s for SIGKILL): calls in flight get SHUTDOWN_GRACE, then the connections are dropped
    // and the agents reconnect to the next scheduler. Every state change is committed to the
    // store before it is acknowledged, so nothing acknowledged is lost.
    tokio::pin!(served);
    let served = tokio::select! {
        served = &mut served => served,
        () = async {
            let _ = stopping.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "closing the connections still open");
            Ok(())
        }
    };
    expiry.abort();
    sweep.abort();
    retries.abort();
    schedules.abort();
    webhooks.abort();
    sample.abort();
    served
}

/// The connections the scheduler serves, each with `TCP_NODELAY`: the server builder's
/// The span of a control call (while traces are exported), continuing the caller's trace from
/// its `traceparent` metadata: a run created in it records it, and its placement and its life
/// on a node continue the trace. An agent's session lasts as long as its connection and
/// carries every run of the node: it has no span of its own (each run has its own trace).
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if !berth_core::telemetry::exporting() || path.starts_with("/berth.v1.AgentService/") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        trace_id = tracing::field::Empty,
    );
    berth_core::telemetry::follow_headers(&span, req.headers());
    span
}

/// `tcp_nodelay` applies only to sockets tonic binds itself. With Nagle's algorithm on, a small
/// frame written shortly after another (a watch's first event after its response headers, an
/// assignment after an acknowledgement) waited for the peer's delayed ACK, ~40 ms.
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// How long shutdown waits for calls in flight before closing connections.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Deletes expired idempotency keys every few seconds, a bounded number per pass (see
/// `engine::idempotency`).
async fn sweep_idempotency_forever<S: Store>(scheduler: Arc<engine::Scheduler<S>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Err(e) = scheduler
            .sweep_idempotency(berth_core::now_unix_millis())
            .await
        {
            tracing::error!(error = %e, "idempotency key sweep failed");
        }
    }
}

/// Places retries whose backoff is over, four times a second (backoffs are whole seconds).
async fn place_due_retries_forever<S: Store>(scheduler: Arc<engine::Scheduler<S>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Err(e) = scheduler
            .place_due_retries(berth_core::now_unix_millis())
            .await
        {
            tracing::error!(error = %e, "placing due retries failed");
        }
    }
}

/// Fires due schedules four times a second.
async fn fire_schedules_forever<S: Store>(scheduler: Arc<engine::Scheduler<S>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Err(e) = scheduler
            .fire_due_schedules(berth_core::now_unix_millis())
            .await
        {
            tracing::error!(error = %e, "firing schedules failed");
        }
    }
}

/// Checks node liveness twice a second.
async fn expire_nodes_forever<S: Store>(scheduler: Arc<engine::Scheduler<S>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Err(e) = scheduler.expire_nodes(std::time::Instant::now()).await {
            tracing::error!(error = %e, "node expiry failed");
        }
        if let Err(e) = scheduler
            .expire_ephemeral_runs(berth_core::now_unix_millis())
            .await
        {
            tracing::error!(error = %e, "ending ephemeral runs whose node never came failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterGate;
    use tokio_stream::StreamExt as _;
    use tonic::service::Interceptor as _;

    /// Every accepted connection has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("getsockopt"));
    }

    fn request(token: &str) -> tonic::Request<()> {
        let mut req = tonic::Request::new(());
        if let Ok(v) = token.parse() {
            req.metadata_mut()
                .insert(berth_core::auth::CLUSTER_TOKEN_METADATA, v);
        }
        req
    }

    /// Paused, the gate refuses callers with the token as not served (so a client may send a
    /// write again), and still refuses callers without it as unauthenticated.
    #[test]
    fn a_paused_gate_refuses_calls_as_not_served() {
        let token = "0123456789abcdef";
        let mut gate = ClusterGate::new(Some(token));
        assert!(gate.call(request(token)).is_ok());
        gate.set_paused(true);
        let refused = gate.call(request(token)).expect_err("paused");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused
            .metadata()
            .contains_key(berth_core::failover::NOT_SERVED_METADATA));
        let stranger = gate.call(request("wrong")).expect_err("no token");
        assert_eq!(stranger.code(), tonic::Code::Unauthenticated);
        gate.set_paused(false);
        assert!(gate.call(request(token)).is_ok());
    }
}
