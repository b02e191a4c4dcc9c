//! Node settings the agent runs with, after the CLI has filled in defaults.

use berth_core::failover::SchedulerAddrs;
use std::path::PathBuf;
use std::time::Duration;

use crate::run::logs::LogLimits;

/// Everything the agent needs to know about its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Every scheduler's gRPC address (`http://127.0.0.1:7070`, or several when schedulers fail
    /// over: the agent registers with whichever answers, the leader).
    pub schedulers: SchedulerAddrs,
    pub node_id: String,
    pub region: String,
    pub total_memory_mib: u64,
    pub cpus: u32,
    pub max_runs: u32,
    pub containerd_socket: PathBuf,
    /// containerd namespace owned by this agent.
    pub namespace: String,
    /// cgroup parent without leading slash; runs go to `/<parent>/<run id>`.
    pub cgroup_parent: String,
    /// Run journals (and the runs' output files) live under `<state_dir>/runs/<run id>/`.
    pub state_dir: PathBuf,
    /// `host:port` registries reached over plain HTTP (loopback registries always are).
    pub insecure_registries: Vec<String>,
    /// Most processes (threads included) one run may have, enforced by the pids cgroup.
    pub pids_limit: i64,
    /// How much output of one run is kept as log lines; the rest is dropped.
    pub log_limits: LogLimits,
    /// After SIGTERM, how long to wait for running runs to end (and their reports to be
    /// acknowledged) before exiting anyway; runs still going are re-adopted by the next start.
    pub shutdown_grace: Duration,
    /// Most bytes one run may write to its own filesystem; None: unbounded.
    pub max_run_disk_bytes: Option<u64>,
    /// This node's credential (see `scheduler_link::enroll`), presented on every session.
    pub credential: Option<Secret>,
    /// Most ready sandboxes the node keeps for warmed runners (see `run::sandboxes`); 0: none.
    pub max_sandboxes: usize,
    /// An unused sandbox is replaced by a fresh one after this long.
    pub sandbox_max_idle: Duration,
    /// One-shot mode (`berthctl run --here`): the node exists for this run only.
    pub ephemeral: Option<EphemeralRun>,
    /// The OCI runtimes the node has (runc; gVisor for sandboxed runs), checked at start.
    pub runtimes: crate::oci_runtimes::OciRuntimes,
}

/// The run a one-shot node was started for, and the claim that lets it take the run.
#[derive(Debug, Clone)]
pub struct EphemeralRun {
    pub run_id: String,
    pub claim: Secret,
}

/// A string that never shows in logs (`Debug` prints `[redacted]`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}
