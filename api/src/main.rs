use anyhow::Context;
use berth_api::cli::Args;
use berth_api::{AppState, ServeLimits};
use berth_core::process::secret_setting;
use std::time::Duration;

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds"))
}

/// Raises the soft limit on open files to the hard one: the connection cap, not the process's
/// file descriptors, must be what refuses clients. Returns the soft limit now in force.
fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::private_files();
    let mut args = berth_core::config_file::parse::<Args>("api");
    let _telemetry = args.telemetry.init("berth-api")?;
    if let Some(ca) = &args.tls_ca {
        args.scheduler = args
            .scheduler
            .clone()
            .with_ca(berth_core::tls::read_pem(ca)?);
    }
    args.scheduler.check_transport()?;
    let token = secret_setting("BERTH_TOKEN", "--token-file", args.token_file.as_deref())?
        .context("the admin token is required: --token-file or BERTH_TOKEN")?;
    anyhow::ensure!(
        token.len() >= 16,
        "the admin token must be at least 16 characters"
    );
    let cluster_token = secret_setting(
        "BERTH_CLUSTER_TOKEN",
        "--cluster-token-file",
        args.cluster_token_file.as_deref(),
    )?;
    let cluster = berth_api::auth::ClusterToken::new(cluster_token.as_deref())
        .context("the cluster token must be visible ASCII")?;
    anyhow::ensure!(
        args.max_connections > 0 && args.max_streams_per_key > 0,
        "--max-connections and --max-streams-per-key must be positive"
    );
    let limits = ServeLimits {
        max_connections: args.max_connections,
        header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
        body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
        shutdown_grace: seconds("shutdown-grace", args.shutdown_grace)?,
    };
    if let Some(open_files) = raise_open_files_limit() {
        // Each connection is one descriptor; keep a margin for the scheduler channel and logs.
        let room = usize::try_from(open_files.saturating_sub(64)).unwrap_or(usize::MAX);
        if room < limits.max_connections {
            tracing::warn!(
                open_files,
                max_connections = limits.max_connections,
                "the open-files limit is below --max-connections: accept will fail before the cap"
            );
        }
    }
    // Lazy: the API starts (and answers 503) while no scheduler is up.
    let state = AppState::new(&args.scheduler, &token, cluster)
        .with_max_streams_per_key(args.max_streams_per_key);
    berth_core::metrics::serve(
        args.metrics_listen,
        None,
        berth_api::handlers::readiness(state.clone()),
    )
    .await?;
    berth_api::metrics::describe();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, scheduler = %args.scheduler, "api listening");
    let shutdown = berth_core::process::shutdown_signal().context("installing signal handlers")?;
    tracing::info!(
        ?limits,
        max_streams_per_key = args.max_streams_per_key,
        "api limits"
    );
    berth_api::serve_with(state, listener, limits, shutdown).await?;
    Ok(())
}
