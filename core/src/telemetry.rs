//! Logs and traces of every Berth process.
//!
//! Events go to stderr as text (for people) or JSON lines (`--log-format json`, for a log
//! pipeline; each line carries the fields of the spans it happened in). When an OTLP endpoint is
//! configured (`--otlp-endpoint`, or OpenTelemetry's own `OTEL_EXPORTER_OTLP_ENDPOINT`), spans
//! are also exported over OTLP/gRPC, so one trace follows a run from the API call through
//! placement to the agent's containerd calls. The span context travels as a W3C `traceparent`:
//! in gRPC metadata on every call (API → scheduler, agent → containerd), and on the run itself
//! (its record and its assignment), because a run is placed after the call that created it
//! returned and reaches its node on a stream that carries every run of that node.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The W3C trace context header (and gRPC metadata key).
pub const TRACEPARENT: &str = "traceparent";

/// How long one export to the collector may take before it is given up (the spans are dropped;
/// the process never waits on its collector).
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether spans are exported: without that there is no span context to carry, and every
/// propagation helper here is a no-op.
static EXPORTING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, the event's fields and its spans'.
    Json,
}

/// The logging and tracing flags every Berth daemon takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Log lines as `text` or `json` (one object per line). The level is set by `BERTH_LOG`
    /// (or `RUST_LOG`), `info` by default.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`. Off when
    /// not given. The batch delay follows `OTEL_BSP_SCHEDULE_DELAY` (milliseconds, 5000 by
    /// default).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("--otlp-endpoint needs a Tokio runtime to export on")]
    NoRuntime,
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// Keeps the exporter alive; dropping it exports what is still buffered (bounded by the
/// export timeout).
#[must_use = "dropping it stops the export of traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "exporting the last spans failed");
            }
        }
    }
}

impl TelemetryArgs {
    /// Installs the process's subscriber: the log format, the level filter and, with an OTLP
    /// endpoint, the span exporter (call inside the Tokio runtime: exports run on it).
    /// `service` is the process's `service.name` in its traces.
    pub fn init(&self, service: &'static str) -> Result<Telemetry, TelemetryError> {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_env("BERTH_LOG")
            .or_else(|_| EnvFilter::try_from_default_env())
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let fmt = match self.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        };
        let provider = match &self.otlp_endpoint {
            Some(endpoint) => Some(provider(service, endpoint)?),
            None => None,
        };
        let otel = provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        if let Some(endpoint) = &self.otlp_endpoint {
            EXPORTING.store(true, Ordering::Relaxed);
            tracing::info!(service, endpoint = %endpoint, "exporting traces over OTLP");
        }
        Ok(Telemetry { provider })
    }
}

fn provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime,
        })
        .with_resource(resource)
        .build())
}

/// Runs an exporter's calls on the process's Tokio runtime. The SDK's batch processor exports
/// from a thread of its own, where the gRPC exporter finds no reactor (it would panic there and
/// every later span would be dropped).
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                format!("the export task failed: {e}"),
            )),
        }
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once, while the provider is built and nothing else holds the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Whether spans are being exported (the propagation helpers do nothing otherwise).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The `traceparent` of the current span, to carry where metadata cannot (a stored record, a
/// message on a shared stream). `None` when traces are not exported.
pub fn traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of `span`; `None` when traces are not exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.0
}

/// Puts the current span's context on an outgoing gRPC call.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    inject_from(&tracing::Span::current(), metadata);
}

/// Puts `span`'s context on an outgoing gRPC call (the span of that call, made before it).
pub fn inject_from(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(value) = traceparent_of(span).and_then(|t| t.parse().ok()) {
        metadata.insert(TRACEPARENT, value);
    }
}

/// A span for one step of a process's work (`name` is its name in the trace), inside the
/// current one; no span at all while traces are not exported.
pub fn step(name: &'static str) -> tracing::Span {
    if exporting() {
        tracing::info_span!("step", otel.name = name)
    } else {
        tracing::Span::none()
    }
}

/// A span for an outgoing gRPC call to `rpc` (`Service.Method`) of `system` (e.g.
/// `containerd`); no span while traces are not exported.
pub fn client_call(system: &'static str, rpc: &'static str) -> tracing::Span {
    if exporting() {
        tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{system} {rpc}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = system,
            rpc.method = rpc,
        )
    } else {
        tracing::Span::none()
    }
}

/// Makes `span` a child of the span `traceparent` names (another process's), and records the
/// trace id in its `trace_id` field where it has one, so its log lines can be found by trace.
/// Does nothing for a missing or malformed value, or when traces are not exported.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if !exporting() {
        return;
    }
    if let Some(value) = traceparent {
        let cx = TraceContextPropagator::new().extract(&Carrier(Some(value.to_owned())));
        if cx.span().span_context().is_valid() {
            // Only fails for a span already started, which a caller here never passes.
            let _ = span.set_parent(cx);
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// [`follow`] with the `traceparent` of an incoming request's headers (HTTP or gRPC).
pub fn follow_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    follow(span, headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()));
}

/// A carrier of the one header the W3C propagator reads and writes (`tracestate` is dropped:
/// Berth adds nothing to it).
#[derive(Default)]
struct Carrier(Option<String>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_the_carrier() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContextPropagator::new().extract(&Carrier(Some(value.to_owned())));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = Carrier::default();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        assert_eq!(out.0.as_deref(), Some(value));
    }

    #[test]
    fn malformed_traceparents_give_no_parent() {
        for bad in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let cx = TraceContextPropagator::new().extract(&Carrier(Some(bad.to_owned())));
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn nothing_is_injected_while_traces_are_not_exported() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get(TRACEPARENT).is_none());
        assert_eq!(traceparent(), None);
    }
}
