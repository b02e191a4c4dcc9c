//! The one mapping between the domain types and their gRPC (`berth_proto::v1`) forms on the
//! control side (API ↔ scheduler), and the one mapping of every enum the two contracts share
//! (`common.proto`, and the agent's `ExitReason`). The agent side's messages (reports and
//! commands, see [`crate::agent`]) are converted in the scheduler's agent service, where those
//! messages enter and leave the scheduler, with the enum mappings below.
//!
//! # Enums on the wire
//! A protobuf enum field arrives as an `i32`, which may be 0 (`UNSPECIFIED`) or a value this
//! build does not know (a newer peer's). For an optional word (a run's `error_code`, a runner's
//! `warmup_status`) both mean "none"; where a value is required (a run's `status`, a log line's
//! `stream`, a node's `status`) both are refused with an [`UnknownEnumValue`], which the gRPC
//! edge turns into `invalid_argument` (a request) or `internal` (a reply).

use crate::agent::ExitReason;
use crate::codes::{ErrorCode, NodeState};
use crate::model::{
    Catalog, EnvVar, InstanceType, Isolation, LogEntry, LogStream, Run, RunFile, Runner,
    RunnerSpec, WarmupStatus,
};
use crate::overrides::RunOverrides;
use crate::retry::{RetryCause, RetryPolicy};
use crate::status::RunStatus;
use crate::validate::RunInput;
use berth_proto::v1 as pb;

/// A required enum field held `UNSPECIFIED` or a value this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be a known {kind} value, not {value}")]
pub struct UnknownEnumValue {
    /// The field, as the proto names it (`status`, `stream`).
    pub field: &'static str,
    /// The proto enum (`RunStatus`, `LogStream`).
    pub kind: &'static str,
    pub value: i32,
}

pub fn run_status_to_pb(status: RunStatus) -> pb::RunStatus {
    match status {
        RunStatus::Pending => pb::RunStatus::Pending,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::Canceled => pb::RunStatus::Canceled,
    }
}

/// A run's status from the wire (`Run.status`, `RunState.status`): required.
pub fn run_status_from_pb(value: i32) -> Result<RunStatus, UnknownEnumValue> {
    let unknown = UnknownEnumValue {
        field: "status",
        kind: "RunStatus",
        value,
    };
    match pb::RunStatus::try_from(value).map_err(|_| unknown)? {
        pb::RunStatus::Unspecified => Err(unknown),
        pb::RunStatus::Pending => Ok(RunStatus::Pending),
        pb::RunStatus::Running => Ok(RunStatus::Running),
        pb::RunStatus::Succeeded => Ok(RunStatus::Succeeded),
        pb::RunStatus::Failed => Ok(RunStatus::Failed),
        pb::RunStatus::Canceled => Ok(RunStatus::Canceled),
    }
}

/// None is `UNSPECIFIED` ("no error").
pub fn error_code_to_pb(code: Option<ErrorCode>) -> pb::ErrorCode {
    let Some(code) = code else {
        return pb::ErrorCode::Unspecified;
    };
    match code {
        ErrorCode::ImagePullFailed => pb::ErrorCode::ImagePullFailed,
        ErrorCode::ContainerCreateFailed => pb::ErrorCode::ContainerCreateFailed,
        ErrorCode::NetworkSetupFailed => pb::ErrorCode::NetworkSetupFailed,
        ErrorCode::TaskStartFailed => pb::ErrorCode::TaskStartFailed,
        ErrorCode::TaskFailed => pb::ErrorCode::TaskFailed,
        ErrorCode::InvalidCommand => pb::ErrorCode::InvalidCommand,
        ErrorCode::InvalidSpec => pb::ErrorCode::InvalidSpec,
        ErrorCode::FilesFailed => pb::ErrorCode::FilesFailed,
        ErrorCode::JournalFailed => pb::ErrorCode::JournalFailed,
        ErrorCode::KillFailed => pb::ErrorCode::KillFailed,
        ErrorCode::StartFailed => pb::ErrorCode::StartFailed,
        ErrorCode::NodeLost => pb::ErrorCode::NodeLost,
        ErrorCode::NodeRestarted => pb::ErrorCode::NodeRestarted,
        ErrorCode::NodeDraining => pb::ErrorCode::NodeDraining,
        ErrorCode::Timeout => pb::ErrorCode::Timeout,
        ErrorCode::OomKilled => pb::ErrorCode::OomKilled,
        ErrorCode::InvalidUser => pb::ErrorCode::InvalidUser,
        ErrorCode::DiskLimitExceeded => pb::ErrorCode::DiskLimitExceeded,
    }
}

/// An error code from the wire (`Run.error_code`, `RunExited.error_code`): optional, so
/// `UNSPECIFIED` and values this build does not know are None.
pub fn error_code_from_pb(value: i32) -> Option<ErrorCode> {
    Some(match pb::ErrorCode::try_from(value).ok()? {
        pb::ErrorCode::Unspecified => return None,
        pb::ErrorCode::ImagePullFailed => ErrorCode::ImagePullFailed,
        pb::ErrorCode::ContainerCreateFailed => ErrorCode::ContainerCreateFailed,
        pb::ErrorCode::NetworkSetupFailed => ErrorCode::NetworkSetupFailed,
        pb::ErrorCode::TaskStartFailed => ErrorCode::TaskStartFailed,
        pb::ErrorCode::TaskFailed => ErrorCode::TaskFailed,
        pb::ErrorCode::InvalidCommand => ErrorCode::InvalidCommand,
        pb::ErrorCode::InvalidSpec => ErrorCode::InvalidSpec,
        pb::ErrorCode::FilesFailed => ErrorCode::FilesFailed,
        pb::ErrorCode::JournalFailed => ErrorCode::JournalFailed,
        pb::ErrorCode::KillFailed => ErrorCode::KillFailed,
        pb::ErrorCode::StartFailed => ErrorCode::StartFailed,
        pb::ErrorCode::NodeLost => ErrorCode::NodeLost,
        pb::ErrorCode::NodeRestarted => ErrorCode::NodeRestarted,
        pb::ErrorCode::NodeDraining => ErrorCode::NodeDraining,
        pb::ErrorCode::Timeout => ErrorCode::Timeout,
        pb::ErrorCode::OomKilled => ErrorCode::OomKilled,
        pb::ErrorCode::InvalidUser => ErrorCode::InvalidUser,
        pb::ErrorCode::DiskLimitExceeded => ErrorCode::DiskLimitExceeded,
    })
}

pub fn node_state_to_pb(state: NodeState) -> pb::NodeState {
    match state {
        NodeState::Ready => pb::NodeState::Ready,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Disconnected => pb::NodeState::Disconnected,
        NodeState::Lost => pb::NodeState::Lost,
    }
}

/// A node's state from the wire (`Node.status`): required.
pub fn node_state_from_pb(value: i32) -> Result<NodeState, UnknownEnumValue> {
    let unknown = UnknownEnumValue {
        field: "status",
        kind: "NodeState",
        value,
    };
    match pb::NodeState::try_from(value).map_err(|_| unknown)? {
        pb::NodeState::Unspecified => Err(unknown),
        pb::NodeState::Ready => Ok(NodeState::Ready),
        pb::NodeState::Draining => Ok(NodeState::Draining),
        pb::NodeState::Disconnected => Ok(NodeState::Disconnected),
        pb::NodeState::Lost => Ok(NodeState::Lost),
    }
}

/// None (no warmup yet) is `UNSPECIFIED`.
pub fn warmup_status_to_pb(status: Option<WarmupStatus>) -> pb::WarmupStatus {
    match status {
        None => pb::WarmupStatus::Unspecified,
        Some(WarmupStatus::Pending) => pb::WarmupStatus::Pending,
        Some(WarmupStatus::Ready) => pb::WarmupStatus::Ready,
        Some(WarmupStatus::Failed) => pb::WarmupStatus::Failed,
    }
}

/// A runner's warmup status from the wire (`Runner.warmup_status`): optional, so
/// `UNSPECIFIED` and values this build does not know are None.
pub fn warmup_status_from_pb(value: i32) -> Option<WarmupStatus> {
    match pb::WarmupStatus::try_from(value).ok()? {
        pb::WarmupStatus::Unspecified => None,
        pb::WarmupStatus::Pending => Some(WarmupStatus::Pending),
        pb::WarmupStatus::Ready => Some(WarmupStatus::Ready),
        pb::WarmupStatus::Failed => Some(WarmupStatus::Failed),
    }
}

pub fn log_stream_to_pb(stream: LogStream) -> pb::LogStream {
    match stream {
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
    }
}

/// A log line's stream from the wire (`LogLine.stream`, `LogEntry.stream`): required.
pub fn log_stream_from_pb(value: i32) -> Result<LogStream, UnknownEnumValue> {
    let unknown = UnknownEnumValue {
        field: "stream",
        kind: "LogStream",
        value,
    };
    match pb::LogStream::try_from(value).map_err(|_| unknown)? {
        pb::LogStream::Unspecified => Err(unknown),
        pb::LogStream::Stdout => Ok(LogStream::Stdout),
        pb::LogStream::Stderr => Ok(LogStream::Stderr),
    }
}

pub fn exit_reason_to_pb(reason: ExitReason) -> pb::ExitReason {
    match reason {
        ExitReason::Unspecified => pb::ExitReason::Unspecified,
        ExitReason::Exited => pb::ExitReason::Exited,
        ExitReason::Timeout => pb::ExitReason::Timeout,
        ExitReason::Stopped => pb::ExitReason::Stopped,
        ExitReason::StartFailed => pb::ExitReason::StartFailed,
    }
}

/// Why a run ended, from the wire (`RunExited.reason`). The domain has a word for "the agent did
/// not say" ([`ExitReason::Unspecified`], treated as a failure), and a reason this build does not
/// know (a newer agent's) is one too.
pub fn exit_reason_from_pb(value: i32) -> ExitReason {
    match pb::ExitReason::try_from(value) {
        Ok(pb::ExitReason::Exited) => ExitReason::Exited,
        Ok(pb::ExitReason::Timeout) => ExitReason::Timeout,
        Ok(pb::ExitReason::Stopped) => ExitReason::Stopped,
        Ok(pb::ExitReason::StartFailed) => ExitReason::StartFailed,
        Ok(pb::ExitReason::Unspecified) | Err(_) => ExitReason::Unspecified,
    }
}

/// Checked files as the API hands them to the control service.
pub fn files_to_upload_pb(files: &[RunFile]) -> Vec<pb::FileUpload> {
    files
        .iter()
        .map(|f| pb::FileUpload {
            path: f.path.clone(),
            content: f.content.to_vec(),
            mode: f.mode,
        })
        .collect()
}

/// A run's overrides as the API sends them (a `CreateRunRequest`'s or a batch item): the
/// files travel as the bytes the API decoded.
pub fn overrides_to_pb(overrides: RunOverrides) -> pb::RunOverrides {
    let (input, files) = overrides.into_parts();
    pb::RunOverrides {
        argv_set: input.argv.is_some(),
        argv: input.argv.unwrap_or_default(),
        command: input.command,
        entrypoint: input.entrypoint,
        env_variables: env_to_pb(&input.env_variables.unwrap_or_default()),
        files: files_to_upload_pb(&files),
        stop_grace_seconds: input.stop_grace_seconds.and_then(|g| u32::try_from(g).ok()),
        retry_policy: input.retry_policy.as_ref().map(retry_policy_to_pb),
        ephemeral: input.ephemeral,
    }
}

pub fn retry_policy_to_pb(p: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: p.max_attempts,
        backoff_seconds: p.backoff_seconds,
        backoff_multiplier: p.backoff_multiplier,
        max_backoff_seconds: p.max_backoff_seconds,
        retry_on: p.retry_on.iter().copied().map(retry_cause_to_pb).collect(),
        exit_codes: p.exit_codes.clone(),
    }
}

pub fn retry_cause_to_pb(c: RetryCause) -> i32 {
    i32::from(match c {
        RetryCause::ExitCode => pb::RetryCause::ExitCode,
        RetryCause::NodeLost => pb::RetryCause::NodeLost,
        RetryCause::OomKilled => pb::RetryCause::OomKilled,
        RetryCause::ImagePullFailed => pb::RetryCause::ImagePullFailed,
        RetryCause::Timeout => pb::RetryCause::Timeout,
    })
}

/// None for UNSPECIFIED (no cause) and for a value this build does not know.
pub fn retry_cause_from_pb(v: i32) -> Option<RetryCause> {
    Some(match pb::RetryCause::try_from(v).ok()? {
        pb::RetryCause::Unspecified => return None,
        pb::RetryCause::ExitCode => RetryCause::ExitCode,
        pb::RetryCause::NodeLost => RetryCause::NodeLost,
        pb::RetryCause::OomKilled => RetryCause::OomKilled,
        pb::RetryCause::ImagePullFailed => RetryCause::ImagePullFailed,
        pb::RetryCause::Timeout => RetryCause::Timeout,
    })
}

/// The policy a message carries; a cause value this build does not know is dropped (the API
/// only sends the ones it parsed).
pub fn retry_policy_from_pb(p: pb::RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_attempts: p.max_attempts,
        backoff_seconds: p.backoff_seconds,
        backoff_multiplier: p.backoff_multiplier,
        max_backoff_seconds: p.max_backoff_seconds,
        retry_on: p
            .retry_on
            .into_iter()
            .filter_map(retry_cause_from_pb)
            .collect(),
        exit_codes: p.exit_codes,
    }
}

/// A run's overrides as the scheduler receives them (a `CreateRunRequest`'s, where a missing
/// message is `pb::RunOverrides::default()`, or a batch item), the files kept as the bytes they
/// arrive as. Not checked yet: [`RunOverrides::validate`].
pub fn overrides_from_pb(o: pb::RunOverrides) -> RunOverrides {
    let input = RunInput {
        argv: o.argv_set.then_some(o.argv),
        command: o.command,
        entrypoint: o.entrypoint,
        env_variables: (!o.env_variables.is_empty()).then(|| env_from_pb(o.env_variables)),
        files: None,
        stop_grace_seconds: o.stop_grace_seconds.map(i64::from),
        retry_policy: o.retry_policy.map(retry_policy_from_pb),
        ephemeral: o.ephemeral,
    };
    let files = o
        .files
        .into_iter()
        .map(|f| RunFile::new(f.path, f.mode, f.content))
        .collect();
    RunOverrides::decoded(input, files)
}

/// What the control service tells about a run's files: never their content.
pub fn file_infos_pb(files: &[RunFile]) -> Vec<pb::RunFileInfo> {
    files
        .iter()
        .map(|f| pb::RunFileInfo {
            path: f.path.clone(),
            mode: f.mode,
            size_bytes: f.size_bytes,
            sha256: f.sha256.clone(),
        })
        .collect()
}

pub fn env_to_pb(env: &[EnvVar]) -> Vec<pb::EnvVar> {
    env.iter()
        .map(|e| pb::EnvVar {
            key: e.env_key.clone(),
            value: e.env_val.clone(),
            secret: e.secret,
        })
        .collect()
}

pub fn env_from_pb(env: Vec<pb::EnvVar>) -> Vec<EnvVar> {
    env.into_iter()
        .map(|e| EnvVar {
            env_key: e.key,
            env_val: e.value,
            secret: e.secret,
        })
        .collect()
}

impl From<&RunnerSpec> for pb::RunnerSpec {
    fn from(s: &RunnerSpec) -> Self {
        pb::RunnerSpec {
            name: s.name.clone(),
            image_name: s.image_name.clone(),
            image_tag: s.image_tag.clone(),
            run_command: s.run_command.clone(),
            argv: s.argv.clone(),
            entrypoint: s.entrypoint.clone(),
            timeout_seconds: s.timeout_seconds,
            region: s.region.clone(),
            instance_type: s.instance_type.clone(),
            env_variables: env_to_pb(&s.env_variables),
            container_registry_id: s.container_registry_id.clone(),
            stop_grace_seconds: s.stop_grace_seconds,
            max_concurrent_runs: s.max_concurrent_runs,
            retry_policy: s.retry_policy.as_ref().map(retry_policy_to_pb),
            notify_url: s.notify.as_ref().map(|n| n.url.clone()),
            notify_secret: s.notify.as_ref().map(|n| n.secret.clone()),
            isolation: isolation_to_pb(s.isolation).into(),
        }
    }
}

pub fn isolation_to_pb(i: Isolation) -> pb::Isolation {
    match i {
        Isolation::Container => pb::Isolation::Container,
        Isolation::Sandbox => pb::Isolation::Sandbox,
    }
}

/// An unknown value (a newer peer's) reads as the strongest isolation Berth knows, never a
/// weaker one.
pub fn isolation_from_pb(v: i32) -> Isolation {
    match pb::Isolation::try_from(v) {
        Ok(pb::Isolation::Container) => Isolation::Container,
        Ok(pb::Isolation::Sandbox) | Err(_) => Isolation::Sandbox,
    }
}

impl From<pb::RunnerSpec> for RunnerSpec {
    fn from(s: pb::RunnerSpec) -> Self {
        RunnerSpec {
            name: s.name,
            image_name: s.image_name,
            image_tag: s.image_tag,
            run_command: s.run_command,
            argv: s.argv,
            entrypoint: s.entrypoint,
            timeout_seconds: s.timeout_seconds,
            region: s.region,
            instance_type: s.instance_type,
            env_variables: env_from_pb(s.env_variables),
            container_registry_id: s.container_registry_id.filter(|id| !id.is_empty()),
            stop_grace_seconds: s.stop_grace_seconds,
            max_concurrent_runs: s.max_concurrent_runs,
            retry_policy: s.retry_policy.map(retry_policy_from_pb),
            notify: s.notify_url.map(|url| crate::webhook::Notify {
                url,
                secret: s.notify_secret.unwrap_or_default(),
            }),
            isolation: isolation_from_pb(s.isolation),
        }
    }
}

/// A runner with the store revision it was read at, as the control service answers it: secret
/// values are blanked (they never leave the scheduler except inside a node's `RunSpec`).
pub fn runner_to_pb(r: &Runner, revision: u64) -> pb::Runner {
    let mut spec: pb::RunnerSpec = (&r.spec).into();
    for e in spec.env_variables.iter_mut().filter(|e| e.secret) {
        e.value.clear();
    }
    if let Some(secret) = spec.notify_secret.as_mut() {
        // Write-only: present (so the API can say it is set), never its value.
        secret.clear();
    }
    pb::Runner {
        id: r.id.clone(),
        spec: Some(spec),
        warmed_at_unix_millis: r.warmed_at,
        created_at_unix_millis: r.created_at,
        updated_at_unix_millis: r.updated_at,
        revision,
        warmup_status: warmup_status_to_pb(r.warmup.as_ref().map(|w| w.status)).into(),
        warm_node_id: r.warmup.as_ref().map(|w| w.node_id.clone()),
        warmup_error: r.warmup.as_ref().and_then(|w| w.error.clone()),
        warmup_image_pull: None,
        warm_sandboxes: r.warmup.as_ref().map_or(0, |w| w.sandboxes),
    }
}

impl From<&Catalog> for pb::Catalog {
    fn from(c: &Catalog) -> Self {
        pb::Catalog {
            regions: c.regions.clone(),
            instance_types: c
                .instance_types
                .iter()
                .map(|t| pb::InstanceType {
                    slug: t.slug.clone(),
                    cpu_millis: t.cpu_millis,
                    memory_mib: t.memory_mib,
                    price_per_second_usd: t.price_per_second_usd,
                    isolation: t.isolation.map(|i| isolation_to_pb(i).into()),
                })
                .collect(),
        }
    }
}

impl From<pb::Catalog> for Catalog {
    fn from(c: pb::Catalog) -> Self {
        Catalog {
            regions: c.regions,
            instance_types: c
                .instance_types
                .into_iter()
                .map(|t| InstanceType {
                    slug: t.slug,
                    cpu_millis: t.cpu_millis,
                    memory_mib: t.memory_mib,
                    price_per_second_usd: t.price_per_second_usd,
                    isolation: t.isolation.map(isolation_from_pb),
                })
                .collect(),
        }
    }
}

impl From<&Run> for pb::Run {
    fn from(r: &Run) -> Self {
        pb::Run {
            id: r.id.clone(),
            runner_id: r.runner_id.clone(),
            status: run_status_to_pb(r.status).into(),
            exit_code: r.exit_code,
            command: r.command.clone(),
            argv: r.argv.clone(),
            entrypoint: r.entrypoint.clone(),
            node_id: r.node_id.clone(),
            region: r.region.clone(),
            instance_type: r.instance_type.clone(),
            image: r.image.clone(),
            image_digest: r.image_digest.clone(),
            timeout_seconds: r.timeout_seconds,
            created_at_unix_millis: r.created_at,
            started_at_unix_millis: r.started_at,
            completed_at_unix_millis: r.completed_at,
            error_code: error_code_to_pb(r.error_code).into(),
            error_message: r.error_message.clone(),
            pending_reason: r.pending_reason.clone(),
            stop_requested: r.stop_requested,
            queue_position: r.queue_position,
            warm_pin: r.warm_pin.clone(),
            container_registry_id: r.container_registry_id.clone(),
            oom_killed: r.oom_killed,
            price_nano_usd_per_second: r.price_nano_usd_per_second,
            billed_seconds: r.duration_seconds(),
            cost_nano_usd: r.cost_nano_usd(),
            files: file_infos_pb(&r.files),
            stop_grace_seconds: r.stop_grace_seconds,
            image_pull: r.image_pull.as_ref().map(pb::ImagePull::from),
            timeline: (!r.timeline.is_empty()).then(|| timeline_pb(&r.timeline)),
            attempt: r.attempt,
            first_attempt_id: r.first_attempt_id.clone(),
            previous_attempt_id: r.previous_attempt_id.clone(),
            next_attempt_id: r.next_attempt_id.clone(),
            retry_policy: r.retry_policy.as_ref().map(retry_policy_to_pb),
            not_before_unix_millis: r.not_before,
            retry_cause: r.retry_cause.map_or(0, retry_cause_to_pb),
            schedule_id: r.schedule_id.clone(),
            scheduled_for_unix_millis: r.scheduled_for,
            ephemeral: r.ephemeral.as_ref().map(|e| pb::EphemeralNode {
                node_id: e.node_id.clone(),
                connect_by_unix_millis: e.connect_by,
            }),
            ephemeral_claim: r.ephemeral.as_ref().and_then(|e| e.claim.clone()),
            notification: r.notification.as_ref().map(|d| pb::WebhookDelivery {
                url: d.url.clone(),
                status: d.status.as_str().to_owned(),
                attempts: d
                    .attempts
                    .iter()
                    .map(|a| pb::WebhookAttempt {
                        attempt: a.attempt,
                        at_unix_millis: a.at,
                        status_code: a.status_code.map(u32::from),
                        error: a.error.clone(),
                        duration_ms: a.duration_ms,
                    })
                    .collect(),
                attempts_made: d.attempts_made,
                next_attempt_at_unix_millis: d.next_attempt_at,
            }),
            final_attempt: r.final_attempt.as_ref().map(|f| pb::FinalAttempt {
                id: f.id.clone(),
                attempt: f.attempt,
                status: run_status_to_pb(f.status).into(),
                exit_code: f.exit_code,
                error_code: error_code_to_pb(f.error_code).into(),
            }),
            isolation: isolation_to_pb(r.isolation).into(),
            runtime: r.runtime.clone(),
        }
    }
}

fn timeline_pb(t: &crate::model::Timeline) -> pb::RunTimeline {
    pb::RunTimeline {
        created: t.created,
        assigned: t.assigned,
        received: t.received,
        image_ready: t.image_ready,
        prepared: t.prepared,
        network_ready: t.network_ready,
        task_created: t.task_created,
        started: t.started,
        exited: t.exited,
        exit_reported: t.exit_reported,
        ended: t.ended,
        sandbox: t.sandbox,
    }
}

impl From<&crate::model::ImagePull> for pb::ImagePull {
    fn from(p: &crate::model::ImagePull) -> Self {
        pb::ImagePull {
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            layers_done: p.layers_done,
            layers_total: p.layers_total,
        }
    }
}

impl From<&LogEntry> for pb::LogEntry {
    fn from(l: &LogEntry) -> Self {
        pb::LogEntry {
            id: l.id,
            stream: log_stream_to_pb(l.stream).into(),
            msg: l.msg.clone(),
            ts_unix_nanos: l.ts_unix_nanos,
        }
    }
}

/// A snake_case enum word as the proto carries it (`"forbid"`), or its value from one; an
/// unknown word is an error naming `field` (the API parsed the word, so only a mismatched
/// build sends one).
fn word<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn from_word<T: serde::de::DeserializeOwned>(
    field: &str,
    w: Option<String>,
) -> Result<Option<T>, crate::validate::ValidationErrors> {
    w.map(|w| {
        serde_json::from_value(serde_json::Value::String(w.clone())).map_err(|_| {
            crate::validate::ValidationErrors::single(field, format!("unknown value `{w}`"))
        })
    })
    .transpose()
}

pub fn schedule_input_to_pb(i: &crate::schedule::ScheduleInput) -> pb::ScheduleInput {
    pb::ScheduleInput {
        cron: i.cron.clone(),
        timezone: i.timezone.clone(),
        run: i
            .run
            .clone()
            .map(|r| overrides_to_pb(RunOverrides::decoded(r, Vec::new()))),
        overlap: i.overlap.map(word),
        catch_up: i.catch_up.map(word),
        jitter_seconds: i.jitter_seconds,
        paused: i.paused,
    }
}

pub fn schedule_input_from_pb(
    i: pb::ScheduleInput,
) -> Result<crate::schedule::ScheduleInput, crate::validate::ValidationErrors> {
    Ok(crate::schedule::ScheduleInput {
        cron: i.cron,
        timezone: i.timezone,
        run: i.run.map(|r| overrides_from_pb(r).into_parts().0),
        overlap: from_word("overlap", i.overlap)?,
        catch_up: from_word("catch_up", i.catch_up)?,
        jitter_seconds: i.jitter_seconds,
        paused: i.paused,
    })
}

/// A schedule as the control service answers it: secret values blanked.
pub fn schedule_to_pb(s: &crate::schedule::Schedule) -> pb::Schedule {
    let run = s.run.clone().map(|r| {
        let mut pb = overrides_to_pb(RunOverrides::decoded(r, Vec::new()));
        for e in pb.env_variables.iter_mut().filter(|e| e.secret) {
            e.value.clear();
        }
        pb
    });
    pb::Schedule {
        id: s.id.clone(),
        runner_id: s.runner_id.clone(),
        cron: s.cron.clone(),
        timezone: s.timezone.clone(),
        run,
        overlap: word(s.overlap),
        catch_up: word(s.catch_up),
        jitter_seconds: s.jitter_seconds,
        paused: s.paused,
        next_fire_at_unix_millis: s.next_fire_at,
        last_fire_at_unix_millis: s.last_fire_at,
        last_run_id: s.last_run_id.clone(),
        fired: s.fired,
        skipped: s.skipped,
        last_skip_reason: s.last_skip_reason.clone(),
        created_at_unix_millis: s.created_at,
        updated_at_unix_millis: s.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_statuses_round_trip_and_unspecified_is_refused() {
        for status in RunStatus::ALL {
            let wire = i32::from(run_status_to_pb(status));
            assert_eq!(run_status_from_pb(wire), Ok(status));
            // The proto value's name is the domain name, prefixed.
            assert_eq!(
                run_status_to_pb(status).as_str_name(),
                format!("RUN_STATUS_{}", status.as_str().to_uppercase())
            );
        }
        for bad in [pb::RunStatus::Unspecified as i32, 99, -1] {
            assert_eq!(
                run_status_from_pb(bad),
                Err(UnknownEnumValue {
                    field: "status",
                    kind: "RunStatus",
                    value: bad
                })
            );
        }
    }

    #[test]
    fn error_codes_round_trip_and_unspecified_is_none() {
        for code in ErrorCode::ALL {
            let wire = error_code_to_pb(Some(code));
            assert_eq!(error_code_from_pb(wire.into()), Some(code));
            assert_eq!(
                wire.as_str_name(),
                format!("ERROR_CODE_{}", code.as_str().to_uppercase())
            );
        }
        assert_eq!(error_code_to_pb(None), pb::ErrorCode::Unspecified);
        assert_eq!(error_code_from_pb(pb::ErrorCode::Unspecified.into()), None);
        assert_eq!(error_code_from_pb(999), None, "a newer peer's code");
    }

    #[test]
    fn node_states_round_trip_and_unspecified_is_refused() {
        for state in NodeState::ALL {
            let wire = node_state_to_pb(state);
            assert_eq!(node_state_from_pb(wire.into()), Ok(state));
            assert_eq!(
                wire.as_str_name(),
                format!("NODE_STATE_{}", state.as_str().to_uppercase())
            );
        }
        assert!(node_state_from_pb(pb::NodeState::Unspecified.into()).is_err());
        assert!(node_state_from_pb(17).is_err());
    }

    #[test]
    fn warmup_statuses_round_trip_and_unspecified_is_none() {
        for status in [
            WarmupStatus::Pending,
            WarmupStatus::Ready,
            WarmupStatus::Failed,
        ] {
            let wire = warmup_status_to_pb(Some(status));
            assert_eq!(warmup_status_from_pb(wire.into()), Some(status));
            assert_eq!(
                wire.as_str_name(),
                format!("WARMUP_STATUS_{}", status.as_str().to_uppercase())
            );
        }
        assert_eq!(warmup_status_to_pb(None), pb::WarmupStatus::Unspecified);
        assert_eq!(warmup_status_from_pb(0), None);
        assert_eq!(warmup_status_from_pb(42), None);
    }

    #[test]
    fn log_streams_round_trip_and_unspecified_is_refused() {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let wire = log_stream_to_pb(stream);
            assert_eq!(log_stream_from_pb(wire.into()), Ok(stream));
            assert_eq!(
                wire.as_str_name(),
                format!("LOG_STREAM_{}", stream.as_str().to_uppercase())
            );
        }
        let err = log_stream_from_pb(pb::LogStream::Unspecified.into());
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("stream must be a known LogStream value, not 0".to_owned())
        );
        assert!(log_stream_from_pb(3).is_err());
    }

    #[test]
    fn exit_reasons_round_trip_and_unknown_ones_are_unspecified() {
        for reason in [
            ExitReason::Unspecified,
            ExitReason::Exited,
            ExitReason::Timeout,
            ExitReason::Stopped,
            ExitReason::StartFailed,
        ] {
            assert_eq!(
                exit_reason_from_pb(exit_reason_to_pb(reason).into()),
                reason
            );
        }
        assert_eq!(exit_reason_from_pb(99), ExitReason::Unspecified);
    }

    #[test]
    fn a_run_carries_its_enums_on_the_wire() {
        let record = r#"{"id":"r","runner_id":"x","status":"failed","exit_code":null,
            "command":null,"argv":[],"entrypoint":null,"env":[],"image":"i","image_digest":null,
            "region":"fra","instance_type":"standard-s","memory_mib":1024,"cpu_millis":1000,
            "timeout_seconds":10,"node_id":null,"lease_epoch":0,"created_at":0,
            "started_at":null,"completed_at":1,"error_code":"image_pull_failed",
            "error_message":"401","pending_reason":null,"stop_requested":false}"#;
        let run: Run = serde_json::from_str(record).expect("an old record reads");
        let wire = pb::Run::from(&run);
        assert_eq!(wire.status(), pb::RunStatus::Failed);
        assert_eq!(wire.error_code(), pb::ErrorCode::ImagePullFailed);
        let running = Run {
            status: RunStatus::Running,
            error_code: None,
            ..run
        };
        let wire = pb::Run::from(&running);
        assert_eq!(wire.status(), pb::RunStatus::Running);
        assert_eq!(wire.error_code, 0, "no error is UNSPECIFIED");
    }

    #[test]
    fn overrides_survive_the_wire_with_their_files_as_bytes() {
        use crate::validate::FileInput;
        let input = RunInput {
            argv: Some(vec!["a".into()]),
            env_variables: Some(vec![EnvVar {
                env_key: "K".into(),
                env_val: "v".into(),
                secret: true,
            }]),
            files: Some(vec![FileInput {
                path: Some("/etc/x".into()),
                content_base64: Some("aGVsbG8=".into()),
                mode: Some(0o600),
            }]),
            stop_grace_seconds: Some(9),
            ..Default::default()
        };
        let wire = overrides_to_pb(RunOverrides::from_input(input).expect("valid"));
        assert!(wire.argv_set);
        assert_eq!(wire.files[0].content, b"hello", "bytes, not base64");
        assert_eq!(wire.stop_grace_seconds, Some(9));
        let back = overrides_from_pb(wire).validate().expect("still valid");
        assert_eq!(back.input().argv.as_deref(), Some(&["a".to_owned()][..]));
        assert_eq!(back.input().stop_grace_seconds, Some(9));
        assert!(back
            .input()
            .env_variables
            .as_ref()
            .is_some_and(|e| e[0].secret));
        assert_eq!(back.files()[0].mode, 0o600);
        assert_eq!(&*back.files()[0].content, b"hello");

        // No overrides at all: nothing set.
        let none = overrides_from_pb(pb::RunOverrides::default());
        assert!(none.input().argv.is_none() && none.input().env_variables.is_none());
        assert!(none.files().is_empty());

        // What arrives is checked again, the files as bytes, named as the API names them.
        let bad = pb::RunOverrides {
            argv_set: true,
            command: Some("x".into()),
            files: vec![pb::FileUpload {
                path: "/proc/x".into(),
                content: vec![],
                mode: 0o1777,
            }],
            ..Default::default()
        };
        let fields: Vec<String> = overrides_from_pb(bad)
            .validate()
            .err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default();
        assert_eq!(
            fields,
            ["argv", "argv", "files[0].path", "files[0].mode"],
            "argv with command, empty argv; then the file"
        );
    }
}
