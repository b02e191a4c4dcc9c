use anyhow::Context;
use berth_core::keys;
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, EtcdConfig, EtcdStore, SealedStore, Store};
use berth_core::Catalog;
use berth_scheduler::engine::{Config, Scheduler};
use berth_scheduler::placement::FitPolicy;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Berth's control plane: places runs on nodes and owns the state.
#[derive(Parser, Debug)]
#[command(name = "berth-scheduler", version)]
struct Args {
    /// Address for the agent and control gRPC services.
    #[arg(long, env = "BERTH_SCHEDULER_LISTEN", default_value = "127.0.0.1:7070")]
    grpc_listen: String,
    /// Where the embedded store lives (and the default secret key file).
    #[arg(
        long,
        env = "BERTH_SCHEDULER_DATA_DIR",
        default_value = "/var/lib/berth/scheduler"
    )]
    data_dir: PathBuf,
    /// The state store: `embedded` (a file in DATA_DIR, the default) or
    /// `etcd://host:port,host:port` (an etcd cluster; keys under `/berth/`).
    #[arg(long, env = "BERTH_STORE", default_value = "embedded", value_parser = parse_store)]
    store: StoreChoice,
    /// Registry for image names that name none (e.g. `busybox`).
    #[arg(long, env = "BERTH_DEFAULT_REGISTRY", default_value = "docker.io")]
    default_registry: String,
    /// Seconds between SIGTERM and SIGKILL when a run is stopped or times out, unless the run or
    /// its runner sets `stop_grace_seconds`.
    #[arg(long, default_value_t = berth_core::defaults::STOP_GRACE_SECONDS)]
    stop_grace_seconds: u32,
    /// How to choose among nodes that fit: `best-fit` (pack) or `spread`.
    #[arg(long, default_value = "best-fit", value_parser = parse_policy)]
    placement_policy: FitPolicy,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_interval_seconds: u64,
    /// A node silent this long (plus the grace) is declared lost (default: 3 heartbeats).
    #[arg(long)]
    node_ttl_seconds: Option<u64>,
    #[arg(long, default_value_t = 4)]
    lost_grace_seconds: u64,
    /// A run waiting this long gets capacity reserved for it.
    #[arg(long, default_value_t = 60)]
    reserve_after_seconds: u64,
    /// The key that seals secrets at rest (created on first start; default: DATA_DIR/secret.key).
    #[arg(long, env = "BERTH_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// JSON file with `regions` and `instance_types` (default: the built-in catalog).
    #[arg(long, env = "BERTH_CATALOG")]
    catalog: Option<PathBuf>,
    /// Shared secret the API and every node agent must present on each gRPC call
    /// (`x-berth-cluster-token`, at least 16 characters). Without it anyone who reaches the
    /// port is served: only for a port on loopback.
    #[arg(long, env = "BERTH_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Hours an idempotency key replays its run; after that the same key creates a new run.
    #[arg(long, default_value_t = berth_scheduler::engine::DEFAULT_IDEMPOTENCY_TTL.as_secs() / 3600)]
    idempotency_ttl_hours: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreChoice {
    Embedded,
    /// Client URLs of the etcd members.
    Etcd(Vec<String>),
}

fn parse_store(s: &str) -> Result<StoreChoice, String> {
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

fn parse_policy(s: &str) -> Result<FitPolicy, String> {
    FitPolicy::parse(s)
        .ok_or_else(|| format!("unknown placement policy {s}; use best-fit or spread"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::init_tracing();
    let args = Args::parse();
    let catalog = match &args.catalog {
        Some(path) => Catalog::load(path)
            .with_context(|| format!("loading the catalog {}", path.display()))?,
        None => Catalog::default(),
    };
    let heartbeat = args.heartbeat_interval_seconds.max(1);
    let key_path = args
        .secret_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("secret.key"));
    let secrets = Arc::new(SecretKey::load_or_create(&key_path)?);
    let config = Config {
        fit_policy: args.placement_policy,
        catalog: Arc::new(catalog),
        node_ttl: Duration::from_secs(args.node_ttl_seconds.unwrap_or(3 * heartbeat)),
        lost_grace: Duration::from_secs(args.lost_grace_seconds),
        reserve_after: Duration::from_secs(args.reserve_after_seconds),
        secrets: Some(secrets.clone()),
        default_registry: args.default_registry.clone(),
        stop_grace_seconds: args.stop_grace_seconds,
        heartbeat_interval: Duration::from_secs(heartbeat),
        stop_wait: Duration::from_secs(u64::from(args.stop_grace_seconds) + 10),
        idempotency_ttl: Duration::from_secs(args.idempotency_ttl_hours.saturating_mul(3600)),
    };
    // Runners and runs hold environment values: seal them at rest, whatever the backend.
    let sealed = [keys::RUNNERS, keys::RUNS, keys::RUN_FILES];
    match &args.store {
        StoreChoice::Embedded => {
            let store_path = args.data_dir.join("state.redb");
            let store = EmbeddedStore::open(&store_path)
                .with_context(|| format!("opening the store at {}", store_path.display()))?;
            let store = SealedStore::new(store, secrets, &sealed);
            run(store, config, &args, store_path.display().to_string()).await
        }
        StoreChoice::Etcd(endpoints) => {
            let store = EtcdStore::connect(EtcdConfig::new(endpoints.clone()))
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
            let store = SealedStore::new(store, secrets, &sealed);
            run(store, config, &args, endpoints.join(",")).await
        }
    }
}

async fn run<S: Store>(
    store: S,
    config: Config,
    args: &Args,
    store_name: String,
) -> anyhow::Result<()> {
    let scheduler = Scheduler::open(store, config).await?;
    let listener = tokio::net::TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    tracing::info!(addr = %listener.local_addr()?, store = %store_name, "scheduler listening");
    let signal = berth_core::process::shutdown_signal().context("installing signal handlers")?;
    // Fail-stop: after a failed store write memory may be ahead of the store, so stop and let
    // a restart reload the truth.
    let store_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let (scheduler, store_failed) = (scheduler.clone(), store_failed.clone());
        async move {
            tokio::select! {
                _ = signal => {}
                _ = scheduler.store_failed() => {
                    store_failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    };
    match args.cluster_token.as_deref() {
        Some(token) => anyhow::ensure!(
            token.len() >= 16,
            "--cluster-token must be at least 16 characters"
        ),
        None if !listener.local_addr()?.ip().is_loopback() => tracing::warn!(
            addr = %listener.local_addr()?,
            "no --cluster-token: anyone who reaches this port can register as a node or act as the API"
        ),
        None => {}
    }
    let gate = berth_scheduler::ClusterGate::new(args.cluster_token.as_deref());
    berth_scheduler::serve(scheduler, listener, gate, shutdown).await?;
    anyhow::ensure!(
        !store_failed.load(std::sync::atomic::Ordering::SeqCst),
        "a store write failed; stopped so that a restart reloads the state from the store"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_store, StoreChoice};

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
}
