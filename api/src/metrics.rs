//! The API's metrics (see `berth_core::metrics`): requests by method, route and status code,
//! their latency, and the log streams open.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, histogram};
use std::time::Duration;

pub const REQUESTS: &str = "berth_api_requests_total";
pub const REQUEST_DURATION: &str = "berth_api_request_duration_seconds";
pub const SSE_STREAMS_OPEN: &str = "berth_api_sse_streams_open";

/// HELP lines for every API metric.
pub fn describe() {
    describe_counter!(
        REQUESTS,
        "HTTP requests answered, by method, route (its template) and status code."
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time to the response's headers, by method and route (a log stream's whole life is not \\
         counted: only until it starts)."
    );
    describe_gauge!(SSE_STREAMS_OPEN, "Log streams (SSE) open now.");
    metrics::gauge!(SSE_STREAMS_OPEN).set(0.0);
}

/// Records one answered request; `route` is the matched route's template (`None`: no route
/// matched, e.g. a 404 for an unknown path).
pub fn request(method: &axum::http::Method, route: Option<String>, code: u16, took: Duration) {
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    let method = method.as_str().to_owned();
    counter!(REQUESTS, "method" => method.clone(), "route" => route.clone(), "code" => code.to_string())
        .increment(1);
    histogram!(REQUEST_DURATION, "method" => method, "route" => route).record(took.as_secs_f64());
}
