//! Prometheus metrics and health (issue #14): every process records through the `metrics`
//! facade, and serves on a listener of its own (`--metrics-listen`) the metrics in Prometheus'
//! text format (`/metrics`, rendered by `metrics-exporter-prometheus`), its liveness
//! (`/healthz`: the process answers) and its readiness (`/readyz`: each of its [`Check`]s).
//!
//! Why these crates rather than `opentelemetry`'s: the facade costs an atomic add per counter
//! where it is recorded (no exporter pipeline on the run's path), the exporter is one small HTTP
//! listener with no collector to run beside Berth, and Prometheus' text format is what every
//! monitoring stack scrapes. Names follow Prometheus' conventions: a `berth_` prefix, base units
//! (`_seconds`, `_bytes`) and `_total` for counters; the per-run container figures follow
//! OpenTelemetry's container metrics (`container.memory.usage` → `container_memory_usage_bytes`).
//!
//! The metrics are described (HELP lines) by each process at start; the names live with the
//! code that records them.

use std::net::SocketAddr;

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub reason: String,
}

/// Bucket bounds (seconds) of every `_seconds` histogram: 1 ms to 2 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// What a process adds to its `/metrics` at scrape time (figures read when asked, such as the
/// agent's per-run container usage): Prometheus text, HELP and TYPE lines included.
pub type Collector = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// One readiness check's outcome: what it checked, whether it passed, and what it found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, result: Result<String, String>) -> Check {
        match result {
            Ok(detail) => Check {
                name,
                ok: true,
                detail,
            },
            Err(detail) => Check {
                name,
                ok: false,
                detail,
            },
        }
    }
}

/// How long one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A process's readiness checks, run when `/readyz` is asked.
pub type Readiness = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Check>> + Send>>
        + Send
        + Sync,
>;

/// `/readyz`'s answer: 200 when every check passed, else 503; the body names each check.
pub fn readiness_response(
    checks: &[Check],
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, axum::Json(body))
}

/// Installs the process-wide recorder and serves, on `listen` (plain HTTP; bind it to loopback
/// or a private network, as any Prometheus exporter), `/metrics` followed by what `collect`
/// renders, `/healthz` and `/readyz` (`ready`'s checks). Must run inside the tokio runtime.
/// Without a listener nothing is recorded (the facade's no-op recorder) or served.
pub async fn serve(
    listen: Option<SocketAddr>,
    collect: Option<Collector>,
    ready: Readiness,
) -> Result<(), MetricsError> {
    let Some(addr) = listen else {
        return Ok(());
    };
    let failed = |reason: String| MetricsError { addr, reason };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            SECONDS_BUCKETS,
        )
        .map_err(|e| failed(e.to_string()))?
        .install_recorder()
        .map_err(|e| failed(e.to_string()))?;
    // Histograms keep their samples until rendered: drain them now and then even when
    // nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move { readiness_response(&ready().await) }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                let collect = collect.clone();
                async move {
                    let mut text = handle.render();
                    if let Some(collect) = collect {
                        text.push_str(&collect());
                    }
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    tracing::info!(%addr, "serving metrics on /metrics");
    Ok(())
}

/// Seconds between two unix-millisecond timestamps, for a histogram (0 if out of order).
pub fn seconds_between(from_ms: i64, to_ms: i64) -> f64 {
    if to_ms <= from_ms || from_ms <= 0 {
        return 0.0;
    }
    (to_ms - from_ms) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_between_is_never_negative() {
        assert_eq!(seconds_between(1_000, 3_500), 2.5);
        assert_eq!(seconds_between(3_500, 1_000), 0.0);
        assert_eq!(seconds_between(0, 1_000), 0.0);
    }
}
