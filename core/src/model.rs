//! The records Berth keeps. They serialise to JSON in the store; the public API has its own
//! view types so that internal fields (a run's effective environment, lease epochs) never leak.

use crate::codes::ErrorCode;
use crate::status::{RunStatus, TransitionError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One environment variable, in Nodion's field names. A `secret` one is never returned by the
/// API and is redacted from the run's logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Matches `[A-Za-z_][A-Za-z0-9_]*`.
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]*$")]
    pub env_key: String,
    /// `null` (how the API shows a secret) reads as empty: on a PATCH, "keep the stored value".
    #[serde(default, deserialize_with = "null_as_empty")]
    #[schema(nullable)]
    pub env_val: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// What a user chooses about a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerSpec {
    pub name: String,
    pub image_name: String,
    pub image_tag: String,
    /// Shell form, run as `sh -c`.
    pub run_command: Option<String>,
    /// Exec form; mutually exclusive with `run_command`. Empty means unset.
    pub argv: Vec<String>,
    pub entrypoint: Option<String>,
    pub timeout_seconds: u32,
    pub region: String,
    pub instance_type: String,
    pub env_variables: Vec<EnvVar>,
    /// A private registry (its credentials) to pull the image from.
    #[serde(default)]
    pub container_registry_id: Option<String>,
    /// Seconds between SIGTERM and SIGKILL on timeout or stop; None: the scheduler's default.
    #[serde(default)]
    pub stop_grace_seconds: Option<u32>,
    /// The most runs of this runner that may hold a node at once (assigned or running); later
    /// ones wait in the queue behind them. None: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    /// How its runs' failed attempts are tried again (a run may bring its own). None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<crate::retry::RetryPolicy>,
    /// Where a signed event goes when one of its runs ends (see `core::webhook`). None: nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<crate::webhook::Notify>,
    /// How its runs are isolated from the node's kernel (runc, or gVisor's sandbox).
    #[serde(default, skip_serializing_if = "Isolation::is_container")]
    pub isolation: Isolation,
}

/// How a run is kept from the node's kernel (issue #16). Ordered weakest first: the stronger
/// of two choices is their maximum.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// runc: namespaces, cgroups, a seccomp profile and dropped capabilities, on the node's own
    /// kernel (a kernel bug reachable by a syscall is a way out).
    #[default]
    Container,
    /// gVisor (`runsc`): the run's syscalls are served by a kernel in user space, itself
    /// confined by seccomp to a small set of host syscalls; only nodes that have `runsc` take
    /// such runs.
    Sandbox,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Sandbox => "sandbox",
        }
    }

    pub fn is_container(&self) -> bool {
        *self == Isolation::Container
    }
}

/// The runtime names nodes advertise (`Register.runtimes`).
pub const RUNTIME_RUNC: &str = "runc";
pub const RUNTIME_RUNSC: &str = "runsc";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runner {
    pub id: String,
    /// The project it belongs to (records from before projects: `default`).
    #[serde(default = "crate::auth::default_project")]
    pub project: String,
    pub spec: RunnerSpec,
    pub warmed_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub warmup: Option<Warmup>,
}

/// The last warmup of a runner: which node pulls (or pulled) its image, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warmup {
    pub node_id: String,
    pub image: String,
    pub status: WarmupStatus,
    pub error: Option<String>,
    /// Ready sandboxes the node keeps for the runner while this warmup stands (issue #13):
    /// each holds the runner's memory there.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub sandboxes: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// How a runner's last warmup went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarmupStatus {
    Pending,
    Ready,
    Failed,
}

impl WarmupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WarmupStatus::Pending => "pending",
            WarmupStatus::Ready => "ready",
            WarmupStatus::Failed => "failed",
        }
    }
}

impl Runner {
    /// The node a new run should prefer: the one that finished pulling the image.
    pub fn warm_pin(&self) -> Option<&str> {
        self.warmup
            .as_ref()
            .filter(|w| w.status == WarmupStatus::Ready)
            .map(|w| w.node_id.as_str())
    }
}

/// One execution of a runner. Carries a snapshot of everything needed to start it, so a later
/// change to the runner does not change a run that is already queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub runner_id: String,
    /// Its runner's project when it was created.
    #[serde(default = "crate::auth::default_project")]
    pub project: String,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    /// Effective shell-form command, if the run uses one.
    pub command: Option<String>,
    /// Effective exec-form argv, if the run uses one.
    pub argv: Vec<String>,
    pub entrypoint: Option<String>,
    pub env: Vec<EnvVar>,
    pub image: String,
    pub image_digest: Option<String>,
    /// The image pull's final figures, stored when the run starts (live progress while it is
    /// pending is kept in the scheduler's memory only). None when nothing had to be pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull: Option<ImagePull>,
    pub region: String,
    pub instance_type: String,
    pub memory_mib: u64,
    pub cpu_millis: u32,
    pub timeout_seconds: u32,
    pub node_id: Option<String>,
    /// Grows every time the run is (re-)assigned; reports carrying an older epoch are stale.
    pub lease_epoch: u64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// Why it failed or was stopped, beside its status and exit code (stored as its
    /// `snake_case` name, as before the enum existed).
    pub error_code: Option<ErrorCode>,
    pub error_message: Option<String>,
    pub pending_reason: Option<String>,
    pub stop_requested: bool,
    /// The runner's warm node when the run was created: preferred while it has room.
    #[serde(default)]
    pub warm_pin: Option<String>,
    /// The private registry whose credentials pull the image.
    #[serde(default)]
    pub container_registry_id: Option<String>,
    /// The kernel killed the run for exceeding its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// The instance type's price when the run was created, in billionths of a USD per second.
    #[serde(default)]
    pub price_nano_usd_per_second: u64,
    /// Place among the runs waiting in its region (derived on read, never stored).
    #[serde(skip)]
    pub queue_position: Option<u32>,
    /// Files placed read-only in the container. Kept with the (sealed) record; the control
    /// service only ever returns their path, mode, size and digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<RunFile>,
    /// Seconds between SIGTERM and SIGKILL on timeout or stop, fixed when the run was created
    /// (None for runs stored before it existed: the scheduler's default).
    #[serde(default)]
    pub stop_grace_seconds: Option<u32>,
    /// When each step of its life happened (microseconds; see [`Timeline`]).
    #[serde(default, skip_serializing_if = "Timeline::is_empty")]
    pub timeline: Timeline,
    /// The W3C `traceparent` of the call that created it, while traces are exported: its
    /// placement and its life on a node continue that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// Which attempt of its first run this is (1 for a first run).
    #[serde(default = "first_attempt", skip_serializing_if = "is_first_attempt")]
    pub attempt: u32,
    /// The first attempt's id, on every later attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_attempt_id: Option<String>,
    /// The attempt that followed this one (set when this one ended and was retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_id: Option<String>,
    /// The policy its endings are judged by: the run's own, or its runner's when it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<crate::retry::RetryPolicy>,
    /// A retry waits for its backoff: not placed before this instant (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// Why this attempt exists: how the one before it ended (None for a first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_cause: Option<crate::retry::RetryCause>,
    /// The schedule whose fire created it, and that fire's intended time (unix ms, before
    /// jitter). Its retries keep both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<i64>,
    /// Where its chain of attempts ended, or stands (derived on read of one run, never stored;
    /// None for a run that was not retried).
    #[serde(skip)]
    pub final_attempt: Option<Box<FinalAttempt>>,
    /// The ephemeral node it is pinned to (`berthctl run --here`), for a run created with
    /// `ephemeral: true`: that node takes it, no other node does, and that node takes nothing
    /// else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<Box<Ephemeral>>,
    /// The delivery of its run-ended webhook, when its runner notifies (derived on read of one
    /// ended run from its own record, never stored in the run's).
    #[serde(skip)]
    pub notification: Option<Box<crate::webhook::Delivery>>,
    /// How it is isolated: its runner's choice, or the sandbox when its instance type forces
    /// it (fixed when it was created).
    #[serde(default, skip_serializing_if = "Isolation::is_container")]
    pub isolation: Isolation,
    /// The OCI runtime that ran it (`runc 1.1.5`, `runsc 0.0~20221219.0`), as its node
    /// reported at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// The one node a run created with `ephemeral: true` may run on: a node started for it (in a
/// CI job, say) that registers with the run's claim.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ephemeral {
    /// `eph-<run id>`: the id the node registers (and enrolls) with.
    pub node_id: String,
    /// SHA-256 of the claim the node must present (`core::auth::hash_secret`).
    pub claim_sha256: String,
    /// Unix milliseconds: while the run waits unassigned and its node is not connected after
    /// this, the run ends `failed` with `node_lost`.
    pub connect_by: i64,
    /// The claim itself: only in the answer to the call that created the run, never stored.
    #[serde(skip)]
    pub claim: Option<String>,
}

impl std::fmt::Debug for Ephemeral {
    // Never the claim: it lets a node take the run (and its secrets).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ephemeral")
            .field("node_id", &self.node_id)
            .field("connect_by", &self.connect_by)
            .finish_non_exhaustive()
    }
}

/// The prefix of every ephemeral node's id; a node of the fleet may not register with it.
pub const EPHEMERAL_NODE_PREFIX: &str = "eph-";

impl Ephemeral {
    /// The id of the ephemeral node of run `run_id`.
    pub fn node_id_for(run_id: &str) -> String {
        format!("{EPHEMERAL_NODE_PREFIX}{run_id}")
    }
}

fn first_attempt() -> u32 {
    1
}

fn is_first_attempt(n: &u32) -> bool {
    *n == 1
}

/// The last attempt of a run's chain, as the first (or any earlier) attempt shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalAttempt {
    pub id: String,
    pub attempt: u32,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub error_code: Option<ErrorCode>,
}

/// A small file uploaded with a run, placed read-only at `path` inside its container. The run
/// record holds only what the API may show; the content is stored once, beside it, under
/// `run_files/<run id>` ([`Run::file_contents_value`]), and kept in memory while the run is
/// active, so the record's many rewrites and reads never carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFile {
    /// Absolute, normalised path inside the container.
    pub path: String,
    /// Permission bits, 0 to 0o777.
    pub mode: u32,
    pub size_bytes: u64,
    /// Hex SHA-256 of the content, what the API shows instead of it.
    pub sha256: String,
    #[serde(skip)]
    pub content: Arc<[u8]>,
}

impl std::fmt::Debug for RunFile {
    // Never the content: it may be a secret, and it may be a megabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFile")
            .field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("size_bytes", &self.size_bytes)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

impl RunFile {
    pub fn new(path: String, mode: u32, content: Vec<u8>) -> RunFile {
        RunFile {
            path,
            mode,
            size_bytes: content.len() as u64,
            sha256: sha256_hex(&content),
            content: content.into(),
        }
    }
}

/// A stored `run_files/<run id>` value that does not match its run's files.
#[derive(Debug, thiserror::Error)]
#[error("the stored contents of run {run_id}'s files are unusable: {message}")]
pub struct FileContentsError {
    pub run_id: String,
    pub message: String,
}

impl Run {
    /// The value stored under `run_files/<run id>`: the files' contents in order, as a JSON
    /// array of base64 strings. None for a run without files.
    pub fn file_contents_value(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        if self.files.is_empty() {
            return None;
        }
        let list: Vec<String> = self
            .files
            .iter()
            .map(|f| base64::engine::general_purpose::STANDARD.encode(&f.content))
            .collect();
        serde_json::to_vec(&list).ok()
    }

    /// Puts the contents stored by [`Run::file_contents_value`] back into the files, checking
    /// that each matches its recorded size and digest.
    pub fn restore_file_contents(&mut self, value: &[u8]) -> Result<(), FileContentsError> {
        use base64::Engine as _;
        let fail = |message: String| FileContentsError {
            run_id: self.id.clone(),
            message,
        };
        let list: Vec<String> = serde_json::from_slice(value).map_err(|e| fail(e.to_string()))?;
        if list.len() != self.files.len() {
            return Err(fail(format!(
                "{} contents for {} files",
                list.len(),
                self.files.len()
            )));
        }
        let mut contents = Vec::with_capacity(list.len());
        for (f, b64) in self.files.iter().zip(list) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| fail(format!("{}: {e}", f.path)))?;
            if bytes.len() as u64 != f.size_bytes || sha256_hex(&bytes) != f.sha256 {
                return Err(fail(format!("{}: size or digest differs", f.path)));
            }
            contents.push(bytes);
        }
        for (f, bytes) in self.files.iter_mut().zip(contents) {
            f.content = bytes.into();
        }
        Ok(())
    }
}

/// When each step of a run's life happened, in unix microseconds; 0 for a step not reached or
/// not known (records from before it existed, older agents). The node's steps are by the
/// node's clock, the others by the scheduler's: on one machine they compare directly, across
/// machines they are as close as the clocks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// The scheduler accepted the create.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: i64,
    /// Placement chose a node (the assignment goes out once that is stored).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub assigned: i64,
    /// The agent received the assignment.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub received: i64,
    /// The image was resolved, present and unpacked on the node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_ready: i64,
    /// User resolved, spec built, journal and files written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prepared: i64,
    /// The network namespace was attached.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub network_ready: i64,
    /// Snapshot, container and task created.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub task_created: i64,
    /// The process started (containerd's start).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started: i64,
    /// The process exited (containerd's exit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exited: i64,
    /// The agent reported the exit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exit_reported: i64,
    /// The scheduler recorded the end.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ended: i64,
    /// The run started in a ready sandbox: its container and task were created before it
    /// was assigned (`network_ready` and `task_created` are when it took the sandbox).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sandbox: bool,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Timeline {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The node's steps of a start, from its nanosecond stamps.
    pub fn record_start(&mut self, stages: &crate::agent::StartStages, started_unix_nanos: i64) {
        let micros = |n: i64| if n > 0 { n / 1_000 } else { 0 };
        self.received = micros(stages.received_at_unix_nanos);
        self.image_ready = micros(stages.image_ready_at_unix_nanos);
        self.prepared = micros(stages.prepared_at_unix_nanos);
        self.network_ready = micros(stages.network_ready_at_unix_nanos);
        self.task_created = micros(stages.task_created_at_unix_nanos);
        self.started = micros(started_unix_nanos);
        self.sandbox = stages.sandbox;
    }
}

/// How far an image pull has come: config and layer blobs fetched (downloaded, or already in
/// the node's content store) out of what the manifest names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePull {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: u32,
    pub layers_total: u32,
}

impl Run {
    fn set_status(&mut self, next: RunStatus) -> Result<(), TransitionError> {
        self.status = self.status.transition(next)?;
        Ok(())
    }

    /// The run was handed to `node_id` under a new lease.
    pub fn assign(&mut self, node_id: &str) -> Result<u64, TransitionError> {
        self.set_status(RunStatus::Pending)?;
        self.lease_epoch += 1;
        self.node_id = Some(node_id.to_owned());
        self.pending_reason = None;
        Ok(self.lease_epoch)
    }

    /// Its node went away before it started: back to the queue.
    pub fn requeue(&mut self, reason: &str) -> Result<(), TransitionError> {
        self.set_status(RunStatus::Pending)?;
        self.node_id = None;
        self.pending_reason = Some(reason.to_owned());
        Ok(())
    }

    pub fn start(&mut self, at: i64, image_digest: Option<String>) -> Result<(), TransitionError> {
        self.set_status(RunStatus::Running)?;
        self.started_at = Some(at);
        if image_digest.is_some() {
            self.image_digest = image_digest;
        }
        Ok(())
    }

    /// The process ended by itself or by timeout.
    pub fn exit(&mut self, code: i32, at: i64) -> Result<(), TransitionError> {
        self.set_status(RunStatus::from_exit_code(code))?;
        self.exit_code = Some(code);
        self.completed_at = Some(at);
        Ok(())
    }

    /// Ended with an error that is not a plain exit code (start failure, node lost).
    pub fn fail(&mut self, code: ErrorCode, message: &str, at: i64) -> Result<(), TransitionError> {
        self.set_status(RunStatus::Failed)?;
        self.error_code = Some(code);
        self.error_message = Some(message.to_owned());
        self.completed_at = Some(at);
        Ok(())
    }

    pub fn cancel(&mut self, exit_code: Option<i32>, at: i64) -> Result<(), TransitionError> {
        self.set_status(RunStatus::Canceled)?;
        self.exit_code = exit_code;
        self.completed_at = Some(at);
        self.pending_reason = None;
        Ok(())
    }

    /// Seconds between start and completion, rounded up, as billed.
    pub fn duration_seconds(&self) -> Option<u64> {
        let (start, end) = (self.started_at?, self.completed_at?);
        let millis = u64::try_from(end.saturating_sub(start)).unwrap_or(0);
        Some(millis.div_ceil(1000))
    }

    /// What the run costs, in billionths of a USD: billed seconds × the price it was created
    /// at. Only runs that started and ended are billed; time spent pending never is.
    pub fn cost_nano_usd(&self) -> Option<u64> {
        Some(
            self.duration_seconds()?
                .saturating_mul(self.price_nano_usd_per_second),
        )
    }
}

/// Which of a run's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One line a run printed. `id` is the agent's per-run sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: u64,
    pub stream: LogStream,
    pub msg: String,
    pub ts_unix_nanos: i64,
}

/// A private container registry and the credentials to pull from it. The password is stored
/// sealed (`crate::secrets`) and never leaves the scheduler except inside the `RunSpec` sent to
/// the node that pulls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRegistry {
    pub id: String,
    #[serde(default = "crate::auth::default_project")]
    pub project: String,
    pub name: String,
    /// `host[:port]` of the registry.
    pub host: String,
    pub username: String,
    pub password_sealed: String,
    pub created_at: i64,
}

/// A machine size users pick for a runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    pub slug: String,
    pub cpu_millis: u32,
    pub memory_mib: u64,
    pub price_per_second_usd: f64,
    /// `sandbox`: every run of this type runs in gVisor's sandbox whatever its runner chose
    /// (an operator's rule for, say, the types sold for untrusted code). Absent: the runner's
    /// choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

impl InstanceType {
    /// The isolation a runner that chose `chosen` gets on this type: the stronger of the two.
    pub fn isolation_for(&self, chosen: Isolation) -> Isolation {
        self.isolation.map_or(chosen, |forced| forced.max(chosen))
    }
}

/// The regions and instance types runners may name. Loaded from a JSON file given to the
/// scheduler (`--catalog`), or [`Catalog::default`] (the built-in one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub regions: Vec<String>,
    pub instance_types: Vec<InstanceType>,
}

/// A catalogue file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalog: {0}")]
    Read(#[from] std::io::Error),
    #[error("the catalog is not valid JSON of the expected shape: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the catalog is inconsistent: {0}")]
    Invalid(String),
}

impl Default for Catalog {
    fn default() -> Self {
        let it = |slug: &str, cpu_millis, memory_mib, price| InstanceType {
            slug: slug.to_owned(),
            cpu_millis,
            memory_mib,
            price_per_second_usd: price,
            isolation: None,
        };
        Catalog {
            regions: ["fra", "ams", "lon", "nyc"].map(String::from).to_vec(),
            instance_types: vec![
                it("standard-xs", 500, 512, 0.000_002),
                it("standard-s", 1000, 1024, 0.000_004),
                it("standard-m", 2000, 2048, 0.000_008),
                it("standard-l", 2000, 4096, 0.000_016),
                it("standard-xl", 4000, 8192, 0.000_032),
            ],
        }
    }
}

impl InstanceType {
    /// The price in billionths of a USD per second (exact integer arithmetic for billing).
    pub fn price_nano_usd_per_second(&self) -> u64 {
        let nanos = (self.price_per_second_usd * 1e9).round();
        if nanos.is_finite() && nanos > 0.0 {
            nanos as u64
        } else {
            0
        }
    }
}

impl Catalog {
    pub fn from_json(bytes: &[u8]) -> Result<Catalog, CatalogError> {
        let catalog: Catalog = serde_json::from_slice(bytes)?;
        catalog.check()?;
        Ok(catalog)
    }

    pub fn load(path: &std::path::Path) -> Result<Catalog, CatalogError> {
        Catalog::from_json(&std::fs::read(path)?)
    }

    fn check(&self) -> Result<(), CatalogError> {
        let bad = |m: String| Err(CatalogError::Invalid(m));
        if self.regions.is_empty() || self.instance_types.is_empty() {
            return bad("it needs at least one region and one instance type".into());
        }
        let mut slugs = std::collections::HashSet::new();
        for t in &self.instance_types {
            if !slugs.insert(t.slug.as_str()) {
                return bad(format!("instance type {} is listed twice", t.slug));
            }
            if t.memory_mib == 0 || t.cpu_millis == 0 || t.price_per_second_usd < 0.0 {
                return bad(format!(
                    "instance type {} needs memory, cpu and a price ≥ 0",
                    t.slug
                ));
            }
        }
        Ok(())
    }

    pub fn instance_type(&self, slug: &str) -> Option<&InstanceType> {
        self.instance_types.iter().find(|t| t.slug == slug)
    }

    pub fn has_region(&self, region: &str) -> bool {
        self.regions.iter().any(|r| r == region)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn run() -> Run {
        Run {
            id: "r".into(),
            runner_id: "x".into(),
            project: "default".into(),
            status: RunStatus::Pending,
            exit_code: None,
            command: None,
            argv: vec![],
            entrypoint: None,
            env: vec![],
            image: "i".into(),
            image_digest: None,
            image_pull: None,
            region: "fra".into(),
            instance_type: "standard-s".into(),
            memory_mib: 1024,
            cpu_millis: 1000,
            timeout_seconds: 10,
            node_id: None,
            lease_epoch: 0,
            created_at: 0,
            started_at: None,
            completed_at: None,
            error_code: None,
            error_message: None,
            pending_reason: None,
            stop_requested: false,
            warm_pin: None,
            container_registry_id: None,
            oom_killed: false,
            price_nano_usd_per_second: 0,
            queue_position: None,
            files: vec![],
            stop_grace_seconds: None,
            timeline: Timeline::default(),
            trace_parent: None,
            attempt: 1,
            first_attempt_id: None,
            previous_attempt_id: None,
            next_attempt_id: None,
            retry_policy: None,
            not_before: None,
            retry_cause: None,
            schedule_id: None,
            scheduled_for: None,
            final_attempt: None,
            ephemeral: None,
            notification: None,
            isolation: Default::default(),
            runtime: None,
        }
    }

    #[test]
    fn file_contents_are_stored_apart_from_the_record_and_restored_checked() {
        let mut r = run();
        r.files = vec![
            RunFile::new("/etc/x".into(), 0o444, b"hello".to_vec()),
            RunFile::new("/etc/y".into(), 0o755, vec![]),
        ];
        assert_eq!(
            r.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let record = serde_json::to_string(&r).unwrap_or_default();
        assert!(
            !record.contains("aGVsbG8") && record.contains("\"size_bytes\":5"),
            "{record}"
        );
        assert!(
            !format!("{r:?}").contains("104, 101"),
            "Debug shows no content"
        );
        let value = r.file_contents_value().unwrap_or_default();
        assert_eq!(value, br#"["aGVsbG8=",""]"#.to_vec());

        let mut back: Run = serde_json::from_str(&record).unwrap_or_else(|_| run());
        assert!(back.files[0].content.is_empty());
        assert!(back.restore_file_contents(&value).is_ok());
        assert_eq!(back, r);
        assert!(back.restore_file_contents(br#"["aGVsbG9v",""]"#).is_err());
        assert!(back.restore_file_contents(br#"["aGVsbG8="]"#).is_err());
        assert_eq!(run().file_contents_value(), None);

        // Records stored before files existed still read.
        let mut old: serde_json::Value = serde_json::to_value(run()).unwrap_or_default();
        if let Some(o) = old.as_object_mut() {
            o.remove("files");
            o.remove("stop_grace_seconds");
        }
        let back: Result<Run, _> = serde_json::from_value(old);
        assert!(back.is_ok_and(|r| r.files.is_empty() && r.stop_grace_seconds.is_none()));
    }

    #[test]
    fn error_codes_are_stored_by_the_names_they_always_had() {
        // A record stored when `error_code` was a string.
        let mut old = serde_json::to_value(run()).unwrap_or_default();
        old["status"] = "failed".into();
        old["error_code"] = "image_pull_failed".into();
        let back: Run = serde_json::from_value(old.clone()).expect("an old record reads");
        assert_eq!(back.error_code, Some(ErrorCode::ImagePullFailed));
        assert_eq!(
            serde_json::to_value(&back).unwrap_or_default(),
            old,
            "written back the same"
        );
        old["error_code"] = serde_json::Value::Null;
        let back: Run = serde_json::from_value(old).expect("no code reads");
        assert_eq!(back.error_code, None);

        let mut r = run();
        assert!(r.fail(ErrorCode::NodeLost, "gone", 5).is_ok());
        let json = serde_json::to_string(&r).unwrap_or_default();
        assert!(json.contains(r#""error_code":"node_lost""#), "{json}");
    }

    #[test]
    fn duration_rounds_up_to_whole_seconds() {
        let mut r = run();
        r.started_at = Some(1_000);
        r.completed_at = Some(2_001);
        assert_eq!(r.duration_seconds(), Some(2));
        r.completed_at = Some(2_000);
        assert_eq!(r.duration_seconds(), Some(1));
    }

    #[test]
    fn billing_rounds_up_and_never_counts_pending_time() {
        let mut r = run();
        r.price_nano_usd_per_second = 4_000;
        r.created_at = 0;
        assert_eq!(r.cost_nano_usd(), None, "not started: nothing billed");
        r.started_at = Some(60_000); // a minute pending
        r.completed_at = Some(62_500);
        assert_eq!(r.duration_seconds(), Some(3));
        assert_eq!(r.cost_nano_usd(), Some(12_000));
        let standard_s = Catalog::default();
        let price = standard_s
            .instance_type("standard-s")
            .map(|t| t.price_nano_usd_per_second());
        assert_eq!(price, Some(4_000));
    }

    #[test]
    fn each_assignment_gets_a_new_lease_epoch() {
        let mut r = run();
        assert_eq!(r.assign("a"), Ok(1));
        r.requeue("node lost").ok();
        assert_eq!(r.assign("b"), Ok(2));
        assert_eq!(r.node_id.as_deref(), Some("b"));
    }

    #[test]
    fn a_finished_run_cannot_be_restarted() {
        let mut r = run();
        r.start(1, None).ok();
        r.exit(0, 2).ok();
        assert!(r.start(3, None).is_err());
        assert!(r.cancel(None, 4).is_err());
        assert_eq!(r.status, RunStatus::Succeeded);
    }
}
