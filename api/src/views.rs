//! The public JSON shapes (Nodion's field names), built from the control service's messages.
//!
//! Each shape is a struct, so the OpenAPI document ([`crate::openapi`]) is generated from the
//! same types the responses are serialised from. Every key is always present: an `Option` is
//! `null`, never missing (hence `required = true` on them).

use berth_core::codes::{ErrorCode, NodeState};
use berth_core::convert::{
    error_code_from_pb, isolation_from_pb, log_stream_from_pb, node_state_from_pb,
    retry_cause_from_pb, retry_policy_from_pb, run_status_from_pb, warmup_status_from_pb,
    UnknownEnumValue,
};
use berth_core::model::{Isolation, LogStream, WarmupStatus};
use berth_core::retry::{RetryCause, RetryPolicy};
use berth_core::RunStatus;
use berth_proto::v1 as pb;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// Billionths of a USD as a JSON number of USD.
pub fn nano_usd(n: u64) -> f64 {
    n as f64 / 1e9
}

/// RFC 3339; `None` only for an instant outside the years 0–9999.
pub fn timestamp_millis(ms: i64) -> Option<String> {
    timestamp_nanos(i128::from(ms) * 1_000_000)
}

pub fn timestamp_nanos(ns: i128) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

fn opt_millis(ms: Option<i64>) -> Option<String> {
    ms.and_then(timestamp_millis)
}

/// An environment variable as the API shows it: a secret one without its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvVarView {
    pub env_key: String,
    /// `null` for a secret variable (its value is never returned).
    #[schema(required = true)]
    pub env_val: Option<String>,
    /// Present (and `true`) only for a secret variable.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

fn env(vars: &[pb::EnvVar]) -> Vec<EnvVarView> {
    vars.iter()
        .map(|e| EnvVarView {
            env_key: e.key.clone(),
            env_val: (!e.secret).then(|| e.value.clone()),
            secret: e.secret,
        })
        .collect()
}

/// `null` when unset (a runner or run has `run_command`/`command` instead).
fn argv(a: &[String]) -> Option<Vec<String>> {
    (!a.is_empty()).then(|| a.to_vec())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunnerView {
    pub id: String,
    pub name: String,
    pub image_name: String,
    pub image_tag: String,
    /// Shell form, run as `sh -c`.
    #[schema(required = true)]
    pub run_command: Option<String>,
    /// Exec form (no shell); `null` when unset.
    #[schema(required = true)]
    pub argv: Option<Vec<String>>,
    #[schema(required = true)]
    pub entrypoint: Option<String>,
    pub timeout_seconds: u32,
    pub region: String,
    pub instance_type: String,
    pub env_variables: Vec<EnvVarView>,
    #[schema(required = true)]
    pub container_registry_id: Option<String>,
    /// Seconds between SIGTERM and SIGKILL for this runner's runs; `null`: the scheduler's default.
    #[schema(required = true)]
    pub stop_grace_seconds: Option<u32>,
    /// The most runs of this runner holding a node at once; `null`: no cap.
    #[schema(required = true)]
    pub max_concurrent_runs: Option<u32>,
    /// How its runs' failed attempts are tried again; `null`: never.
    #[schema(required = true)]
    pub retry_policy: Option<RetryPolicy>,
    /// Where a signed event goes when one of its runs ends; `null`: nowhere.
    #[schema(required = true)]
    pub notify_url: Option<String>,
    /// Whether a signing secret is set (the secret itself is never shown).
    pub notify_secret_set: bool,
    /// `container` (runc) or `sandbox` (gVisor) for its runs; an instance type may force
    /// `sandbox` whatever this says (each run shows what it got).
    pub isolation: Isolation,
    #[schema(required = true, format = DateTime)]
    pub warmed_at: Option<String>,
    /// `null` before the first warmup.
    #[schema(required = true)]
    pub warmup_status: Option<WarmupStatus>,
    #[schema(required = true)]
    pub warm_node_id: Option<String>,
    #[schema(required = true)]
    pub warmup_error: Option<String>,
    /// The progress of the pending warmup's image pull; `null` when none is going on.
    #[schema(required = true)]
    pub warmup_image_pull: Option<ImagePullView>,
    /// Ready sandboxes the warm node keeps for the runner (asked by its last warmup; 0: none).
    pub warm_sandboxes: u32,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub updated_at: Option<String>,
}

pub fn runner(r: &pb::Runner) -> RunnerView {
    let s = r.spec.clone().unwrap_or_default();
    RunnerView {
        id: r.id.clone(),
        name: s.name,
        image_name: s.image_name,
        image_tag: s.image_tag,
        run_command: s.run_command,
        argv: argv(&s.argv),
        entrypoint: s.entrypoint,
        timeout_seconds: s.timeout_seconds,
        region: s.region,
        instance_type: s.instance_type,
        env_variables: env(&s.env_variables),
        container_registry_id: s.container_registry_id,
        stop_grace_seconds: s.stop_grace_seconds,
        max_concurrent_runs: s.max_concurrent_runs,
        retry_policy: s.retry_policy.map(retry_policy_from_pb),
        notify_secret_set: s.notify_url.is_some() && s.notify_secret.is_some(),
        notify_url: s.notify_url,
        isolation: isolation_from_pb(s.isolation),
        warmed_at: opt_millis(r.warmed_at_unix_millis),
        warmup_status: warmup_status_from_pb(r.warmup_status),
        warm_node_id: r.warm_node_id.clone(),
        warmup_error: r.warmup_error.clone(),
        warmup_image_pull: r.warmup_image_pull.as_ref().map(image_pull),
        warm_sandboxes: r.warm_sandboxes,
        created_at: timestamp_millis(r.created_at_unix_millis),
        updated_at: timestamp_millis(r.updated_at_unix_millis),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub id: String,
    pub runner_id: String,
    pub status: RunStatus,
    #[schema(required = true)]
    pub exit_code: Option<i32>,
    /// The shell-form command the run executes (`sh -c`), if it has one.
    #[schema(required = true)]
    pub command: Option<String>,
    /// The exec-form command, if it has one; `null` otherwise.
    #[schema(required = true)]
    pub argv: Option<Vec<String>>,
    #[schema(required = true)]
    pub entrypoint: Option<String>,
    #[schema(required = true)]
    pub node_id: Option<String>,
    pub region: String,
    pub instance_type: String,
    pub image: String,
    #[schema(required = true)]
    pub image_digest: Option<String>,
    pub timeout_seconds: u32,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub completed_at: Option<String>,
    /// Whole seconds from start to end, rounded up; `null` until the run has started and ended.
    #[schema(required = true)]
    pub duration_seconds: Option<u64>,
    #[schema(required = true)]
    pub error_code: Option<ErrorCode>,
    #[schema(required = true)]
    pub error_message: Option<String>,
    /// Why a pending run waits.
    #[schema(required = true)]
    pub pending_reason: Option<String>,
    /// 1-based place among the runs waiting in the same region; set only while queued.
    #[schema(required = true)]
    pub queue_position: Option<u32>,
    #[schema(required = true)]
    pub warm_pin: Option<String>,
    pub stop_requested: bool,
    pub oom_killed: bool,
    /// How the run is isolated from its node's kernel: `container` (runc) or `sandbox`
    /// (gVisor).
    pub isolation: Isolation,
    /// The OCI runtime that ran it and its version (`runc 1.1.5`, `runsc 0.0~20221219.0`);
    /// `null` until it starts.
    #[schema(required = true)]
    pub runtime: Option<String>,
    pub price_per_second_usd: f64,
    #[schema(required = true)]
    pub billed_seconds: Option<u64>,
    #[schema(required = true)]
    pub cost_usd: Option<f64>,
    /// The image pull: its progress while the run is pending, its final figures once started;
    /// `null` when nothing had to be pulled.
    #[schema(required = true)]
    pub image_pull: Option<ImagePullView>,
    /// Seconds between SIGTERM and SIGKILL on timeout or stop; `null`: the scheduler's default.
    #[schema(required = true)]
    pub stop_grace_seconds: Option<u32>,
    /// The run's uploaded files: never their content.
    pub files: Vec<RunFileView>,
    /// When each step of the run's life happened, to the microsecond: where its start time
    /// went. Steps not reached (or not known, for older runs) are absent.
    pub timeline: RunTimelineView,
    /// Which attempt this is: 1 for a run created by a trigger, 2 and on for its retries.
    pub attempt: u32,
    /// The first attempt, on a retry; `null` on a first run.
    #[schema(required = true)]
    pub first_attempt_id: Option<String>,
    #[schema(required = true)]
    pub previous_attempt_id: Option<String>,
    /// The retry that followed this attempt, once it ended and was retried.
    #[schema(required = true)]
    pub next_attempt_id: Option<String>,
    /// How the attempt before this one ended; `null` on a first run.
    #[schema(required = true)]
    pub retry_cause: Option<RetryCause>,
    /// The policy this run's ending is judged by (its own, or its runner's when it was created).
    #[schema(required = true)]
    pub retry_policy: Option<RetryPolicy>,
    /// A retry waiting for its backoff is not placed before this instant.
    #[schema(required = true, format = DateTime)]
    pub retry_at: Option<String>,
    /// Where the chain of attempts that followed this run ended, or stands: on a read of one
    /// run that was retried (`GET /v1/runners/{id}/runs/{run_id}`); `null` otherwise.
    #[schema(required = true)]
    pub final_attempt: Option<FinalAttemptView>,
    /// The schedule whose fire created this run (its retries keep it); `null` otherwise.
    #[schema(required = true)]
    pub schedule_id: Option<String>,
    /// That fire's intended time (before jitter).
    #[schema(required = true, format = DateTime)]
    pub scheduled_for: Option<String>,
    /// For a run created with `ephemeral: true`: the one node that may run it (its `node_id`
    /// once it took the run); `null` otherwise.
    #[schema(required = true)]
    pub ephemeral: Option<EphemeralView>,
    /// What the ephemeral node presents to take the run (`berth-node-agent
    /// --ephemeral-claim-file`): only in the answer to the `POST` that created it, and only
    /// once (a replay by idempotency key does not show it again). Keep it secret: with a
    /// registration token of the run's region it runs the run, secrets included. `null`
    /// everywhere else.
    #[schema(required = true)]
    pub ephemeral_claim: Option<String>,
    /// Its run-ended webhook (when its runner has a `notify_url`): where the delivery stands
    /// and every attempt. On a read of one ended run; `null` otherwise.
    #[schema(required = true)]
    pub notification: Option<NotificationView>,
}

/// A run-ended webhook's delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationView {
    pub url: String,
    /// `pending` (attempts go on), `delivered` (a 2xx answer) or `failed` (every attempt
    /// failed).
    pub status: String,
    pub attempts_made: u32,
    /// The attempts (at most the first and the latest 11).
    pub attempts: Vec<NotificationAttemptView>,
    /// While pending: when the next attempt is made.
    #[schema(required = true, format = DateTime)]
    pub next_attempt_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationAttemptView {
    pub attempt: u32,
    #[schema(format = DateTime)]
    pub at: String,
    /// The receiver's HTTP status; `null` when none came.
    #[schema(required = true)]
    pub status_code: Option<u32>,
    /// What went wrong; `null` for a 2xx answer.
    #[schema(required = true)]
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The ephemeral node a run is pinned to.
#[derive(Debug, Serialize, ToSchema)]
pub struct EphemeralView {
    /// `eph-<run id>`: the id the node enrolls and registers with.
    pub node_id: String,
    /// While the run waits and its node has not connected after this, the run ends `failed`
    /// with `node_lost`.
    #[schema(format = DateTime)]
    pub connect_by: String,
}

/// The last attempt of a run's chain of retries.
#[derive(Debug, Serialize, ToSchema)]
pub struct FinalAttemptView {
    pub id: String,
    pub attempt: u32,
    pub status: RunStatus,
    #[schema(required = true)]
    pub exit_code: Option<i32>,
    #[schema(required = true)]
    pub error_code: Option<ErrorCode>,
}

/// Each step of a run's life, RFC 3339 with microseconds. `received` through `task_created`,
/// `started`, `exited` and `exit_reported` are taken on the node (its clock), the others by
/// the scheduler.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct RunTimelineView {
    /// The scheduler accepted the create.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub created_at: Option<String>,
    /// Placement chose a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub assigned_at: Option<String>,
    /// The node received the assignment.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub received_at: Option<String>,
    /// The image was resolved, present and unpacked on the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub image_ready_at: Option<String>,
    /// The image user was resolved, the spec built, the journal and files written.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub prepared_at: Option<String>,
    /// The run's network namespace was attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub network_ready_at: Option<String>,
    /// The snapshot, container and task were created.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub task_created_at: Option<String>,
    /// The process started.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// The process exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub exited_at: Option<String>,
    /// The node reported the exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub exit_reported_at: Option<String>,
    /// The scheduler recorded the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    /// The run started in a ready sandbox kept by its runner's warmup: its container and task
    /// existed before it was assigned (`network_ready_at` and `task_created_at` are when it
    /// took it). Absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sandbox: bool,
}

fn micros(us: i64) -> Option<String> {
    (us > 0)
        .then(|| timestamp_nanos(i128::from(us) * 1_000))
        .flatten()
}

fn timeline(t: Option<&pb::RunTimeline>) -> RunTimelineView {
    let Some(t) = t else {
        return RunTimelineView::default();
    };
    RunTimelineView {
        created_at: micros(t.created),
        assigned_at: micros(t.assigned),
        received_at: micros(t.received),
        image_ready_at: micros(t.image_ready),
        prepared_at: micros(t.prepared),
        network_ready_at: micros(t.network_ready),
        task_created_at: micros(t.task_created),
        started_at: micros(t.started),
        exited_at: micros(t.exited),
        exit_reported_at: micros(t.exit_reported),
        ended_at: micros(t.ended),
        sandbox: t.sandbox,
    }
}

/// An uploaded file as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunFileView {
    pub path: String,
    pub mode: u32,
    pub size_bytes: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

fn files(files: &[pb::RunFileInfo]) -> Vec<RunFileView> {
    files
        .iter()
        .map(|f| RunFileView {
            path: f.path.clone(),
            mode: f.mode,
            size_bytes: f.size_bytes,
            sha256: f.sha256.clone(),
        })
        .collect()
}

/// An image pull's progress: config and layer bytes fetched out of the manifest's total.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagePullView {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: u32,
    pub layers_total: u32,
}

fn image_pull(p: &pb::ImagePull) -> ImagePullView {
    ImagePullView {
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        layers_done: p.layers_done,
        layers_total: p.layers_total,
    }
}

/// Fails only when the scheduler sends a status this API does not know (a newer scheduler).
pub fn run(r: &pb::Run) -> Result<RunView, UnknownEnumValue> {
    let duration = match (r.started_at_unix_millis, r.completed_at_unix_millis) {
        (Some(s), Some(e)) => Some(
            u64::try_from(e.saturating_sub(s))
                .unwrap_or(0)
                .div_ceil(1000),
        ),
        _ => None,
    };
    Ok(RunView {
        id: r.id.clone(),
        runner_id: r.runner_id.clone(),
        status: run_status_from_pb(r.status)?,
        exit_code: r.exit_code,
        command: r.command.clone(),
        argv: argv(&r.argv),
        entrypoint: r.entrypoint.clone(),
        node_id: r.node_id.clone(),
        region: r.region.clone(),
        instance_type: r.instance_type.clone(),
        image: r.image.clone(),
        image_digest: r.image_digest.clone(),
        timeout_seconds: r.timeout_seconds,
        created_at: timestamp_millis(r.created_at_unix_millis),
        started_at: opt_millis(r.started_at_unix_millis),
        completed_at: opt_millis(r.completed_at_unix_millis),
        duration_seconds: duration,
        error_code: error_code_from_pb(r.error_code),
        error_message: r.error_message.clone(),
        pending_reason: r.pending_reason.clone(),
        queue_position: r.queue_position,
        warm_pin: r.warm_pin.clone(),
        stop_requested: r.stop_requested,
        oom_killed: r.oom_killed,
        isolation: isolation_from_pb(r.isolation),
        runtime: r.runtime.clone(),
        price_per_second_usd: nano_usd(r.price_nano_usd_per_second),
        billed_seconds: r.billed_seconds,
        cost_usd: r.cost_nano_usd.map(nano_usd),
        image_pull: r.image_pull.as_ref().map(image_pull),
        stop_grace_seconds: r.stop_grace_seconds,
        files: files(&r.files),
        timeline: timeline(r.timeline.as_ref()),
        attempt: r.attempt.max(1),
        first_attempt_id: r.first_attempt_id.clone(),
        previous_attempt_id: r.previous_attempt_id.clone(),
        next_attempt_id: r.next_attempt_id.clone(),
        retry_cause: retry_cause_from_pb(r.retry_cause),
        retry_policy: r.retry_policy.clone().map(retry_policy_from_pb),
        retry_at: opt_millis(r.not_before_unix_millis),
        final_attempt: match &r.final_attempt {
            Some(f) => Some(FinalAttemptView {
                id: f.id.clone(),
                attempt: f.attempt,
                status: run_status_from_pb(f.status)?,
                exit_code: f.exit_code,
                error_code: error_code_from_pb(f.error_code),
            }),
            None => None,
        },
        schedule_id: r.schedule_id.clone(),
        scheduled_for: opt_millis(r.scheduled_for_unix_millis),
        ephemeral: r.ephemeral.as_ref().map(|e| EphemeralView {
            node_id: e.node_id.clone(),
            connect_by: opt_millis(Some(e.connect_by_unix_millis)).unwrap_or_default(),
        }),
        ephemeral_claim: r.ephemeral_claim.clone(),
        notification: r.notification.as_ref().map(|n| NotificationView {
            url: n.url.clone(),
            status: n.status.clone(),
            attempts_made: n.attempts_made,
            attempts: n
                .attempts
                .iter()
                .map(|a| NotificationAttemptView {
                    attempt: a.attempt,
                    at: opt_millis(Some(a.at_unix_millis)).unwrap_or_default(),
                    status_code: a.status_code,
                    error: a.error.clone(),
                    duration_ms: a.duration_ms,
                })
                .collect(),
            next_attempt_at: opt_millis(n.next_attempt_at_unix_millis),
        }),
    })
}

/// A registry as the API shows it: the password is never returned.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegistryView {
    pub id: String,
    pub name: String,
    pub host: String,
    pub username: String,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
}

pub fn registry(r: &pb::ContainerRegistry) -> RegistryView {
    RegistryView {
        id: r.id.clone(),
        name: r.name.clone(),
        host: r.host.clone(),
        username: r.username.clone(),
        created_at: timestamp_millis(r.created_at_unix_millis),
    }
}

/// One output line of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogView {
    pub id: u64,
    pub stream: LogStream,
    pub msg: String,
    #[schema(required = true, format = DateTime)]
    pub ts: Option<String>,
}

pub fn log(l: &pb::LogEntry) -> Result<LogView, UnknownEnumValue> {
    Ok(LogView {
        id: l.id,
        stream: log_stream_from_pb(l.stream)?,
        msg: l.msg.clone(),
        ts: timestamp_nanos(i128::from(l.ts_unix_nanos)),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub region: String,
    pub status: NodeState,
    pub draining: bool,
    pub total_memory_mib: u64,
    pub free_memory_mib: u64,
    pub cpus: u32,
    pub max_concurrent_runs: u32,
    /// The ids of the runs the node is running.
    pub running_runs: Vec<String>,
    pub cached_images: Vec<String>,
    /// The OCI runtimes the node has: `runc`, and `runsc` when it can take sandboxed runs.
    pub runtimes: Vec<String>,
    pub last_heartbeat_age_seconds: f64,
    /// Why the node's last session with the scheduler ended in an error (e.g. a message the
    /// scheduler could not read), until the node next delivers a report; null when none.
    #[schema(required = true)]
    pub last_error: Option<String>,
}

pub fn node(n: &pb::Node) -> Result<NodeView, UnknownEnumValue> {
    Ok(NodeView {
        id: n.id.clone(),
        region: n.region.clone(),
        status: node_state_from_pb(n.status)?,
        draining: n.draining,
        total_memory_mib: n.total_memory_mib,
        free_memory_mib: n.free_memory_mib,
        cpus: n.cpus,
        max_concurrent_runs: n.max_concurrent_runs,
        running_runs: n.running_run_ids.clone(),
        cached_images: n.cached_images.clone(),
        runtimes: n.runtimes.clone(),
        last_heartbeat_age_seconds: n.last_heartbeat_age_millis as f64 / 1000.0,
        last_error: (!n.last_error.is_empty()).then(|| n.last_error.clone()),
    })
}

/// The log stream's last event: the run has ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunStateView {
    pub status: RunStatus,
    #[schema(required = true)]
    pub exit_code: Option<i32>,
}

/// The log stream's event when the stream broke (the client may resume with `Last-Event-ID`).
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamErrorView {
    pub code: String,
    pub message: String,
}

/// A schedule as the API shows it (secret env values of its runs' overrides as `null`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    pub id: String,
    pub runner_id: String,
    pub cron: String,
    pub timezone: String,
    /// Overrides each fire's run gets; `null`: none.
    #[schema(required = true)]
    pub run: Option<ScheduleRunView>,
    pub overlap: berth_core::schedule::OverlapPolicy,
    pub catch_up: berth_core::schedule::CatchUp,
    pub jitter_seconds: u32,
    pub paused: bool,
    /// The next intended fire time (before jitter); `null` while paused or when the
    /// expression has no future time.
    #[schema(required = true, format = DateTime)]
    pub next_fire_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub last_fire_at: Option<String>,
    #[schema(required = true)]
    pub last_run_id: Option<String>,
    /// Fires that created a run…
    pub fired: u64,
    /// …and fires that did not (overlap `forbid`, missed while the control plane was down).
    pub skipped: u64,
    #[schema(required = true)]
    pub last_skip_reason: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub updated_at: Option<String>,
}

/// The overrides a schedule's runs get.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleRunView {
    #[schema(required = true)]
    pub command: Option<String>,
    #[schema(required = true)]
    pub argv: Option<Vec<String>>,
    #[schema(required = true)]
    pub entrypoint: Option<String>,
    pub env_variables: Vec<EnvVarView>,
    #[schema(required = true)]
    pub stop_grace_seconds: Option<u32>,
    #[schema(required = true)]
    pub retry_policy: Option<RetryPolicy>,
}

pub fn schedule(s: &pb::Schedule) -> ScheduleView {
    fn word<T: serde::de::DeserializeOwned + Default>(w: &str) -> T {
        serde_json::from_value(serde_json::Value::String(w.to_owned())).unwrap_or_default()
    }
    ScheduleView {
        id: s.id.clone(),
        runner_id: s.runner_id.clone(),
        cron: s.cron.clone(),
        timezone: s.timezone.clone(),
        run: s.run.as_ref().map(|r| ScheduleRunView {
            command: r.command.clone(),
            argv: r.argv_set.then(|| r.argv.clone()),
            entrypoint: r.entrypoint.clone(),
            env_variables: env(&r.env_variables),
            stop_grace_seconds: r.stop_grace_seconds,
            retry_policy: r.retry_policy.clone().map(retry_policy_from_pb),
        }),
        overlap: word(&s.overlap),
        catch_up: word(&s.catch_up),
        jitter_seconds: s.jitter_seconds,
        paused: s.paused,
        next_fire_at: if s.paused {
            None
        } else {
            opt_millis(s.next_fire_at_unix_millis)
        },
        last_fire_at: opt_millis(s.last_fire_at_unix_millis),
        last_run_id: s.last_run_id.clone(),
        fired: s.fired,
        skipped: s.skipped,
        last_skip_reason: s.last_skip_reason.clone(),
        created_at: timestamp_millis(s.created_at_unix_millis),
        updated_at: timestamp_millis(s.updated_at_unix_millis),
    }
}
