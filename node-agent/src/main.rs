//! `berth-node-agent`: parses the CLI, connects to containerd and runs the agent until SIGTERM or
//! SIGINT; then it drains (no new runs; running ones may finish within `--shutdown-grace-seconds`)
//! and exits 0. A second SIGTERM or SIGINT exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use berth_node_agent::cli::{Cli, NetworkMode};
use berth_node_agent::config::{AgentConfig, EphemeralRun, Secret};
use berth_node_agent::containerd::{ContainerdRuntime, ContainerdSettings};
use berth_node_agent::image::cache::ImageCache;
use berth_node_agent::image::pull::Puller;
use berth_node_agent::image::registry::RegistryClient;
use berth_node_agent::image::store::ContainerdImages;
use berth_node_agent::network::cni::{
    container_resolv_conf, validate_bridge, BindMountNamespaces, BridgeSettings, CniNetwork,
    ExecPlugins, RunNetwork, DEFAULT_NETNS_ROOT,
};
use berth_node_agent::network::firewall::{isolate_bridge, ExecIptables, LOCK_FILE, PROC_SYS};
use berth_node_agent::network::warm::WarmNetworks;
use berth_node_agent::oci_runtimes::{GvisorOptions, SandboxNetwork};
use berth_node_agent::run::logs::LogLimits;
use berth_node_agent::scheduler_link::session::{Agent, OneShotEnd};

/// Writes the runs' resolv.conf (the host's non-loopback nameservers) and returns its path;
/// None when the host has none a run could use.
fn write_resolv_conf(state_dir: &std::path::Path) -> Option<PathBuf> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let Some(content) = container_resolv_conf(&host) else {
        tracing::warn!("the host's resolv.conf has no nameserver runs can reach: runs get no DNS configuration");
        return None;
    };
    let path = state_dir.join("resolv.conf");
    let tmp = state_dir.join("resolv.conf.new");
    let written = std::fs::write(&tmp, content).and_then(|()| std::fs::rename(&tmp, &path));
    match written {
        Ok(()) => Some(path),
        Err(error) => {
            tracing::warn!(%error, "cannot write the runs' resolv.conf: runs get no DNS configuration");
            None
        }
    }
}

/// Sets up run networking for `--network bridge`: the host firewall, then the CNI network.
fn bridge_network(cli: &Cli, state_dir: &std::path::Path) -> anyhow::Result<Arc<dyn RunNetwork>> {
    validate_bridge(&cli.bridge)?;
    isolate_bridge(
        &ExecIptables,
        std::path::Path::new(PROC_SYS),
        std::path::Path::new(LOCK_FILE),
        &cli.bridge,
    )
    .context("installing the host isolation rules (iptables)")?;
    for plugin in ["bridge", "host-local", "loopback"] {
        let path = cli.cni_bin_dir.join(plugin);
        anyhow::ensure!(
            path.exists(),
            "CNI plugin {} is missing (package containernetworking-plugins)",
            path.display()
        );
    }
    let settings = BridgeSettings {
        bridge: cli.bridge.clone(),
        subnet: cli.subnet,
        cni_bin_dir: cli.cni_bin_dir.clone(),
        netns_dir: cli
            .netns_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_NETNS_ROOT).join(&cli.node_id)),
        ipam_dir: cli.cni_ipam_dir.clone(),
        resolv_conf: write_resolv_conf(state_dir),
    };
    tracing::info!(
        ?settings,
        "runs get their own network namespace on the bridge"
    );
    let network: Arc<dyn RunNetwork> = Arc::new(CniNetwork::new(
        settings,
        ExecPlugins {
            bin_dir: cli.cni_bin_dir.clone(),
        },
        BindMountNamespaces,
    ));
    Ok(Arc::new(WarmNetworks::new(
        network,
        state_dir.join("network-slots"),
        cli.warm_networks,
    )))
}

/// The node's credential: from its file, else by enrolling with the registration token (and
/// then kept in the file); none when neither exists (a scheduler without a cluster token).
async fn node_credential(cli: &Cli, state_dir: &std::path::Path) -> anyhow::Result<Option<String>> {
    use berth_node_agent::scheduler_link::enroll;
    let path = cli
        .credential_file
        .clone()
        .unwrap_or_else(|| state_dir.join("node.credential"));
    if let Some(credential) = enroll::read_credential(&path)? {
        tracing::info!(path = %path.display(), "using the node credential");
        return Ok(Some(credential));
    }
    let token = berth_core::process::secret_setting(
        "BERTH_REGISTRATION_TOKEN",
        "--registration-token-file",
        cli.registration_token_file.as_deref(),
    )?;
    let Some(token) = token else {
        tracing::warn!("no node credential and no registration token: registering unauthenticated (only a scheduler without a cluster token accepts that)");
        return Ok(None);
    };
    let credential = enroll::enroll(&cli.scheduler, &token, &cli.node_id, &cli.region).await?;
    enroll::write_credential(&path, &credential)?;
    tracing::info!(path = %path.display(), "node credential stored; the registration token is no longer needed");
    Ok(Some(credential))
}

fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

mod membership;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::private_files();
    // `join` and `leave` are commands for the operator, not the daemon: own flags, no config.
    let mut argv = std::env::args_os();
    match argv.nth(1).as_deref().and_then(|a| a.to_str()) {
        Some("join") => {
            let _ = tracing_subscriber_for_commands();
            return membership::join(clap::Parser::parse_from(std::env::args_os().skip(1))).await;
        }
        Some("leave") => {
            let _ = tracing_subscriber_for_commands();
            return membership::leave(clap::Parser::parse_from(std::env::args_os().skip(1))).await;
        }
        _ => {}
    }
    let mut cli = berth_core::config_file::parse::<Cli>("node-agent");
    let _telemetry = cli.telemetry.init("berth-node-agent")?;
    if let Some(ca) = &cli.tls_ca {
        cli.scheduler = cli
            .scheduler
            .clone()
            .with_ca(berth_core::tls::read_pem(ca)?);
    }
    cli.scheduler.check_transport()?;
    let network_mode = cli.network;
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/berth/agent-{}", cli.node_id)));
    std::fs::create_dir_all(state_dir.join("runs"))
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    // Run journals hold secret values and output: this agent's only (a directory an older
    // build created 0755 is closed too).
    std::fs::set_permissions(
        &state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("making state dir {} private", state_dir.display()))?;
    // For `leave` on a machine without systemd (a unit's MainPID is systemd's own).
    let pid_file = membership::write_pid_file(&state_dir)
        .with_context(|| format!("writing the process ID file in {}", state_dir.display()))?;
    // Runs are confined by cgroups: a host without a layout the agent knows cannot take any.
    let cgroups = berth_node_agent::run::cgroup::Cgroups::detect(std::path::Path::new(
        berth_node_agent::run::cgroup::CGROUP_ROOT,
    ))?;
    tracing::info!(layout = ?cgroups.layout(), "cgroups");
    let credential = node_credential(&cli, &state_dir).await?;
    let network = match network_mode {
        NetworkMode::Bridge => Some(bridge_network(&cli, &state_dir)?),
        NetworkMode::None => {
            tracing::warn!(
                "--network none: runs get an empty network namespace without connectivity"
            );
            None
        }
    };
    let runtimes = berth_node_agent::oci_runtimes::detect(
        &cli.sandbox_runtime,
        &GvisorOptions {
            platform: cli.sandbox_platform.clone(),
            network: match network_mode {
                NetworkMode::Bridge => SandboxNetwork::Namespace,
                NetworkMode::None => SandboxNetwork::None,
            },
            mask_proc_sys_net: false,
        },
        &state_dir,
    )
    .await?;
    let image_cache_bytes = cli.image_cache_bytes;
    let ephemeral = match cli.ephemeral_run_id.clone() {
        None => None,
        Some(run_id) => {
            let claim = berth_core::process::secret_setting(
                "BERTH_EPHEMERAL_CLAIM",
                "--ephemeral-claim-file",
                cli.ephemeral_claim_file.as_deref(),
            )?
            .context("--ephemeral-run-id needs the run's claim: --ephemeral-claim-file or BERTH_EPHEMERAL_CLAIM")?;
            // One run, nothing kept ready for others.
            cli.max_runs = 1;
            cli.max_sandboxes = 0;
            Some(EphemeralRun {
                run_id,
                claim: Secret(claim),
            })
        }
    };
    let config = AgentConfig {
        ephemeral,
        runtimes,
        schedulers: cli.scheduler,
        total_memory_mib: cli
            .memory_mib
            .or_else(host_memory_mib)
            .context("cannot read host memory; pass --memory-mib")?,
        cpus: cli.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        }),
        max_runs: cli.max_runs,
        containerd_socket: cli.containerd_socket,
        namespace: cli
            .namespace
            .unwrap_or_else(|| format!("berth-{}", cli.node_id)),
        cgroup_parent: cli
            .cgroup_parent
            .unwrap_or_else(|| format!("berth/{}", cli.node_id))
            .trim_matches('/')
            .to_string(),
        state_dir,
        insecure_registries: cli.insecure_registries,
        pids_limit: cli.pids_limit,
        log_limits: LogLimits {
            max_bytes: cli.max_log_bytes_per_run,
            max_lines: cli.max_log_lines_per_run,
        },
        shutdown_grace: Duration::from_secs(cli.shutdown_grace_seconds),
        credential: credential.map(Secret),
        max_run_disk_bytes: (cli.max_run_disk_mib > 0)
            .then(|| cli.max_run_disk_mib.saturating_mul(1 << 20)),
        max_sandboxes: cli.max_sandboxes,
        sandbox_max_idle: Duration::from_secs(cli.sandbox_max_idle_seconds),
        node_id: cli.node_id,
        region: cli.region,
    };
    tracing::info!(?config, image_cache_bytes, "starting node agent");

    let channel = containerd_client::connect(&config.containerd_socket)
        .await
        .with_context(|| {
            format!(
                "connecting to containerd at {}",
                config.containerd_socket.display()
            )
        })?;
    let registry = RegistryClient::new(config.insecure_registries.clone());
    let puller = Arc::new(
        Puller::new(channel.clone(), config.namespace.clone(), registry)
            .with_resolve_ttl(std::time::Duration::from_millis(cli.image_resolve_ttl_ms)),
    );
    let recalled = puller.recall_cached().await;
    tracing::info!(images = recalled, "images already on this node");
    let image_cache = Arc::new(ImageCache::new(
        Arc::new(ContainerdImages::new(puller.clone())),
        image_cache_bytes,
    ));
    tokio::spawn(image_cache.clone().run());
    let runtime = Arc::new(
        ContainerdRuntime::new(
            channel,
            ContainerdSettings {
                namespace: config.namespace.clone(),
                cgroup_parent: config.cgroup_parent.clone(),
                cgroups,
                min_free_disk_bytes: cli.min_free_disk_mib.saturating_mul(1 << 20),
                sandbox_binary: config.runtimes.gvisor.as_ref().map(|g| g.binary.clone()),
                shim_groups: (cli.shim_group_size > 0).then(|| {
                    std::sync::Arc::new(berth_node_agent::shim_groups::ShimGroups::new(
                        cli.shim_group_size,
                        &format!("berth-{}", config.node_id),
                    ))
                }),
            },
            puller,
            network,
        )
        .with_image_cache(image_cache),
    );
    runtime.spawn_health_probe();
    runtime.spawn_oom_watch();
    // Install the handlers now, not on first poll, so an early SIGTERM is not fatal.
    let first_signal =
        berth_core::process::shutdown_signal().context("installing signal handlers")?;
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        first_signal.await;
        let _ = signalled_tx.send(());
    };
    let second_signal = async move {
        if signalled_rx.await.is_err() {
            return std::future::pending().await;
        }
        match berth_core::process::shutdown_signal() {
            Ok(signal) => signal.await,
            Err(error) => {
                tracing::warn!(%error, "cannot watch for a second signal");
                std::future::pending().await
            }
        }
    };
    let agent = Agent::new(config, runtime);
    // A one-shot node shuts down by itself once done (or refused), like on SIGTERM.
    let one_shot = agent.one_shot_end();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<OneShotEnd>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            end = one_shot => {
                let _ = end_tx.send(end);
            }
        }
    };
    berth_core::metrics::serve(
        cli.metrics_listen,
        Some(agent.container_metrics()),
        agent.readiness(),
    )
    .await?;
    berth_node_agent::metrics::describe();
    tokio::select! {
        _ = agent.run(shutdown) => {}
        _ = second_signal => {
            tracing::warn!("second signal: exiting without waiting for runs; the next start re-adopts them");
        }
    }
    let _ = std::fs::remove_file(&pid_file);
    if let Ok(OneShotEnd::Refused(why)) = end_rx.await {
        anyhow::bail!("the scheduler refused this one-shot node: {why}");
    }
    Ok(())
}

/// Warnings of `join`/`leave` (failed attempts, retries) to stderr, without the daemon's
/// telemetry setup.
fn tracing_subscriber_for_commands() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init()
}
