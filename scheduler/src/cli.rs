//! The scheduler's settings: its command line, environment variables and
//! `/etc/berth/scheduler.toml` (read by [`berth_core::config_file`]; reference: docs/CONFIG.md).

use crate::placement::FitPolicy;
use clap::Parser;
use std::path::PathBuf;

/// Berth's control plane: places runs on nodes and owns the state.
#[derive(Parser, Debug)]
#[command(name = "berth-scheduler", version)]
pub struct Args {
    #[command(flatten)]
    pub telemetry: berth_core::telemetry::TelemetryArgs,
    /// Address for the agent and control gRPC services.
    #[arg(long, env = "BERTH_SCHEDULER_LISTEN", default_value = "127.0.0.1:7070")]
    pub grpc_listen: String,
    /// Serve Prometheus metrics on `/metrics` of this address (plain HTTP, no auth: keep it
    /// on loopback or a private network). Off when not given.
    #[arg(long, env = "BERTH_SCHEDULER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the embedded store lives (and the default secret key file).
    #[arg(
        long,
        env = "BERTH_SCHEDULER_DATA_DIR",
        default_value = "/var/lib/berth/scheduler"
    )]
    pub data_dir: PathBuf,
    /// The state store: `embedded` (a file in DATA_DIR, the default) or
    /// `etcd://host:port,host:port` (an etcd cluster; keys under `/berth/`).
    #[arg(long, env = "BERTH_STORE", default_value = "embedded", value_parser = parse_store)]
    pub store: StoreChoice,
    /// Registry for image names that name none (e.g. `busybox`).
    #[arg(long, env = "BERTH_DEFAULT_REGISTRY", default_value = "docker.io")]
    pub default_registry: String,
    /// Seconds between SIGTERM and SIGKILL when a run is stopped or times out, unless the run or
    /// its runner sets `stop_grace_seconds`.
    #[arg(long, default_value_t = berth_core::defaults::STOP_GRACE_SECONDS)]
    pub stop_grace_seconds: u32,
    /// How to choose among nodes that fit: `best-fit` (pack) or `spread`.
    #[arg(long, default_value = "best-fit", value_parser = parse_policy)]
    pub placement_policy: FitPolicy,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_interval_seconds: u64,
    /// A node silent this long (plus the grace) is declared lost (default: 3 heartbeats).
    #[arg(long)]
    pub node_ttl_seconds: Option<u64>,
    #[arg(long, default_value_t = 4)]
    pub lost_grace_seconds: u64,
    /// A run waiting this long gets capacity reserved for it.
    #[arg(long, default_value_t = 60)]
    pub reserve_after_seconds: u64,
    /// Hours a run's log lines are kept after they are stored (0: for ever).
    #[arg(long, env = "BERTH_LOG_RETENTION_HOURS", default_value_t = 168)]
    pub log_retention_hours: u64,
    /// The key that seals secrets at rest (created on first start; default: DATA_DIR/secret.key).
    #[arg(long, env = "BERTH_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// JSON file with `regions` and `instance_types` (default: the built-in catalog).
    #[arg(long, env = "BERTH_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// File holding the cluster token: the API's credential, which it presents on every control
    /// call (`x-berth-cluster-token`, at least 16 characters); or set `BERTH_CLUSTER_TOKEN`
    /// (never on a command line). With it, agents must present node credentials (enroll with a
    /// registration token). Without it anyone who reaches the port is served: only for a port
    /// on loopback.
    #[arg(long, env = "BERTH_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// The scheduler's TLS certificate chain (PEM), issued by the fleet's CA (`berthctl admin
    /// tls init`). Without it the scheduler serves plaintext, on a loopback address only.
    #[arg(long, env = "BERTH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM, kept 0600).
    #[arg(long, env = "BERTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster token, read from the environment or `--cluster-token-file`.
    #[arg(skip)]
    pub cluster_token: Option<String>,
    /// With etcd: seconds the leader's lease lives without a keep-alive. A standby takes over
    /// at most about this long (plus 0.5 s) after the leader dies; the leader gives up when it
    /// could not renew for this long (so it must outlast an etcd leader election, 1–2 s with
    /// etcd's defaults). etcd refuses less than 2.
    #[arg(long, env = "BERTH_LEADER_LEASE_SECONDS", default_value_t = 3)]
    pub leader_lease_seconds: u64,
    /// With etcd: operations per etcd transaction, as the etcd members' `--max-txn-ops` allows
    /// (etcd's default 128). The writer merges queued writes into requests of up to this many
    /// operations, so raising both together lets more writes share one raft round trip.
    #[arg(long, env = "BERTH_ETCD_MAX_TXN_OPS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(2..=65_536))]
    pub etcd_max_txn_ops: u32,
    /// Hours an idempotency key replays its run; after that the same key creates a new run.
    #[arg(long, default_value_t = crate::engine::DEFAULT_IDEMPOTENCY_TTL.as_secs() / 3600)]
    pub idempotency_ttl_hours: u64,
    /// Seconds an ephemeral run (`berthctl run --here`) waits for its node to connect before it
    /// ends `failed` with `node_lost`.
    #[arg(long, env = "BERTH_EPHEMERAL_CONNECT_TIMEOUT_SECONDS",
          default_value_t = crate::engine::DEFAULT_EPHEMERAL_CONNECT_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ephemeral_connect_timeout_seconds: u64,
    /// Let run-ended webhooks (runners' `notify_url`) reach loopback and private addresses.
    /// Off by default: a project's user could otherwise make the control plane call its own
    /// network (etcd, the API's admin routes, cloud metadata).
    #[arg(long, env = "BERTH_WEBHOOK_ALLOW_PRIVATE_NETWORKS")]
    pub webhook_allow_private_networks: bool,
    /// Only these hosts (as written in `notify_url`, comma-separated) receive run-ended
    /// webhooks; others are refused without a lookup or a connection. Unset: any host.
    #[arg(long, env = "BERTH_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    Embedded,
    /// Client URLs of the etcd members.
    Etcd(Vec<String>),
}

pub fn parse_store(s: &str) -> Result<StoreChoice, String> {
    if s == "embedded" {
        return Ok(StoreChoice::Embedded);
    }
    let Some(hosts) = s.strip_prefix("etcd://") else {
        return Err(format!(
            "unknown store {s}; use embedded or etcd://host:port[,host:port...]"
        ));
    };
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if endpoints.is_empty() {
        return Err("etcd:// needs at least one host:port".to_owned());
    }
    Ok(StoreChoice::Etcd(endpoints))
}

pub fn parse_policy(s: &str) -> Result<FitPolicy, String> {
    FitPolicy::parse(s)
        .ok_or_else(|| format!("unknown placement policy {s}; use best-fit or spread"))
}

#[cfg(test)]
mod tests {
    use super::{parse_store, Args, StoreChoice};
    use clap::CommandFactory;

    #[test]
    fn store_flag() {
        assert_eq!(parse_store("embedded"), Ok(StoreChoice::Embedded));
        assert_eq!(
            parse_store("etcd://10.0.0.1:2379,10.0.0.2:2379"),
            Ok(StoreChoice::Etcd(vec![
                "http://10.0.0.1:2379".to_owned(),
                "http://10.0.0.2:2379".to_owned()
            ]))
        );
        assert!(parse_store("etcd://").is_err());
        assert!(parse_store("redis://x").is_err());
    }

    /// docs/CONFIG.md's scheduler table is the one these settings render
    /// (`BERTH_BLESS=1 cargo test -p berth-scheduler --lib reference` rewrites it).
    #[test]
    fn the_reference_page_is_current() {
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
        let checked =
            berth_core::config_file::check_reference(&Args::command(), "scheduler", &page);
        assert_eq!(checked, Ok(()));
    }
}
