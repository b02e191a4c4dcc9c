//! Supervises one run from assignment to its final report:
//! pull → build spec → journal → create task → watch exit → start → (exit | timeout | stop) →
//! drain logs → record the exit → clean up → `RunExited`. Every path, failures included, ends
//! with cleanup and exactly one `RunExited`, and every log line of the run is queued before that
//! `RunExited`. [`resume`] is the same ending for a run an earlier agent process left behind.

use berth_core::telemetry::step;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use berth_core::codes::ErrorCode;
use berth_core::convert::{error_code_to_pb, isolation_from_pb};
use berth_core::defaults::STOP_GRACE_SECONDS;
use berth_core::status::TIMEOUT_EXIT_CODE;
use berth_proto::v1::{
    agent_message::Body, ExitReason, RunExited, RunReleased, RunSpec, RunStarted, StartStages,
};
use tokio::sync::watch;

use crate::clock::unix_nanos_now;
use crate::image::progress::run_report;
use crate::outbox::SharedOutbox;
use crate::run::files::{add_mounts, remove_files, write_files};
use crate::run::journal::{ExitRecord, Journal, RunDir, RunRecord};
use crate::run::logs::{LogLimits, LogPump};
use crate::run::output_closed::OutputClosed;
use crate::run::sandboxes::Sandboxes;
use crate::run::spec::{build_spec, SpecInputs};
use crate::run::user::resolve as resolve_user;
use crate::runtime::{
    pull_reporting, ContainerRuntime, ExitWatch, OutputFiles, PreparedImage, RuntimeError,
    StopSignal, TaskExit,
};

/// Grace period between SIGTERM and SIGKILL when the run does not set one.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(STOP_GRACE_SECONDS as u64);
/// How long to wait for the exit after SIGKILL before giving up on the task.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Upper bound for cleanup, so a hung containerd cannot keep the exit report back forever.
const CLEANUP_LIMIT: Duration = Duration::from_secs(15);

/// One assignment from the scheduler.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub run_id: String,
    pub lease_epoch: u64,
    pub spec: RunSpec,
    /// The run's runner (empty from a scheduler that does not say).
    pub runner_id: String,
    /// W3C `traceparent` of the run's placement (while traces are exported).
    pub trace_parent: Option<String>,
}

/// Node-level settings a supervisor needs.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub cgroup_parent: String,
    /// `pids.max` of every run's cgroup.
    pub pids_limit: i64,
    pub log_limits: LogLimits,
    /// Most bytes a run may write to its own filesystem (its writable layer); None: unbounded.
    pub max_disk_bytes: Option<u64>,
    /// Ready sandboxes a run of a warmed runner may start in; None: every run creates its own.
    pub sandboxes: Option<Arc<Sandboxes>>,
    /// The node's OCI runtimes: which one a run gets, as its start report says.
    pub runtimes: crate::oci_runtimes::OciRuntimes,
}

/// How often a running run's writable layer is measured against `max_disk_bytes`.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How the run ended, before it becomes a `RunExited`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ending {
    reason: ExitReason,
    exit_code: i32,
    exited_at_unix_nanos: i64,
    error_code: Option<ErrorCode>,
    error_message: String,
    /// The kernel's OOM killer ended a process of the run, and the run failed.
    oom_killed: bool,
}

impl Ending {
    fn start_failed(code: ErrorCode, message: String) -> Self {
        Self {
            reason: ExitReason::StartFailed,
            exit_code: -1,
            exited_at_unix_nanos: 0,
            error_code: Some(code),
            error_message: message,
            oom_killed: false,
        }
    }

    fn to_record(&self) -> ExitRecord {
        ExitRecord {
            reason: self.reason as i32,
            exit_code: self.exit_code,
            exited_at_unix_nanos: self.exited_at_unix_nanos,
            error_code: self
                .error_code
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            error_message: self.error_message.clone(),
            oom_killed: self.oom_killed,
        }
    }

    fn from_record(record: ExitRecord) -> Self {
        Self {
            reason: record.reason(),
            exit_code: record.exit_code,
            exited_at_unix_nanos: record.exited_at_unix_nanos,
            // "" (no error) and a code this agent does not know both read as none.
            error_code: record.error_code.parse().ok(),
            error_message: record.error_message,
            oom_killed: record.oom_killed,
        }
    }

    fn stopped_before_start() -> Self {
        Self {
            reason: ExitReason::Stopped,
            exit_code: -1,
            exited_at_unix_nanos: 0,
            error_code: None,
            error_message: "stopped before the run started".to_string(),
            oom_killed: false,
        }
    }
}

/// Runs `assignment` to completion. `stop` flips to true when the scheduler sends `StopRun`.
/// Returns the outbox sequence number of the `RunExited` report.
pub async fn supervise<R: ContainerRuntime>(
    runtime: Arc<R>,
    settings: SupervisorSettings,
    journal: Journal,
    assignment: Assignment,
    mut stop: watch::Receiver<bool>,
    outbox: SharedOutbox,
) -> u64 {
    let mut stages = StartStages {
        received_at_unix_nanos: unix_nanos_now(),
        ..StartStages::default()
    };
    let span = run_span(&assignment);
    async {
        let (ending, run_dir) = run_until_exit(
            &*runtime,
            &settings,
            &journal,
            &assignment,
            &mut stop,
            &outbox,
            &mut stages,
        )
        .await;
        finish(
            &*runtime,
            &assignment.run_id,
            assignment.lease_epoch,
            ending,
            run_dir.as_ref(),
            &outbox,
        )
        .instrument(step("finish"))
        .await
    }
    .instrument(span)
    .await
}

/// The span of a run's life on this node, in the trace of its placement (while traces are
/// exported; none otherwise: its log lines carry the run id anyway).
fn run_span(assignment: &Assignment) -> tracing::Span {
    if !berth_core::telemetry::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "run",
        otel.name = "run",
        run_id = %assignment.run_id,
        runner_id = %assignment.runner_id,
        lease_epoch = assignment.lease_epoch,
        trace_id = tracing::field::Empty,
    );
    berth_core::telemetry::follow(&span, assignment.trace_parent.as_deref());
    span
}

/// Takes over a run an earlier agent process left in `run_dir` (it was killed or crashed):
/// re-queues its `RunStarted` and unacknowledged log lines, and then either re-sends the exit it
/// had recorded or re-adopts the still-existing task — output tailing resumes where the line
/// log ends, the timeout counts from the original start — and ends it as [`supervise`] does.
/// Returns the outbox sequence number of the `RunExited` report.
pub async fn resume<R: ContainerRuntime>(
    runtime: Arc<R>,
    settings: SupervisorSettings,
    run_dir: RunDir,
    record: RunRecord,
    recorded_exit: Option<ExitRecord>,
    mut stop: watch::Receiver<bool>,
    outbox: SharedOutbox,
) -> u64 {
    let run_id = record.run_id.as_str();
    if let Some(started_at) = record.started_at_unix_nanos {
        outbox.push(Body::RunStarted(RunStarted {
            run_id: run_id.to_string(),
            lease_epoch: record.lease_epoch,
            started_at_unix_nanos: started_at,
            image_digest: record.image_digest.clone(),
            // Not kept across a restart: the scheduler has them from the first report.
            stages: None,
            runtime: settings
                .runtimes
                .describe(isolation_from_pb(record.spec.isolation))
                .unwrap_or_default(),
        }));
    }
    let mut pump = match LogPump::start(
        run_id.to_string(),
        &run_dir,
        run_dir.read_acked(),
        settings.log_limits,
        record.spec.env.values().map(String::as_str),
        outbox.clone(),
    ) {
        Ok(pump) => Some(pump),
        Err(error) => {
            tracing::error!(run_id, %error, "cannot reopen the run's log; its output is lost");
            None
        }
    };
    let ending = match recorded_exit {
        Some(exit) => {
            tracing::info!(
                run_id,
                "run had ended before the restart; re-sending its exit"
            );
            if let Some(pump) = pump.as_mut() {
                pump.finish().await;
            }
            Ending::from_record(exit)
        }
        None => {
            tracing::info!(run_id, "re-adopting the run's task");
            let elapsed = record
                .started_at_unix_nanos
                .map(|started| {
                    let nanos = unix_nanos_now().saturating_sub(started).max(0);
                    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
                })
                .unwrap_or_default();
            let ending = match runtime.watch_exit(run_id).await {
                Ok(exit_watch) => {
                    let mut ending = watch_running(
                        &*runtime,
                        run_id,
                        &record.spec,
                        elapsed,
                        settings.max_disk_bytes,
                        &mut stop,
                        exit_watch,
                    )
                    .await;
                    note_oom_kill(&*runtime, run_id, &mut ending);
                    ending
                }
                Err(e) => Ending {
                    reason: ExitReason::Exited,
                    exit_code: -1,
                    exited_at_unix_nanos: unix_nanos_now(),
                    error_code: Some(e.error_code()),
                    error_message: e.to_string(),
                    oom_killed: false,
                },
            };
            if let Some(pump) = pump.as_mut() {
                drain_output(&*runtime, run_id, pump, None).await;
            }
            ending
        }
    };
    finish(
        &*runtime,
        run_id,
        record.lease_epoch,
        ending,
        Some(&run_dir),
        &outbox,
    )
    .await
}

/// The common end of every run: record the ending, queue `RunExited` (every output line is
/// queued before it), clean up, then queue `RunReleased`, which frees the run's capacity at the
/// scheduler. Returns the sequence number of `RunReleased`, the run's last report.
async fn finish<R: ContainerRuntime>(
    runtime: &R,
    run_id: &str,
    lease_epoch: u64,
    ending: Ending,
    run_dir: Option<&RunDir>,
    outbox: &SharedOutbox,
) -> u64 {
    // Recorded before cleanup: an agent that dies from here on re-sends this exit after its
    // restart instead of trying to re-adopt a task that may be gone.
    if let Some(dir) = run_dir {
        if let Err(error) = dir.write_exit(&ending.to_record()) {
            tracing::error!(run_id, %error, "recording the run's exit failed");
        }
    }
    crate::metrics::run_ended(reason_label(ending.reason), ending.oom_killed);
    tracing::info!(
        run_id,
        reason = ?ending.reason,
        exit_code = ending.exit_code,
        error_code = ?ending.error_code,
        error_message = %ending.error_message,
        "run ended"
    );
    outbox.push(Body::RunExited(RunExited {
        run_id: run_id.to_string(),
        lease_epoch,
        exit_code: ending.exit_code,
        exited_at_unix_nanos: ending.exited_at_unix_nanos,
        reason: ending.reason as i32,
        error_code: error_code_to_pb(ending.error_code).into(),
        error_message: ending.error_message,
        oom_killed: ending.oom_killed,
        reported_at_unix_nanos: unix_nanos_now(),
        cleanup_pending: true,
    }));
    if tokio::time::timeout(CLEANUP_LIMIT, runtime.cleanup(run_id))
        .await
        .is_err()
    {
        tracing::error!(run_id, "cleanup did not finish in time");
    }
    if let Some(dir) = run_dir {
        remove_files(run_id, &dir.dir);
    }
    tracing::debug!(run_id, "run cleaned up");
    outbox.push(Body::RunReleased(RunReleased {
        run_id: run_id.to_string(),
        lease_epoch,
    }))
}

async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    // If the sender is gone nobody can stop the run any more: never resolve.
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Pull, journal, create, start and watch the run. Returns how it ended and its journal (none
/// if it ended before one was written).
async fn run_until_exit<R: ContainerRuntime>(
    runtime: &R,
    settings: &SupervisorSettings,
    journal: &Journal,
    assignment: &Assignment,
    stop: &mut watch::Receiver<bool>,
    outbox: &SharedOutbox,
    stages: &mut StartStages,
) -> (Ending, Option<RunDir>) {
    let run_id = assignment.run_id.as_str();
    let spec = &assignment.spec;
    let isolation = isolation_from_pb(spec.isolation);
    if settings.runtimes.describe(isolation).is_none() {
        // The scheduler sends sandboxed runs only to nodes that advertise gVisor.
        return (
            Ending::start_failed(
                ErrorCode::ContainerCreateFailed,
                "the run is sandboxed and this node has no working gVisor (runsc)".to_owned(),
            ),
            None,
        );
    }

    tracing::info!(run_id, image = %spec.image, "pulling image");
    let image = tokio::select! {
        biased;
        _ = stop_requested(stop) => return (Ending::stopped_before_start(), None),
        pulled = pull_reporting(runtime, &spec.image, spec.registry_auth.as_ref(), |state| {
            let report = run_report(run_id, assignment.lease_epoch, &spec.image, state);
            outbox.push_ephemeral(format!("run:{run_id}"), Body::PullProgress(report));
        }).instrument(step("image")) => match pulled {
            Ok(image) => image,
            Err(e) => return (start_failed(runtime, e).await, None),
        },
    };
    stages.image_ready_at_unix_nanos = unix_nanos_now();

    // The image's USER against its own /etc/passwd and /etc/group: a name it does not have
    // fails the run instead of running it as root.
    let accounts = match runtime.image_accounts(&image).await {
        Ok(accounts) => accounts,
        Err(e) => return (start_failed(runtime, e).await, None),
    };
    let user = match resolve_user(image.config.user().as_deref(), &accounts) {
        Ok(user) => user,
        Err(e) => {
            return (
                Ending::start_failed(ErrorCode::InvalidUser, e.to_string()),
                None,
            )
        }
    };
    let mut oci_spec = match build_spec(&SpecInputs {
        run_id,
        run: spec,
        image: &image.config,
        cgroup_parent: &settings.cgroup_parent,
        pids_limit: settings.pids_limit,
        user: &user,
    }) {
        Ok(s) => s,
        Err(e) => return (Ending::start_failed(e.error_code(), e.to_string()), None),
    };

    let mut record = RunRecord {
        run_id: run_id.to_string(),
        lease_epoch: assignment.lease_epoch,
        spec: spec.clone(),
        image_digest: image.digest.clone(),
        started_at_unix_nanos: None,
        container_id: None,
    };
    let run_dir = match journal.create(&record) {
        Ok(dir) => dir,
        Err(e) => {
            return (
                Ending::start_failed(
                    ErrorCode::JournalFailed,
                    format!("writing the run's journal: {e}"),
                ),
                None,
            )
        }
    };
    // The files go in place before the container exists; the spec mounts them read-only.
    match write_files(&run_dir.dir, &spec.files, (user.uid, user.gid)) {
        Ok(mounts) => add_mounts(&mut oci_spec, &mounts),
        Err(e) => {
            return (
                Ending::start_failed(e.error_code(), e.to_string()),
                Some(run_dir),
            )
        }
    }
    stages.prepared_at_unix_nanos = unix_nanos_now();
    let ending = start_and_watch(
        runtime,
        settings,
        assignment,
        &image,
        &oci_spec,
        &run_dir,
        &mut record,
        stop,
        outbox,
        stages,
    )
    .await;
    (ending, Some(run_dir))
}

#[allow(clippy::too_many_arguments)]
async fn start_and_watch<R: ContainerRuntime>(
    runtime: &R,
    settings: &SupervisorSettings,
    assignment: &Assignment,
    image: &PreparedImage,
    oci_spec: &oci_spec::runtime::Spec,
    run_dir: &RunDir,
    record: &mut RunRecord,
    stop: &mut watch::Receiver<bool>,
    outbox: &SharedOutbox,
    stages: &mut StartStages,
) -> Ending {
    let run_id = assignment.run_id.as_str();
    let output = OutputFiles {
        stdout: run_dir.stdout(),
        stderr: run_dir.stderr(),
    };
    // A ready sandbox first; if its task cannot be started (its shim died, say), it is
    // removed and the run creates its own container after all.
    let mut may_take = settings.sandboxes.is_some();
    let (mut pump, output_closed, exit_watch, started_at) = loop {
        let sandbox = settings
            .sandboxes
            .as_ref()
            .filter(|_| may_take)
            .and_then(|pool| pool.take(&assignment.runner_id, &image.digest, oci_spec, &output));
        if let Some(container_id) = sandbox {
            // The container exists, its process created and waiting: the run is that
            // container from now on (its cleanup included), and the journal says so at the
            // start.
            runtime.use_container(run_id, &container_id);
            runtime.release_image(&container_id);
            tracing::info!(run_id, container_id = %container_id, "run takes a ready sandbox");
            record.container_id = Some(container_id);
            let now = unix_nanos_now();
            stages.network_ready_at_unix_nanos = now;
            stages.task_created_at_unix_nanos = now;
            stages.sandbox = true;
        } else {
            match runtime
                .create(run_id, image, oci_spec, &output)
                .instrument(step("create"))
                .await
            {
                Ok(created) => {
                    stages.network_ready_at_unix_nanos = created.network_ready_at_unix_nanos;
                    stages.task_created_at_unix_nanos = unix_nanos_now();
                }
                Err(e) => return start_failed(runtime, e).await,
            }
        }
        // The shim holds the output files open now: its closes will say all output is written.
        let output_closed = match OutputClosed::watch(&output) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(run_id, %error, "cannot watch the output files; the task is deleted before the exit is reported");
                None
            }
        };
        let mut pump = match LogPump::start(
            run_id.to_string(),
            run_dir,
            0,
            settings.log_limits,
            record.spec.env.values().map(String::as_str),
            outbox.clone(),
        ) {
            Ok(pump) => pump,
            Err(e) => {
                return Ending::start_failed(
                    ErrorCode::JournalFailed,
                    format!("opening the run's log: {e}"),
                )
            }
        };

        if *stop.borrow() {
            pump.finish().await;
            return Ending::stopped_before_start();
        }
        let started = async {
            let exit_watch = runtime.watch_exit(run_id).await?;
            runtime.start(run_id).await.map(|at| (exit_watch, at))
        }
        .instrument(step("start"))
        .await;
        match started {
            Ok((exit_watch, at)) => break (pump, output_closed, exit_watch, at),
            Err(e) => {
                pump.finish().await;
                let Some(container_id) = record.container_id.take() else {
                    return Ending::start_failed(e.error_code(), e.to_string());
                };
                tracing::warn!(run_id, container_id = %container_id, error = %e, "the sandbox does not start; removing it, the run creates its own container");
                drop(output_closed);
                runtime.cleanup(run_id).await;
                stages.sandbox = false;
                may_take = false;
            }
        }
    };
    // From here on a restarted agent re-adopts the task instead of forgetting it.
    if let Err(error) = run_dir.mark_started(record, started_at) {
        tracing::error!(run_id, %error, "recording the start failed; a restart would lose the run");
    }
    tracing::info!(run_id, image_digest = %image.digest, "run started");
    outbox.push(Body::RunStarted(RunStarted {
        run_id: run_id.to_string(),
        lease_epoch: assignment.lease_epoch,
        started_at_unix_nanos: started_at,
        image_digest: image.digest.clone(),
        stages: Some(*stages),
        runtime: settings
            .runtimes
            .describe(isolation_from_pb(assignment.spec.isolation))
            .unwrap_or_default(),
    }));
    let _running =
        crate::metrics::Running::started(stages.received_at_unix_nanos, started_at, stages.sandbox);

    let mut ending = watch_running(
        runtime,
        run_id,
        &assignment.spec,
        Duration::ZERO,
        settings.max_disk_bytes,
        stop,
        exit_watch,
    )
    .instrument(step("running"))
    .await;
    note_oom_kill(runtime, run_id, &mut ending);
    drain_output(runtime, run_id, &mut pump, output_closed)
        .instrument(step("output"))
        .await;
    ending
}

/// The ending of a run whose pull or creation failed with `error`. When containerd does not
/// answer, the run is not failed: it is refused like an assignment to a node that shuts down
/// (`node_draining`), so the scheduler places it again, here once containerd is back or
/// elsewhere.
async fn start_failed<R: ContainerRuntime>(runtime: &R, error: RuntimeError) -> Ending {
    if runtime.check_reachable().await {
        return Ending::start_failed(error.error_code(), error.to_string());
    }
    tracing::warn!(%error, "containerd is unreachable; handing the run back to the scheduler");
    Ending::start_failed(
        ErrorCode::NodeDraining,
        format!(
            "containerd is unreachable; the node takes no runs until it answers again ({error})"
        ),
    )
}

/// Marks a run that exited non-zero as OOM-killed when the kernel's OOM killer ended one of its
/// processes (the run's memory limit was hit). A run that still exited 0, or that ended by its
/// timeout or a stop, keeps that ending. Must run before the task is deleted: that removes the
/// cgroup holding the counter.
fn note_oom_kill<R: ContainerRuntime>(runtime: &R, run_id: &str, ending: &mut Ending) {
    if ending.reason != ExitReason::Exited || ending.exit_code == 0 {
        return;
    }
    if let Some(kills) = runtime.oom_kills(run_id).filter(|kills| *kills > 0) {
        tracing::warn!(
            run_id,
            oom_kills = kills,
            exit_code = ending.exit_code,
            "the run hit its memory limit and the OOM killer ended it"
        );
        ending.oom_killed = true;
    }
}

/// The `reason` label of a run's end.
fn reason_label(reason: ExitReason) -> &'static str {
    match reason {
        ExitReason::Exited => "exited",
        ExitReason::Timeout => "timeout",
        ExitReason::Stopped => "stopped",
        ExitReason::StartFailed => "start_failed",
        ExitReason::Unspecified => "unspecified",
    }
}

/// Waits for the exit, enforcing the timeout (of which `elapsed` has already passed) and
/// honouring stops.
async fn watch_running<R: ContainerRuntime>(
    runtime: &R,
    run_id: &str,
    spec: &RunSpec,
    elapsed: Duration,
    max_disk_bytes: Option<u64>,
    stop: &mut watch::Receiver<bool>,
    mut exit_watch: ExitWatch,
) -> Ending {
    let timeout = match spec.timeout_seconds {
        0 => None,
        secs => Some(Duration::from_secs(u64::from(secs)).saturating_sub(elapsed)),
    };
    let grace = match spec.stop_grace_seconds {
        0 => DEFAULT_STOP_GRACE,
        secs => Duration::from_secs(u64::from(secs)),
    };
    let timeout_sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending::<()>().await,
        }
    };
    // The writable layer, measured every few seconds against the node's per-run limit.
    let disk_over = async {
        let Some(limit) = max_disk_bytes else {
            return std::future::pending::<u64>().await;
        };
        let mut every = tokio::time::interval(DISK_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Some(used) = runtime.writable_bytes(run_id).await.filter(|u| *u > limit) {
                return used;
            }
        }
    };
    let reason = tokio::select! {
        exit = &mut exit_watch => return exited(exit, ExitReason::Exited, None),
        used = disk_over => {
            let limit = max_disk_bytes.unwrap_or_default();
            tracing::warn!(run_id, used_mib = used >> 20, limit_mib = limit >> 20, "run wrote past the disk limit; killing it");
            return over_disk_limit(runtime, run_id, used, limit, &mut exit_watch).await;
        }
        _ = timeout_sleep => {
            tracing::info!(run_id, timeout_seconds = spec.timeout_seconds, "run timed out");
            ExitReason::Timeout
        }
        _ = stop_requested(stop) => {
            tracing::info!(run_id, "stop requested");
            ExitReason::Stopped
        }
    };

    if let Err(error) = runtime.kill(run_id, StopSignal::Term, false).await {
        tracing::warn!(run_id, %error, "SIGTERM failed");
    }
    let exit = match tokio::time::timeout(grace, &mut exit_watch).await {
        Ok(exit) => exit,
        Err(_) => {
            tracing::info!(
                run_id,
                grace_ms = grace.as_millis() as u64,
                "grace period over; sending SIGKILL"
            );
            if let Err(error) = runtime.kill(run_id, StopSignal::Kill, true).await {
                tracing::warn!(run_id, %error, "SIGKILL failed");
            }
            match tokio::time::timeout(KILL_WAIT, &mut exit_watch).await {
                Ok(exit) => exit,
                Err(_) => {
                    return Ending {
                        reason,
                        exit_code: if reason == ExitReason::Timeout {
                            TIMEOUT_EXIT_CODE
                        } else {
                            -1
                        },
                        exited_at_unix_nanos: unix_nanos_now(),
                        error_code: Some(ErrorCode::KillFailed),
                        error_message: "the task did not exit after SIGKILL".to_string(),
                        oom_killed: false,
                    }
                }
            }
        }
    };
    let forced_code = (reason == ExitReason::Timeout).then_some(TIMEOUT_EXIT_CODE);
    exited(exit, reason, forced_code)
}

/// Kills a run that wrote more than `limit` bytes to its writable layer, at once (like the OOM
/// killer at the memory limit: no grace), and says why.
async fn over_disk_limit<R: ContainerRuntime>(
    runtime: &R,
    run_id: &str,
    used: u64,
    limit: u64,
    exit_watch: &mut ExitWatch,
) -> Ending {
    if let Err(error) = runtime.kill(run_id, StopSignal::Kill, true).await {
        tracing::warn!(run_id, %error, "SIGKILL failed");
    }
    let mut ending = match tokio::time::timeout(KILL_WAIT, exit_watch).await {
        Ok(exit) => exited(exit, ExitReason::Exited, None),
        Err(_) => Ending {
            reason: ExitReason::Exited,
            exit_code: -1,
            exited_at_unix_nanos: unix_nanos_now(),
            error_code: None,
            error_message: String::new(),
            oom_killed: false,
        },
    };
    ending.error_code = Some(ErrorCode::DiskLimitExceeded);
    ending.error_message = format!(
        "the run wrote {} MiB to its filesystem, more than this node allows a run ({} MiB); it was killed",
        used >> 20,
        limit >> 20
    );
    ending
}

fn exited(
    exit: Result<Result<TaskExit, RuntimeError>, tokio::sync::oneshot::error::RecvError>,
    reason: ExitReason,
    forced_code: Option<i32>,
) -> Ending {
    match exit {
        Ok(Ok(exit)) => Ending {
            reason,
            exit_code: forced_code.unwrap_or_else(|| i32::try_from(exit.exit_status).unwrap_or(-1)),
            exited_at_unix_nanos: exit.exited_at_unix_nanos,
            error_code: None,
            error_message: String::new(),
            oom_killed: false,
        },
        Ok(Err(e)) => Ending {
            reason,
            exit_code: forced_code.unwrap_or(-1),
            exited_at_unix_nanos: unix_nanos_now(),
            error_code: Some(e.error_code()),
            error_message: e.to_string(),
            oom_killed: false,
        },
        Err(_) => Ending {
            reason,
            exit_code: forced_code.unwrap_or(-1),
            exited_at_unix_nanos: unix_nanos_now(),
            error_code: Some(ErrorCode::TaskFailed),
            error_message: "lost track of the task's exit".to_string(),
            oom_killed: false,
        },
    }
}

/// How long after the exit the supervisor waits for the shim to close the output files before
/// it deletes the task instead (which waits for the same copy).
const OUTPUT_CLOSE_LIMIT: Duration = Duration::from_millis(500);

/// Gets every line into the outbox: once the shim has written all of the output — both files
/// closed by it ([`OutputClosed`]), else by deleting the exited task, which waits for the copy —
/// take what the output files hold, a final unterminated line included. A task not deleted here
/// is deleted by the cleanup.
async fn drain_output<R: ContainerRuntime>(
    runtime: &R,
    run_id: &str,
    pump: &mut LogPump,
    output_closed: Option<OutputClosed>,
) {
    let begun = std::time::Instant::now();
    let written = match output_closed {
        Some(mut watch) => {
            let written = watch.wait(OUTPUT_CLOSE_LIMIT).await;
            // Closing an inotify instance waits for the kernel's SRCU grace period (~15 ms
            // measured here): not on the way to the report.
            tokio::task::spawn_blocking(move || drop(watch));
            written
        }
        None => false,
    };
    tracing::debug!(
        run_id,
        written,
        waited_us = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX),
        "output closed by the shim"
    );
    if !written {
        if let Err(error) = runtime.delete_task(run_id).await {
            tracing::warn!(run_id, %error, "deleting task failed");
        }
    }
    pump.finish().await;
    tracing::debug!(
        run_id,
        took_us = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX),
        "output drained"
    );
}

#[cfg(test)]
mod tests;
