use anyhow::Context;
use berth_api::AppState;
use clap::Parser;

/// Berth's public REST API.
#[derive(Parser, Debug)]
#[command(name = "berth-api", version)]
struct Args {
    #[arg(long, env = "BERTH_API_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// The scheduler's gRPC address.
    #[arg(
        long,
        env = "BERTH_SCHEDULER_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    scheduler: String,
    /// The admin token: manages nodes and API keys (`/v1/admin/api_keys`), and acts in project
    /// `default`. Everyone else sends a project's API key.
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    token: String,
    /// The scheduler's cluster token (its `--cluster-token`), sent on every call to it.
    #[arg(long, env = "BERTH_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::init_tracing();
    let args = Args::parse();
    anyhow::ensure!(
        args.token.len() >= 16,
        "--token must be at least 16 characters"
    );
    // Lazy: the API starts (and answers 503) while the scheduler is down or restarting.
    let channel = tonic::transport::Endpoint::from_shared(args.scheduler.clone())
        .with_context(|| format!("bad scheduler address {}", args.scheduler))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy();
    let cluster = berth_api::auth::ClusterToken::new(args.cluster_token.as_deref())
        .context("--cluster-token must be visible ASCII")?;
    let state = AppState::new(channel, &args.token, cluster);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, scheduler = %args.scheduler, "api listening");
    let shutdown = berth_core::process::shutdown_signal().context("installing signal handlers")?;
    berth_api::serve(state, listener, shutdown).await?;
    Ok(())
}
