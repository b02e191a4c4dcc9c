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
pub mod control_service;
pub mod engine;
pub mod error;
pub mod placement;

use berth_core::store::Store;
use berth_proto::v1::agent_service_server::AgentServiceServer;
use berth_proto::v1::control_service_server::ControlServiceServer;
use std::future::Future;
use std::sync::Arc;

/// Refuses every call that does not present the cluster token, when the scheduler has one:
/// without it anyone who reaches the port could register as a node (and receive runs, their
/// secrets and registry credentials) or call the control service as the admin.
#[derive(Clone)]
pub struct ClusterGate {
    token: Option<Arc<str>>,
}

impl ClusterGate {
    pub fn new(token: Option<&str>) -> ClusterGate {
        ClusterGate {
            token: token.map(Arc::from),
        }
    }
}

impl tonic::service::Interceptor for ClusterGate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let presented = req
            .metadata()
            .get(berth_core::auth::CLUSTER_TOKEN_METADATA)
            .map(|v| v.as_bytes());
        if berth_core::auth::cluster_token_ok(self.token.as_deref(), presented) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "missing or wrong cluster token (x-berth-cluster-token)",
            ))
        }
    }
}

/// Serves both services on `listener` until `shutdown` resolves; with `gate` holding a token,
/// only callers presenting it are served.
pub async fn serve<S: Store>(
    scheduler: Arc<engine::Scheduler<S>>,
    listener: tokio::net::TcpListener,
    gate: ClusterGate,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    let expiry = tokio::spawn(expire_nodes_forever(scheduler.clone()));
    let sweep = tokio::spawn(sweep_idempotency_forever(scheduler.clone()));
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::with_interceptor(
            agent_service::AgentApi {
                scheduler: scheduler.clone(),
            },
            gate.clone(),
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
    served
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

/// Checks node liveness twice a second.
async fn expire_nodes_forever<S: Store>(scheduler: Arc<engine::Scheduler<S>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Err(e) = scheduler.expire_nodes(std::time::Instant::now()).await {
            tracing::error!(error = %e, "node expiry failed");
        }
    }
}
