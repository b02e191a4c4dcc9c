//! Traces (issue #14, item 2) on a real fleet: with an OTLP endpoint configured (here through
//! OpenTelemetry's own `OTEL_EXPORTER_OTLP_ENDPOINT`), one trace follows a run from the API call
//! through the scheduler's control call and placement to the agent's run and its containerd
//! calls, continuing the caller's `traceparent`; a collector that goes away costs the runs
//! nothing; and `--log-format json` makes every log line a JSON object carrying its spans.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet, FleetOptions, TOKEN};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/gRPC trace receiver on loopback that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(kept);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    /// Listens on a loopback port until `stop` fires; returns its `http://` address.
    async fn start(&self, stop: tokio::sync::oneshot::Receiver<()>) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        });
        Ok(format!("http://{addr}"))
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the trace holds a span named `name` from `service` (spans are exported in
    /// batches, every 100 ms here).
    async fn wait_span(&self, trace_id: &str, service: &str, name: &str) -> Result<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.of_trace(trace_id);
            if let Some(s) = spans
                .iter()
                .find(|s| s.service == service && s.name == name)
            {
                return Ok(s.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "no span {name:?} of {service} in trace {trace_id} after 20 s; it has:\n{}\nall spans received:\n{}",
                spans
                    .iter()
                    .map(|s| format!("  {} {} ({} <- {})", s.service, s.name, s.span_id, s.parent_span_id))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.spans
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default()
                    .iter()
                    .map(|s| format!(
                        "  {} {} ({} <- {})",
                        s.service, s.name, s.span_id, s.parent_span_id
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A fleet of one agent (fra) whose processes export to `endpoint`.
async fn traced_fleet(endpoint: &str) -> Result<Fleet> {
    Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ],
            ..FleetOptions::default()
        },
    )
    .await
}

/// POSTs a run with `traceparent` as the caller's trace context.
async fn start_traced_run(f: &Fleet, runner: &str, traceparent: &str) -> Result<String> {
    let res = f
        .http
        .post(format!("{}/v1/runners/{runner}/runs", f.api_url))
        .bearer_auth(TOKEN)
        .header("traceparent", traceparent)
        .json(&json!({}))
        .send()
        .await?;
    ensure!(res.status().is_success(), "POST run: {}", res.status());
    let v: Value = res.json().await?;
    v["run"]["id"]
        .as_str()
        .map(str::to_owned)
        .context("no run id")
}

#[tokio::test]
async fn one_trace_follows_a_run_from_the_api_to_containerd() -> Result<()> {
    let collector = Collector::default();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let endpoint = collector.start(stopped).await?;
    let f = traced_fleet(&endpoint).await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo traced"}))
        .await?;

    // The caller's own trace: Berth's spans continue it.
    let trace_id = format!("{:032x}", rand_u128());
    let caller_span = "00f067aa0ba902b7";
    let run = start_traced_run(&f, &runner, &format!("00-{trace_id}-{caller_span}-01")).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");

    // Each hop is the child of the one before it, across the three processes.
    let request = collector
        .wait_span(&trace_id, "berth-api", "POST /v1/runners/{id}/runs")
        .await?;
    ensure!(request.parent_span_id == caller_span, "{request:?}");
    let rpc = collector
        .wait_span(
            &trace_id,
            "berth-scheduler",
            "berth.v1.ControlService/CreateRun",
        )
        .await?;
    ensure!(
        rpc.parent_span_id == request.span_id,
        "{rpc:?} under {request:?}"
    );
    let placement = collector
        .wait_span(&trace_id, "berth-scheduler", "place run")
        .await?;
    ensure!(
        placement.parent_span_id == rpc.span_id,
        "{placement:?} under {rpc:?}"
    );
    let on_node = collector
        .wait_span(&trace_id, "berth-node-agent", "run")
        .await?;
    ensure!(
        on_node.parent_span_id == placement.span_id,
        "{on_node:?} under {placement:?}"
    );
    let create = collector
        .wait_span(&trace_id, "berth-node-agent", "create")
        .await?;
    ensure!(create.parent_span_id == on_node.span_id, "{create:?}");
    for rpc in ["Snapshots.Prepare", "Containers.Create", "Tasks.Create"] {
        let call = collector
            .wait_span(&trace_id, "berth-node-agent", &format!("containerd {rpc}"))
            .await?;
        ensure!(
            call.parent_span_id == create.span_id,
            "{call:?} under {create:?}"
        );
    }
    let start = collector
        .wait_span(&trace_id, "berth-node-agent", "start")
        .await?;
    let task_start = collector
        .wait_span(&trace_id, "berth-node-agent", "containerd Tasks.Start")
        .await?;
    ensure!(task_start.parent_span_id == start.span_id, "{task_start:?}");
    for step in ["image", "running", "output", "finish"] {
        let s = collector
            .wait_span(&trace_id, "berth-node-agent", step)
            .await?;
        ensure!(s.parent_span_id == on_node.span_id, "{s:?}");
    }

    // A run posted without a trace context starts a trace of its own at the API, which the
    // node continues as well.
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let roots = loop {
        let roots: Vec<Span> = collector
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| {
                s.name == "run" && s.service == "berth-node-agent" && s.trace_id != trace_id
            })
            .collect();
        if !roots.is_empty() || Instant::now() > deadline {
            break roots;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let own = roots
        .first()
        .context("the second run's node span was not exported")?;
    collector
        .wait_span(&own.trace_id, "berth-api", "POST /v1/runners/{id}/runs")
        .await?;

    // The collector goes away: runs go on, untouched.
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    ensure!(
        f.all_logs(&runner, &run).await?.len() == 1,
        "the run's line is stored"
    );
    Ok(())
}

/// A random 128-bit number (a trace id), without a dependency for it.
fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut id = 0u128;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(id);
        id = (id << 64) | u128::from(h.finish());
    }
    id.max(1)
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_run_in_them() -> Result<()> {
    let collector = Collector::default();
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let endpoint = collector.start(stopped).await?;
    let mut f = traced_fleet(&endpoint).await?;
    let node = f.node("fra").to_owned();
    let log = f.dir.path().join(format!("agent-{node}.log"));
    f.restart_agent_with(&node, &["--log-format", "json"])
        .await?;
    let skip = std::fs::read_to_string(&log)?.len();

    let runner = f.runner("fra", json!({"run_command": "echo json"})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");

    let text = std::fs::read_to_string(&log)?;
    let mut lines = 0;
    let mut in_run_span = None;
    for line in text[skip..].lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line of the agent is not JSON: {line}"))?;
        ensure!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        lines += 1;
        if v["span"]["name"] == "run" && v["span"]["run_id"] == run.as_str() {
            in_run_span = Some(v);
        }
    }
    ensure!(lines > 0, "no log line after the restart:\n{text}");
    let v = in_run_span.with_context(|| format!("no line in the run's span:\n{text}"))?;
    let trace_id = v["span"]["trace_id"].as_str().context("trace_id")?;
    collector
        .wait_span(trace_id, "berth-node-agent", "run")
        .await?;
    Ok(())
}
