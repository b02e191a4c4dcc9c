//! The agent's settings: its command line, environment variables and
//! `/etc/berth/node-agent.toml` (read by [`berth_core::config_file`]; reference: docs/CONFIG.md).

use berth_core::failover::SchedulerAddrs;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;

use crate::image::cache::DEFAULT_IMAGE_CACHE_BYTES;
use crate::network::cni::{
    Subnet, DEFAULT_BRIDGE, DEFAULT_CNI_BIN_DIR, DEFAULT_IPAM_DIR, DEFAULT_SUBNET,
};
use crate::oci_runtimes::SandboxRuntime;
use crate::run::logs::{DEFAULT_MAX_LOG_BYTES_PER_RUN, DEFAULT_MAX_LOG_LINES_PER_RUN};
use crate::run::spec::DEFAULT_PIDS_LIMIT;

/// How runs are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    /// Each run in its own network namespace on the host bridge: outbound connectivity,
    /// masqueraded; no access to the host's ports or to other runs.
    Bridge,
    /// Each run in its own empty network namespace: loopback only, no connectivity at all.
    None,
}

/// Runs containers through containerd for the Berth scheduler.
#[derive(Debug, Parser)]
#[command(
    name = "berth-node-agent",
    version,
    after_help = "Joining and leaving a fleet (see README, \"Running on real machines\"):\n  \
                  berth-node-agent join --url URL --token-file FILE --region REGION [--help]\n  \
                  berth-node-agent leave [--help]"
)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: berth_core::telemetry::TelemetryArgs,
    /// The schedulers' gRPC addresses, comma-separated (`http://10.0.0.1:7070,http://10.0.0.2:7070`;
    /// one is fine): the agent registers with the one that answers (the leader) and moves to
    /// the next when it goes away.
    #[arg(
        long,
        env = "BERTH_AGENT_SCHEDULER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub scheduler: SchedulerAddrs,
    /// The fleet's CA certificate (PEM): the agent verifies `https://` schedulers against it
    /// before sending its credential. Plaintext `http://` is accepted for loopback only.
    #[arg(long, env = "BERTH_AGENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on `/metrics` of this address (plain HTTP, no auth: keep it
    /// on loopback or a private network). Off when not given.
    #[arg(long, env = "BERTH_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// File holding a registration token (an admin creates one per region: `berthctl admin
    /// nodes token create`), or set `BERTH_REGISTRATION_TOKEN`. Used once, when the node has no
    /// credential yet: the agent exchanges it for the node's own credential and keeps that in
    /// `--credential-file`.
    #[arg(long, env = "BERTH_AGENT_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<PathBuf>,
    /// Where the node's credential is kept, 0600 (default: `<state dir>/node.credential`).
    #[arg(long, env = "BERTH_AGENT_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
    /// This node's ID.
    #[arg(long, env = "BERTH_AGENT_NODE_ID")]
    pub node_id: String,
    /// Region the node is in.
    #[arg(long, env = "BERTH_AGENT_REGION")]
    pub region: String,
    /// Memory offered to runs, in MiB (default: host total).
    #[arg(long, env = "BERTH_AGENT_MEMORY_MIB")]
    pub memory_mib: Option<u64>,
    /// CPUs offered to runs (default: host CPUs).
    #[arg(long, env = "BERTH_AGENT_CPUS")]
    pub cpus: Option<u32>,
    /// Maximum concurrent runs.
    #[arg(long, env = "BERTH_AGENT_MAX_RUNS", default_value_t = 8)]
    pub max_runs: u32,
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "BERTH_AGENT_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    /// containerd namespace (default: berth-<node-id>).
    #[arg(long, env = "BERTH_AGENT_NAMESPACE")]
    pub namespace: Option<String>,
    /// cgroup parent for runs (default: berth/<node-id>).
    #[arg(long, env = "BERTH_AGENT_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// State directory: per-run journals and output (default: /var/lib/berth/agent-<node-id>).
    #[arg(long, env = "BERTH_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Registry host:port reached over plain HTTP (repeatable; loopback always is).
    #[arg(
        long = "insecure-registry",
        env = "BERTH_AGENT_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Most MiB one run may write to its own filesystem (its writable layer, measured every 2 s);
    /// a run past it is killed with `disk_limit_exceeded`. 0: unbounded.
    #[arg(long, env = "BERTH_AGENT_MAX_RUN_DISK_MIB", default_value_t = 10 * 1024)]
    pub max_run_disk_mib: u64,
    /// MiB kept free on the filesystem of containerd's snapshots: below it the node takes no new
    /// runs (the scheduler places them elsewhere) until space is freed. 0: no reserve.
    #[arg(long, env = "BERTH_AGENT_MIN_FREE_DISK_MIB", default_value_t = 2 * 1024)]
    pub min_free_disk_mib: u64,
    /// Milliseconds for which what an image reference resolved to (digest, unpacked snapshot)
    /// is reused by the next runs of the same reference and credentials, without asking
    /// containerd or the registry again. A tag pushed anew reaches this node's runs at most this
    /// much later. 0: resolve on every run.
    #[arg(
        long,
        env = "BERTH_AGENT_IMAGE_RESOLVE_TTL_MS",
        default_value_t = 5_000
    )]
    pub image_resolve_ttl_ms: u64,
    /// Run networks kept attached ahead of the runs that take them (each used by one run, then
    /// destroyed), so a start does not wait for the CNI plugins. 0: each run attaches its own.
    #[arg(long, env = "BERTH_AGENT_WARM_NETWORKS", default_value_t = 2)]
    pub warm_networks: usize,
    /// Experimental: runs share containerd shims, this many per shim process (containerd's
    /// `io.containerd.runc.v2.group`), which saves ~3 MiB of host memory per run; a shim that
    /// dies then ends every run of its group. 0: a shim per run.
    #[arg(long, env = "BERTH_AGENT_SHIM_GROUP_SIZE", default_value_t = 0)]
    pub shim_group_size: usize,
    /// Most ready sandboxes the node keeps for warmed runners, all runners together (a warmup
    /// asks for them; each is a container created ahead for one run). 0: none.
    #[arg(long, env = "BERTH_AGENT_MAX_SANDBOXES", default_value_t = 16)]
    pub max_sandboxes: usize,
    /// An unused ready sandbox is replaced by a fresh one after this many seconds.
    #[arg(long, env = "BERTH_AGENT_SANDBOX_MAX_IDLE_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sandbox_max_idle_seconds: u64,
    /// Most processes (threads included) one run may have (the pids cgroup's pids.max).
    #[arg(long, env = "BERTH_AGENT_PIDS_LIMIT", default_value_t = DEFAULT_PIDS_LIMIT,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub pids_limit: i64,
    /// Most bytes of log lines kept per run (each line counts its text plus one byte); later
    /// output is dropped after one marker line on stderr.
    #[arg(long, env = "BERTH_AGENT_MAX_LOG_BYTES_PER_RUN", default_value_t = DEFAULT_MAX_LOG_BYTES_PER_RUN,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_log_bytes_per_run: u64,
    /// Most log lines kept per run; later output is dropped after one marker line on stderr.
    #[arg(long, env = "BERTH_AGENT_MAX_LOG_LINES_PER_RUN", default_value_t = DEFAULT_MAX_LOG_LINES_PER_RUN,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_log_lines_per_run: u64,
    /// After SIGTERM, seconds to wait for running runs to end and be reported before exiting
    /// (runs still going are re-adopted by the next start).
    #[arg(long, env = "BERTH_AGENT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Run networking: `bridge` (own namespace on the host bridge, outbound only) or `none`
    /// (own empty namespace).
    #[arg(long, env = "BERTH_AGENT_NETWORK", value_enum, default_value_t = NetworkMode::Bridge)]
    pub network: NetworkMode,
    /// The host bridge runs are connected to (created if missing; agents of a host share it).
    #[arg(long, env = "BERTH_AGENT_BRIDGE", default_value = DEFAULT_BRIDGE)]
    pub bridge: String,
    /// The bridge's IPv4 subnet; its first address is the runs' gateway. Every agent on the
    /// same bridge must use the same subnet.
    #[arg(long, env = "BERTH_AGENT_SUBNET", default_value = DEFAULT_SUBNET)]
    pub subnet: Subnet,
    /// Directory of the CNI plugin binaries (bridge, host-local, loopback).
    #[arg(long, env = "BERTH_AGENT_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// host-local's address store, shared by the agents of a host.
    #[arg(long, env = "BERTH_AGENT_CNI_IPAM_DIR", default_value = DEFAULT_IPAM_DIR)]
    pub cni_ipam_dir: PathBuf,
    /// Where the runs' network namespaces are kept (default: /run/berth/netns/<node-id>).
    #[arg(long, env = "BERTH_AGENT_NETNS_DIR")]
    pub netns_dir: Option<PathBuf>,
    /// Disk budget of the image cache, in bytes: stored blobs plus unpacked layer snapshots,
    /// shared pieces counted once. Beyond it the least recently used images that no run uses
    /// and no warmup pinned are deleted.
    #[arg(long, env = "BERTH_AGENT_IMAGE_CACHE_BYTES", default_value_t = DEFAULT_IMAGE_CACHE_BYTES)]
    pub image_cache_bytes: u64,
    /// One-shot mode (what `berthctl run --here` starts): the node exists for this ephemeral
    /// run only. It registers with the run's claim (`--ephemeral-claim-file`, or
    /// `BERTH_EPHEMERAL_CLAIM`), takes that run and no other, and exits once the run has ended
    /// and every report is acknowledged (0), or when the scheduler refuses it (1). `--node-id`
    /// must be the run's `ephemeral.node_id`.
    #[arg(long, env = "BERTH_AGENT_EPHEMERAL_RUN_ID")]
    pub ephemeral_run_id: Option<String>,
    /// gVisor for sandboxed runs (`isolation: sandbox`): `auto` uses `runsc` from PATH when it
    /// is there and runs a sandbox at start, `off` takes no sandboxed runs, an absolute path
    /// names the runsc binary (which must work, or the agent does not start).
    #[arg(long, env = "BERTH_AGENT_SANDBOX_RUNTIME", default_value = "auto")]
    pub sandbox_runtime: SandboxRuntime,
    /// gVisor's platform: `ptrace` (works everywhere, slower syscalls) or `kvm` (needs
    /// /dev/kvm).
    #[arg(long, env = "BERTH_AGENT_SANDBOX_PLATFORM", default_value = "ptrace")]
    pub sandbox_platform: String,
    /// File holding the ephemeral run's claim (from the answer that created the run).
    #[arg(
        long,
        env = "BERTH_AGENT_EPHEMERAL_CLAIM_FILE",
        requires = "ephemeral_run_id"
    )]
    pub ephemeral_claim_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// docs/CONFIG.md's node-agent table is the one these settings render
    /// (`BERTH_BLESS=1 cargo test -p berth-node-agent --lib reference` rewrites it).
    #[test]
    fn the_reference_page_is_current() {
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
        let checked =
            berth_core::config_file::check_reference(&Cli::command(), "node-agent", &page);
        assert_eq!(checked, Ok(()));
    }
}
