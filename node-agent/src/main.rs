//! `berth-node-agent`: parses the CLI, connects to containerd and runs the agent until SIGTERM or
//! SIGINT; then it drains (no new runs; running ones may finish within `--shutdown-grace-seconds`)
//! and exits 0. A second SIGTERM or SIGINT exits at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use berth_core::failover::SchedulerAddrs;
use berth_node_agent::config::{AgentConfig, EphemeralRun, Secret};
use berth_node_agent::containerd::{ContainerdRuntime, ContainerdSettings};
use berth_node_agent::image::cache::{ImageCache, DEFAULT_IMAGE_CACHE_BYTES};
use berth_node_agent::image::pull::Puller;
use berth_node_agent::image::registry::RegistryClient;
use berth_node_agent::image::store::ContainerdImages;
use berth_node_agent::network::cni::{
    container_resolv_conf, validate_bridge, BindMountNamespaces, BridgeSettings, CniNetwork,
    ExecPlugins, RunNetwork, Subnet, DEFAULT_BRIDGE, DEFAULT_CNI_BIN_DIR, DEFAULT_IPAM_DIR,
    DEFAULT_NETNS_ROOT, DEFAULT_SUBNET,
};
use berth_node_agent::network::firewall::{isolate_bridge, ExecIptables, LOCK_FILE, PROC_SYS};
use berth_node_agent::network::warm::WarmNetworks;
use berth_node_agent::oci_runtimes::{GvisorOptions, SandboxNetwork, SandboxRuntime};
use berth_node_agent::run::logs::{
    LogLimits, DEFAULT_MAX_LOG_BYTES_PER_RUN, DEFAULT_MAX_LOG_LINES_PER_RUN,
};
use berth_node_agent::run::spec::DEFAULT_PIDS_LIMIT;
use berth_node_agent::scheduler_link::session::{Agent, OneShotEnd};
use clap::{Parser, ValueEnum};

/// How runs are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NetworkMode {
    /// Each run in its own network namespace on the host bridge: outbound connectivity,
    /// masqueraded; no access to the host's ports or to other runs.
    Bridge,
    /// Each run in its own empty network namespace: loopback only, no connectivity at all.
    None,
}

/// Runs containers through containerd for the Berth scheduler.
#[derive(Debug, Parser)]
#[command(name = "berth-node-agent", version)]
struct Cli {
    #[command(flatten)]
    telemetry: berth_core::telemetry::TelemetryArgs,
    /// The schedulers' gRPC addresses, comma-separated (`http://10.0.0.1:7070,http://10.0.0.2:7070`;
    /// one is fine): the agent registers with the one that answers (the leader) and moves to
    /// the next when it goes away.
    #[arg(
        long,
        env = "BERTH_AGENT_SCHEDULER",
        default_value = "http://127.0.0.1:7070"
    )]
    scheduler: SchedulerAddrs,
    /// The fleet's CA certificate (PEM): the agent verifies `https://` schedulers against it
    /// before sending its credential. Plaintext `http://` is accepted for loopback only.
    #[arg(long, env = "BERTH_AGENT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on `/metrics` of this address (plain HTTP, no auth: keep it
    /// on loopback or a private network). Off when not given.
    #[arg(long, env = "BERTH_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// File holding a registration token (an admin creates one per region: `berthctl admin
    /// nodes token create`), or set `BERTH_REGISTRATION_TOKEN`. Used once, when the node has no
    /// credential yet: the agent exchanges it for the node's own credential and keeps that in
    /// `--credential-file`.
    #[arg(long, env = "BERTH_AGENT_REGISTRATION_TOKEN_FILE")]
    registration_token_file: Option<PathBuf>,
    /// Where the node's credential is kept, 0600 (default: `<state dir>/node.credential`).
    #[arg(long, env = "BERTH_AGENT_CREDENTIAL_FILE")]
    credential_file: Option<PathBuf>,
    /// This node's ID.
    #[arg(long, env = "BERTH_AGENT_NODE_ID")]
    node_id: String,
    /// Region the node is in.
    #[arg(long, env = "BERTH_AGENT_REGION")]
    region: String,
    /// Memory offered to runs, in MiB (default: host total).
    #[arg(long, env = "BERTH_AGENT_MEMORY_MIB")]
    memory_mib: Option<u64>,
    /// CPUs offered to runs (default: host CPUs).
    #[arg(long, env = "BERTH_AGENT_CPUS")]
    cpus: Option<u32>,
    /// Maximum concurrent runs.
    #[arg(long, env = "BERTH_AGENT_MAX_RUNS", default_value_t = 8)]
    max_runs: u32,
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "BERTH_AGENT_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// containerd namespace (default: berth-<node-id>).
    #[arg(long, env = "BERTH_AGENT_NAMESPACE")]
    namespace: Option<String>,
    /// cgroup parent for runs (default: berth/<node-id>).
    #[arg(long, env = "BERTH_AGENT_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// State directory: per-run journals and output (default: /var/lib/berth/agent-<node-id>).
    #[arg(long, env = "BERTH_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Registry host:port reached over plain HTTP (repeatable; loopback always is).
    #[arg(
        long = "insecure-registry",
        env = "BERTH_AGENT_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Most MiB one run may write to its own filesystem (its writable layer, measured every 2 s);
    /// a run past it is killed with `disk_limit_exceeded`. 0: unbounded.
    #[arg(long, env = "BERTH_AGENT_MAX_RUN_DISK_MIB", default_value_t = 10 * 1024)]
    max_run_disk_mib: u64,
    /// MiB kept free on the filesystem of containerd's snapshots: below it the node takes no new
    /// runs (the scheduler places them elsewhere) until space is freed. 0: no reserve.
    #[arg(long, env = "BERTH_AGENT_MIN_FREE_DISK_MIB", default_value_t = 2 * 1024)]
    min_free_disk_mib: u64,
    /// Milliseconds for which what an image reference resolved to (digest, unpacked snapshot)
    /// is reused by the next runs of the same reference and credentials, without asking
    /// containerd or the registry again. A tag pushed anew reaches this node's runs at most this
    /// much later. 0: resolve on every run.
    #[arg(
        long,
        env = "BERTH_AGENT_IMAGE_RESOLVE_TTL_MS",
        default_value_t = 5_000
    )]
    image_resolve_ttl_ms: u64,
    /// Run networks kept attached ahead of the runs that take them (each used by one run, then
    /// destroyed), so a start does not wait for the CNI plugins. 0: each run attaches its own.
    #[arg(long, env = "BERTH_AGENT_WARM_NETWORKS", default_value_t = 2)]
    warm_networks: usize,
    /// Experimental: runs share containerd shims, this many per shim process (containerd's
    /// `io.containerd.runc.v2.group`), which saves ~3 MiB of host memory per run; a shim that
    /// dies then ends every run of its group. 0: a shim per run.
    #[arg(long, env = "BERTH_AGENT_SHIM_GROUP_SIZE", default_value_t = 0)]
    shim_group_size: usize,
    /// Most ready sandboxes the node keeps for warmed runners, all runners together (a warmup
    /// asks for them; each is a container created ahead for one run). 0: none.
    #[arg(long, env = "BERTH_AGENT_MAX_SANDBOXES", default_value_t = 16)]
    max_sandboxes: usize,
    /// An unused ready sandbox is replaced by a fresh one after this many seconds.
    #[arg(long, env = "BERTH_AGENT_SANDBOX_MAX_IDLE_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    sandbox_max_idle_seconds: u64,
    /// Most processes (threads included) one run may have (the pids cgroup's pids.max).
    #[arg(long, env = "BERTH_AGENT_PIDS_LIMIT", default_value_t = DEFAULT_PIDS_LIMIT,
          value_parser = clap::value_parser!(i64).range(1..))]
    pids_limit: i64,
    /// Most bytes of log lines kept per run (each line counts its text plus one byte); later
    /// output is dropped after one marker line on stderr.
    #[arg(long, env = "BERTH_AGENT_MAX_LOG_BYTES_PER_RUN", default_value_t = DEFAULT_MAX_LOG_BYTES_PER_RUN,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_log_bytes_per_run: u64,
    /// Most log lines kept per run; later output is dropped after one marker line on stderr.
    #[arg(long, env = "BERTH_AGENT_MAX_LOG_LINES_PER_RUN", default_value_t = DEFAULT_MAX_LOG_LINES_PER_RUN,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_log_lines_per_run: u64,
    /// After SIGTERM, seconds to wait for running runs to end and be reported before exiting
    /// (runs still going are re-adopted by the next start).
    #[arg(long, env = "BERTH_AGENT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Run networking: `bridge` (own namespace on the host bridge, outbound only) or `none`
    /// (own empty namespace).
    #[arg(long, env = "BERTH_AGENT_NETWORK", value_enum, default_value_t = NetworkMode::Bridge)]
    network: NetworkMode,
    /// The host bridge runs are connected to (created if missing; agents of a host share it).
    #[arg(long, env = "BERTH_AGENT_BRIDGE", default_value = DEFAULT_BRIDGE)]
    bridge: String,
    /// The bridge's IPv4 subnet; its first address is the runs' gateway. Every agent on the
    /// same bridge must use the same subnet.
    #[arg(long, env = "BERTH_AGENT_SUBNET", default_value = DEFAULT_SUBNET)]
    subnet: Subnet,
    /// Directory of the CNI plugin binaries (bridge, host-local, loopback).
    #[arg(long, env = "BERTH_AGENT_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    cni_bin_dir: PathBuf,
    /// host-local's address store, shared by the agents of a host.
    #[arg(long, env = "BERTH_AGENT_CNI_IPAM_DIR", default_value = DEFAULT_IPAM_DIR)]
    cni_ipam_dir: PathBuf,
    /// Where the runs' network namespaces are kept (default: /run/berth/netns/<node-id>).
    #[arg(long, env = "BERTH_AGENT_NETNS_DIR")]
    netns_dir: Option<PathBuf>,
    /// Disk budget of the image cache, in bytes: stored blobs plus unpacked layer snapshots,
    /// shared pieces counted once. Beyond it the least recently used images that no run uses
    /// and no warmup pinned are deleted.
    #[arg(long, env = "BERTH_AGENT_IMAGE_CACHE_BYTES", default_value_t = DEFAULT_IMAGE_CACHE_BYTES)]
    image_cache_bytes: u64,
    /// One-shot mode (what `berthctl run --here` starts): the node exists for this ephemeral
    /// run only. It registers with the run's claim (`--ephemeral-claim-file`, or
    /// `BERTH_EPHEMERAL_CLAIM`), takes that run and no other, and exits once the run has ended
    /// and every report is acknowledged (0), or when the scheduler refuses it (1). `--node-id`
    /// must be the run's `ephemeral.node_id`.
    #[arg(long, env = "BERTH_AGENT_EPHEMERAL_RUN_ID")]
    ephemeral_run_id: Option<String>,
    /// gVisor for sandboxed runs (`isolation: sandbox`): `auto` uses `runsc` from PATH when it
    /// is there and runs a sandbox at start, `off` takes no sandboxed runs, an absolute path
    /// names the runsc binary (which must work, or the agent does not start).
    #[arg(long, env = "BERTH_AGENT_SANDBOX_RUNTIME", default_value = "auto")]
    sandbox_runtime: SandboxRuntime,
    /// gVisor's platform: `ptrace` (works everywhere, slower syscalls) or `kvm` (needs
    /// /dev/kvm).
    #[arg(long, env = "BERTH_AGENT_SANDBOX_PLATFORM", default_value = "ptrace")]
    sandbox_platform: String,
    /// File holding the ephemeral run's claim (from the answer that created the run).
    #[arg(
        long,
        env = "BERTH_AGENT_EPHEMERAL_CLAIM_FILE",
        requires = "ephemeral_run_id"
    )]
    ephemeral_claim_file: Option<PathBuf>,
}

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_core::process::private_files();
    let mut cli = Cli::parse();
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
    if let Ok(OneShotEnd::Refused(why)) = end_rx.await {
        anyhow::bail!("the scheduler refused this one-shot node: {why}");
    }
    Ok(())
}
