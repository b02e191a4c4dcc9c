//! The API's settings: its command line, environment variables and `/etc/berth/api.toml`
//! (read by [`berth_core::config_file`]; reference: docs/CONFIG.md).

use crate::limits;
use berth_core::failover::SchedulerAddrs;
use clap::builder::TypedValueParser as _;
use clap::Parser;
use std::path::PathBuf;

/// Berth's public REST API.
#[derive(Parser, Debug)]
#[command(name = "berth-api", version)]
pub struct Args {
    #[command(flatten)]
    pub telemetry: berth_core::telemetry::TelemetryArgs,
    /// Address the REST API listens on (plain HTTP; put TLS in front of it).
    #[arg(long, env = "BERTH_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serve Prometheus metrics on `/metrics` of this address (plain HTTP, no auth: keep it
    /// on loopback or a private network). Off when not given.
    #[arg(long, env = "BERTH_API_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The schedulers' gRPC addresses, comma-separated (`http://10.0.0.1:7070,http://10.0.0.2:7070`;
    /// one is fine). Calls go to the one that answers (the leader) and fail over to the others.
    #[arg(
        long,
        env = "BERTH_SCHEDULER_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    pub scheduler: SchedulerAddrs,
    /// The fleet's CA certificate (PEM): `https://` scheduler addresses are verified against it.
    /// Plaintext `http://` is accepted for loopback addresses only.
    #[arg(long, env = "BERTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// File holding the admin token (or set `BERTH_TOKEN`; never on a command line): manages
    /// nodes, registration tokens and API keys, and acts in project `default`. Everyone else
    /// sends a project's API key.
    #[arg(long, env = "BERTH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding the scheduler's cluster token, the API's credential on every call to it (or
    /// set `BERTH_CLUSTER_TOKEN`).
    #[arg(long, env = "BERTH_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Open connections at most; at the cap a new connection closes the longest-idle one.
    #[arg(long, env = "BERTH_API_MAX_CONNECTIONS", default_value_t = limits::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| usize::try_from(v).unwrap_or(usize::MAX)))]
    pub max_connections: usize,
    /// Seconds a client has to send a request's line and headers, from connecting or from the
    /// end of its previous response (so also the idle keep-alive timeout).
    #[arg(long, env = "BERTH_API_HEADER_READ_TIMEOUT", default_value_t = limits::DEFAULT_HEADER_READ_TIMEOUT.as_secs_f64(),
          value_parser = positive_seconds)]
    pub header_read_timeout: f64,
    /// Seconds a request body has to arrive, whole (408 after).
    #[arg(long, env = "BERTH_API_BODY_READ_TIMEOUT", default_value_t = limits::DEFAULT_BODY_READ_TIMEOUT.as_secs_f64(),
          value_parser = positive_seconds)]
    pub body_read_timeout: f64,
    /// Log streams (SSE) one API key may hold open at once (429 above).
    #[arg(long, env = "BERTH_API_MAX_STREAMS_PER_KEY", default_value_t = limits::DEFAULT_MAX_STREAMS_PER_KEY,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| usize::try_from(v).unwrap_or(usize::MAX)))]
    pub max_streams_per_key: usize,
    /// Seconds shutdown waits for requests in flight (log streams) before closing them.
    #[arg(long, env = "BERTH_API_SHUTDOWN_GRACE", default_value_t = limits::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(),
          value_parser = positive_seconds)]
    pub shutdown_grace: f64,
}

/// A positive number of seconds that fits a `Duration`.
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    std::time::Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .map(|_| v)
        .ok_or_else(|| format!("{s} is not a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// docs/CONFIG.md's api table is the one these settings render
    /// (`BERTH_BLESS=1 cargo test -p berth-api --lib reference` rewrites it).
    #[test]
    fn the_reference_page_is_current() {
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
        let checked = berth_core::config_file::check_reference(&Args::command(), "api", &page);
        assert_eq!(checked, Ok(()));
    }
}
