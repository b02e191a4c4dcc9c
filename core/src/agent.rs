//! What a node agent and the scheduler say to each other, as domain types: the agent's reports
//! ([`AgentReport`], after its [`Registration`]) and the scheduler's commands
//! ([`AgentCommand`]), sent through an [`AgentLink`].
//!
//! The gRPC forms (`berth_proto::v1::AgentMessage` and `SchedulerMessage`) exist only at the
//! edge: the scheduler's agent service decodes each message once into these types and encodes
//! each command once on its way out, so the engine never sees a protobuf type. Transport
//! details stay at the edge too: message sequence numbers and their acknowledgements are the
//! stream's business, not the engine's.

use crate::codes::ErrorCode;
use crate::model::{ImagePull, LogStream, RunFile};
use std::collections::HashMap;

/// The first thing an agent says on a new stream: who it is and what it already runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub node_id: String,
    /// Changes when the node (or its agent state) restarts: runs it held before are gone.
    pub boot_id: String,
    pub region: String,
    pub total_memory_mib: u64,
    pub cpus: u32,
    pub max_concurrent_runs: u32,
    /// The runs the agent still supervises.
    pub active_run_ids: Vec<String>,
    pub agent_version: String,
    pub cached_images: Vec<String>,
    /// One-shot mode: the node exists for this run only (see `Run::ephemeral`).
    pub ephemeral: Option<EphemeralClaim>,
    /// The OCI runtimes the node has and checked (`runc`, `runsc`); empty from an agent that
    /// does not say: `runc` only.
    pub runtimes: Vec<String>,
}

/// What a one-shot node presents to take the run it was started for.
#[derive(Clone, PartialEq, Eq)]
pub struct EphemeralClaim {
    pub run_id: String,
    pub claim: String,
}

impl std::fmt::Debug for EphemeralClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralClaim")
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

/// Everything an agent reports on its stream after registering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentReport {
    Heartbeat(Heartbeat),
    RunStarted(RunStarted),
    RunExited(RunExited),
    Logs(LogBatch),
    WarmupResult(WarmupResult),
    PullProgress(PullProgress),
    RunReleased(RunReleased),
}

/// The agent is alive; what it runs and caches now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub free_memory_mib: u64,
    pub running_run_ids: Vec<String>,
    pub cached_images: Vec<String>,
}

/// A run's container started under the lease `lease_epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStarted {
    pub run_id: String,
    pub lease_epoch: u64,
    /// When it started; 0 when the agent did not say (the scheduler's clock is used).
    pub started_at_unix_nanos: i64,
    /// The digest the image resolved to, when known.
    pub image_digest: Option<String>,
    /// When each step of the start happened on the node.
    pub stages: StartStages,
    /// The OCI runtime (and its version) that runs the process; None from an older agent.
    pub runtime: Option<String>,
}

/// The node's side of a run's start, unix nanoseconds by the agent's clock; 0 for a step not
/// taken or not reported (older agents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartStages {
    /// The assignment arrived.
    pub received_at_unix_nanos: i64,
    /// The image was resolved, present and unpacked.
    pub image_ready_at_unix_nanos: i64,
    /// User resolved, spec built, journal and files written.
    pub prepared_at_unix_nanos: i64,
    /// The network namespace was attached.
    pub network_ready_at_unix_nanos: i64,
    /// Snapshot, container and task created.
    pub task_created_at_unix_nanos: i64,
    /// The run took a ready sandbox (created before the assignment).
    pub sandbox: bool,
}

/// A run reported with `cleanup_pending` is cleaned up: its capacity is free again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReleased {
    pub run_id: String,
    pub lease_epoch: u64,
}

/// Why a run's container ended (or never started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The agent did not say: treated as a failure.
    Unspecified,
    /// The process exited by itself.
    Exited,
    /// The agent killed it at the run's timeout.
    Timeout,
    /// The agent stopped it because the scheduler asked.
    Stopped,
    /// It never started (pull failure, bad spec, node shutting down...).
    StartFailed,
}

/// A run's container ended under the lease `lease_epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExited {
    pub run_id: String,
    pub lease_epoch: u64,
    /// The process's exit code; negative when there is none (it never started, or was killed
    /// before reporting one).
    pub exit_code: i32,
    /// When it ended; 0 when the agent did not say (the scheduler's clock is used).
    pub exited_at_unix_nanos: i64,
    pub reason: ExitReason,
    /// Machine-readable cause of a failure (e.g. [`ErrorCode::NodeDraining`]); None when the
    /// agent gave none.
    pub error_code: Option<ErrorCode>,
    pub error_message: String,
    pub oom_killed: bool,
    /// When the agent sent the report (0: not said).
    pub reported_at_unix_nanos: i64,
    /// The container is still being cleaned up: its capacity stays held until
    /// [`RunReleased`]. False from older agents: already cleaned up.
    pub cleanup_pending: bool,
}

/// Lines a run wrote, in order of their sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBatch {
    pub run_id: String,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The line's number within its run, from 1; a re-sent line keeps its number.
    pub seq: u64,
    pub stream: LogStream,
    pub msg: String,
    pub ts_unix_nanos: i64,
}

/// A warmup's pull of a runner's image finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupResult {
    pub runner_id: String,
    pub image: String,
    /// The pulled image's digest, or why the pull failed.
    pub outcome: Result<String, String>,
}

/// What an image pull is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullFor {
    /// A run's start, under the lease `lease_epoch`.
    Run { run_id: String, lease_epoch: u64 },
    /// A runner's warmup.
    Warmup { runner_id: String },
}

/// How far an image pull has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    pub pull_for: PullFor,
    pub image: String,
    pub progress: ImagePull,
    /// The pull is done (the run may still be starting).
    pub complete: bool,
}

/// Everything the scheduler tells an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// The answer to a [`Registration`].
    Registered(Registered),
    /// Start a run under a new lease.
    AssignRun(AssignRun),
    /// Stop a run (or make sure it is not running).
    StopRun { run_id: String },
    /// Pull a runner's image ahead of its runs.
    Warmup(Warmup),
    /// The images the node must keep and the sandboxes it keeps ready, its whole set (it
    /// replaces the previous one).
    WarmPins {
        images: Vec<String>,
        sandboxes: Vec<WarmSandboxes>,
    },
}

/// A runner's ready sandboxes on a node: `count` containers created (not started) for a run of
/// the runner with no overrides, whose spec is `spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmSandboxes {
    pub runner_id: String,
    pub count: u32,
    pub spec: RunSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub heartbeat_interval_seconds: u32,
    /// Runs the agent reported that the scheduler did not lease to it: it stops them.
    pub stale_run_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignRun {
    pub run_id: String,
    pub lease_epoch: u64,
    pub spec: RunSpec,
    /// The run's runner (a ready sandbox of that runner may serve it).
    pub runner_id: String,
    /// W3C `traceparent` of the run's placement, while traces are exported.
    pub trace_parent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmup {
    pub runner_id: String,
    pub image: String,
    pub registry_auth: Option<RegistryAuth>,
}

/// Everything a node needs to start a run's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// The full image reference.
    pub image: String,
    /// Replaces the image's entrypoint when set (an empty list clears it).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command when set (an empty list clears it).
    pub cmd: Option<Vec<String>>,
    pub env: HashMap<String, String>,
    pub timeout_seconds: u32,
    pub memory_mib: u64,
    pub cpu_millis: u32,
    pub stop_grace_seconds: u32,
    pub registry_auth: Option<RegistryAuth>,
    /// Files placed in the container, with their contents.
    pub files: Vec<RunFile>,
    /// runc or gVisor.
    pub isolation: crate::model::Isolation,
}

/// Credentials for a private registry, unsealed: they travel only to the node that pulls.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    // Never the password: debug output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The agent's stream has ended; the command was not sent. The node learns what it must when it
/// registers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the agent's stream is closed")]
pub struct LinkClosed;

/// How the scheduler reaches one connected agent. The real link is the agent's gRPC stream;
/// tests use a recorder. `send` must not block: it is called while commands are dispatched in
/// commit order.
pub trait AgentLink: Send + Sync {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed>;
    /// Ends the session at once, telling the agent why (its credential was revoked).
    fn close(&self, _reason: &str) {}
}
