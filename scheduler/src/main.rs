use anyhow::Context;
use berth_core::keys;
use berth_core::secrets::SecretKey;
use berth_core::store::{
    Election, ElectionConfig, EmbeddedStore, EtcdConfig, EtcdStore, Leadership, LeaseState,
    SealedStore, Store,
};
use berth_core::Catalog;
use berth_scheduler::cli::{Args, StoreChoice};
use berth_scheduler::engine::{Config, Scheduler};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// mimalloc instead of the system allocator: every run the scheduler handles allocates its
/// record, its encodings and its messages several times over, and glibc's malloc/free were a
/// tenth of the scheduler's CPU under load (docs/BENCHMARKS.md, "A faster allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::private_files();
    let mut args = berth_core::config_file::parse::<Args>("scheduler");
    let _telemetry = args.telemetry.init("berth-scheduler")?;
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
        log_retention: (args.log_retention_hours > 0)
            .then(|| Duration::from_secs(args.log_retention_hours.saturating_mul(3600))),
        secrets: Some(secrets.clone()),
        default_registry: args.default_registry.clone(),
        stop_grace_seconds: args.stop_grace_seconds,
        heartbeat_interval: Duration::from_secs(heartbeat),
        stop_wait: Duration::from_secs(u64::from(args.stop_grace_seconds) + 10),
        idempotency_ttl: Duration::from_secs(args.idempotency_ttl_hours.saturating_mul(3600)),
        ephemeral_connect_timeout: Duration::from_secs(args.ephemeral_connect_timeout_seconds),
        webhook_allow_private_networks: args.webhook_allow_private_networks,
        webhook_allowed_hosts: args.webhook_allowed_hosts.clone(),
    };
    // Checked once, before any term: a bad flag must stop the process, not be retried.
    args.cluster_token = berth_core::process::secret_setting(
        "BERTH_CLUSTER_TOKEN",
        "--cluster-token-file",
        args.cluster_token_file.as_deref(),
    )?;
    if let Some(token) = args.cluster_token.as_deref() {
        anyhow::ensure!(
            token.len() >= 16,
            "the cluster token must be at least 16 characters"
        );
    }
    // The transport too: a scheduler that may not listen as asked must not campaign first.
    if let Ok(listen) = args.grpc_listen.parse::<std::net::SocketAddr>() {
        berth_core::tls::server_choice(&listen, args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    }
    berth_core::metrics::serve(
        args.metrics_listen,
        None,
        berth_scheduler::metrics::readiness(),
    )
    .await?;
    berth_scheduler::metrics::describe();
    let stop = signal_watch()?;
    match &args.store {
        StoreChoice::Embedded => {
            let store_path = args.data_dir.join("state.redb");
            let store = EmbeddedStore::open(&store_path)
                .with_context(|| format!("opening the store at {}", store_path.display()))?;
            let store = SealedStore::new(store, secrets, &SEALED);
            let name = store_path.display().to_string();
            match run(store, config, &args, name, signalled(stop), None).await? {
                Stop::Signal => Ok(()),
                Stop::StoreFailed | Stop::LostLeadership => anyhow::bail!(
                    "a store write failed; stopped so that a restart reloads the state from the store"
                ),
            }
        }
        StoreChoice::Etcd(endpoints) => {
            let mut backoff = MIN_REJOIN_BACKOFF;
            loop {
                if *stop.borrow() {
                    return Ok(());
                }
                match term(&args, &config, &secrets, endpoints, stop.clone()).await {
                    Ok(Stop::Signal) => return Ok(()),
                    Ok(why) => {
                        tracing::warn!(?why, "leadership ended; rejoining as a standby");
                        backoff = MIN_REJOIN_BACKOFF;
                    }
                    Err(e) => {
                        tracing::error!(
                            error = format!("{e:#}"),
                            retry_in_ms = backoff.as_millis() as u64,
                            "could not campaign or lead; trying again"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = signalled(stop.clone()) => return Ok(()),
                        }
                        backoff = (backoff * 2).min(MAX_REJOIN_BACKOFF);
                    }
                }
            }
        }
    }
}

/// Runners, runs and schedules hold environment values: sealed at rest, whatever the backend.
const SEALED: [&str; 5] = [
    keys::RUNNERS,
    keys::RUNS,
    keys::RUN_FILES,
    keys::SCHEDULES,
    keys::WEBHOOKS,
];
const MIN_REJOIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_REJOIN_BACKOFF: Duration = Duration::from_secs(5);

/// SIGTERM/SIGINT as a flag every term can wait on.
fn signal_watch() -> anyhow::Result<watch::Receiver<bool>> {
    let signal = berth_core::process::shutdown_signal().context("installing signal handlers")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        tx.send_replace(true);
    });
    Ok(rx)
}

async fn signalled(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One term on etcd: campaign as a standby (neither listening nor holding state: agents and
/// API replicas find the leader as the one scheduler address that accepts connections), then
/// lead until a signal, a failed write or the end of the lease. Each term has its own store
/// client, so its fence, writer and sequence are new, and nothing left of an earlier term can
/// write under this one's fence.
async fn term(
    args: &Args,
    config: &Config,
    secrets: &Arc<SecretKey>,
    endpoints: &[String],
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Stop> {
    let etcd = EtcdConfig {
        max_txn_ops: usize::try_from(args.etcd_max_txn_ops).unwrap_or(128),
        ..EtcdConfig::new(endpoints.to_vec())
    };
    let store = EtcdStore::connect(etcd)
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
    let election = Election::start(
        &store,
        ElectionConfig {
            name: LEADER_ELECTION.to_owned(),
            value: args.grpc_listen.clone(),
            ttl: Duration::from_secs(args.leader_lease_seconds.max(2)),
        },
    )
    .await
    .context("joining the leader election")?;
    tracing::info!(addr = %args.grpc_listen, "standby: campaigning for leadership");
    let won = tokio::select! {
        won = election.campaign() => won,
        () = signalled(stop.clone()) => {
            election.withdraw().await;
            return Ok(Stop::Signal);
        }
    };
    let leadership = match won {
        Ok(l) => l,
        Err(e) => {
            election.withdraw().await;
            return Err(e).context("campaigning for leadership");
        }
    };
    store.set_fence(leadership.fence());
    tracing::info!(addr = %args.grpc_listen, "elected leader; loading the active state");
    let store = SealedStore::new(store, secrets.clone(), &SEALED);
    let result = run(
        store,
        config.clone(),
        args,
        endpoints.join(","),
        signalled(stop),
        Some(leadership),
    )
    .await;
    // Revoking the lease deletes the leader key too, if it is still there.
    election.withdraw().await;
    result
}

/// The election every scheduler on one etcd keyspace campaigns in (under the store prefix).
const LEADER_ELECTION: &str = "leader";

/// Why serving stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Signal,
    StoreFailed,
    LostLeadership,
}

async fn run<S: Store>(
    store: S,
    config: Config,
    args: &Args,
    store_name: String,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    leadership: Option<Leadership>,
) -> anyhow::Result<Stop> {
    let scheduler = Scheduler::open(store, config).await?;
    let listener = tokio::net::TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    tracing::info!(addr = %listener.local_addr()?, store = %store_name, "scheduler listening");
    let _serving = berth_scheduler::metrics::serving(scheduler.clone());
    // Fail-stop: after a failed store write memory may be ahead of the store, so stop and let
    // a restart reload the truth. Losing leadership stops the same way: every later write
    // would be refused by the fence anyway.
    let lease_state = leadership.as_ref().map(Leadership::state);
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<Stop>();
    let shutdown = {
        let scheduler = scheduler.clone();
        async move {
            let lost = async {
                match &leadership {
                    Some(l) => l.lost().await,
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                () = signal => Stop::Signal,
                () = scheduler.store_failed() => Stop::StoreFailed,
                () = lost => Stop::LostLeadership,
            };
            // Hand over before draining: a standby starts loading while calls in flight
            // finish (their writes are refused from now on; clients retry on the new leader).
            if let (Stop::Signal, Some(l)) = (why, &leadership) {
                l.resign().await;
            }
            let _ = stopped_tx.send(why);
        }
    };
    let tls = berth_core::tls::server_choice(
        &listener.local_addr()?,
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    tracing::info!(tls = tls.is_some(), "transport");
    if args.cluster_token.is_none() && !listener.local_addr()?.ip().is_loopback() {
        tracing::warn!(
            addr = %listener.local_addr()?,
            "no cluster token: anyone who reaches this port can register as a node or act as the API"
        );
    }
    let gate = berth_scheduler::ClusterGate::new(args.cluster_token.as_deref());
    // A leader that cannot confirm its lease serves nothing new until it can again.
    let pausing = lease_state.map(|mut state| {
        let gate = gate.clone();
        tokio::spawn(async move {
            loop {
                gate.set_paused(*state.borrow_and_update() != LeaseState::Confirmed);
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
    });
    berth_scheduler::serve_tls(scheduler, listener, gate, tls, shutdown).await?;
    if let Some(task) = pausing {
        task.abort();
    }
    Ok(stopped_rx.await.unwrap_or(Stop::Signal))
}
