//! Supervises one run from assignment to its final report:
//! pull → build spec → create task → watch exit → start → (exit | timeout | stop) → drain logs →
//! clean up → `RunExited`. Every path, failures included, ends with cleanup and exactly one
//! `RunExited`, and every log line of the run is queued before that `RunExited`.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::{agent_message::Body, ExitReason, RunExited, RunSpec, RunStarted};
use tokio::sync::watch;

use crate::clock::unix_nanos_now;
use crate::logs::LogPump;
use crate::outbox::SharedOutbox;
use crate::runtime::{ContainerRuntime, ExitWatch, RuntimeError, StopSignal, TaskExit};
use crate::spec::{build_spec, SpecInputs};

/// Exit code reported when the run's timeout elapsed (as coreutils `timeout` does).
pub const TIMEOUT_EXIT_CODE: i32 = 124;
/// Grace period between SIGTERM and SIGKILL when the run does not set one.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for output EOF after the exit before deleting the task.
pub const LOG_EOF_WAIT: Duration = Duration::from_secs(2);
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
}

/// Node-level settings a supervisor needs.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub cgroup_parent: String,
}

/// How the run ended, before it becomes a `RunExited`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ending {
    reason: ExitReason,
    exit_code: i32,
    exited_at_unix_nanos: i64,
    error_code: String,
    error_message: String,
}

impl Ending {
    fn start_failed(code: &str, message: String) -> Self {
        Self {
            reason: ExitReason::StartFailed,
            exit_code: -1,
            exited_at_unix_nanos: 0,
            error_code: code.to_string(),
            error_message: message,
        }
    }

    fn stopped_before_start() -> Self {
        Self {
            reason: ExitReason::Stopped,
            exit_code: -1,
            exited_at_unix_nanos: 0,
            error_code: String::new(),
            error_message: "stopped before the run started".to_string(),
        }
    }
}

/// Runs `assignment` to completion. `stop` flips to true when the scheduler sends `StopRun`.
/// Returns the outbox sequence number of the `RunExited` report.
pub async fn supervise<R: ContainerRuntime>(
    runtime: Arc<R>,
    settings: SupervisorSettings,
    assignment: Assignment,
    mut stop: watch::Receiver<bool>,
    outbox: SharedOutbox,
) -> u64 {
    let run_id = assignment.run_id.clone();
    let ending = run_until_exit(&*runtime, &settings, &assignment, &mut stop, &outbox).await;
    if tokio::time::timeout(CLEANUP_LIMIT, runtime.cleanup(&run_id))
        .await
        .is_err()
    {
        tracing::error!(run_id = %run_id, "cleanup did not finish in time");
    }
    tracing::info!(
        run_id = %run_id,
        reason = ?ending.reason,
        exit_code = ending.exit_code,
        error_code = %ending.error_code,
        error_message = %ending.error_message,
        "run ended"
    );
    outbox.push(Body::RunExited(RunExited {
        run_id,
        lease_epoch: assignment.lease_epoch,
        exit_code: ending.exit_code,
        exited_at_unix_nanos: ending.exited_at_unix_nanos,
        reason: ending.reason as i32,
        error_code: ending.error_code,
        error_message: ending.error_message,
        // OOM detection comes with the limits work (issue 4 item 3).
        oom_killed: false,
    }))
}

async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    // If the sender is gone nobody can stop the run any more: never resolve.
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_until_exit<R: ContainerRuntime>(
    runtime: &R,
    settings: &SupervisorSettings,
    assignment: &Assignment,
    stop: &mut watch::Receiver<bool>,
    outbox: &SharedOutbox,
) -> Ending {
    let run_id = assignment.run_id.as_str();
    let spec = &assignment.spec;

    tracing::info!(run_id, image = %spec.image, "pulling image");
    let image = tokio::select! {
        biased;
        _ = stop_requested(stop) => return Ending::stopped_before_start(),
        pulled = runtime.pull_image(&spec.image) => match pulled {
            Ok(image) => image,
            Err(e) => return Ending::start_failed(e.error_code(), e.to_string()),
        },
    };

    let oci_spec = match build_spec(&SpecInputs {
        run_id,
        run: spec,
        image: &image.config,
        cgroup_parent: &settings.cgroup_parent,
    }) {
        Ok(s) => s,
        Err(e) => return Ending::start_failed(e.error_code(), e.to_string()),
    };

    let output = match runtime.create(run_id, &image, &oci_spec).await {
        Ok(o) => o,
        Err(e) => return Ending::start_failed(e.error_code(), e.to_string()),
    };
    let mut pump = LogPump::start(
        run_id.to_string(),
        output.stdout,
        output.stderr,
        outbox.clone(),
    );

    if *stop.borrow() {
        pump.stop_and_flush().await;
        return Ending::stopped_before_start();
    }
    let exit_watch = match runtime.watch_exit(run_id).await {
        Ok(w) => w,
        Err(e) => {
            pump.stop_and_flush().await;
            return Ending::start_failed(e.error_code(), e.to_string());
        }
    };
    let started_at = match runtime.start(run_id).await {
        Ok(t) => t,
        Err(e) => {
            pump.stop_and_flush().await;
            return Ending::start_failed(e.error_code(), e.to_string());
        }
    };
    tracing::info!(run_id, image_digest = %image.digest, "run started");
    outbox.push(Body::RunStarted(RunStarted {
        run_id: run_id.to_string(),
        lease_epoch: assignment.lease_epoch,
        started_at_unix_nanos: started_at,
        image_digest: image.digest.clone(),
    }));

    let ending = watch_running(runtime, assignment, stop, exit_watch).await;
    drain_logs(runtime, run_id, &mut pump).await;
    ending
}

/// Waits for the exit, enforcing the timeout and honouring stops.
async fn watch_running<R: ContainerRuntime>(
    runtime: &R,
    assignment: &Assignment,
    stop: &mut watch::Receiver<bool>,
    mut exit_watch: ExitWatch,
) -> Ending {
    let run_id = assignment.run_id.as_str();
    let timeout = match assignment.spec.timeout_seconds {
        0 => None,
        secs => Some(Duration::from_secs(u64::from(secs))),
    };
    let grace = match assignment.spec.stop_grace_seconds {
        0 => DEFAULT_STOP_GRACE,
        secs => Duration::from_secs(u64::from(secs)),
    };
    let timeout_sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending::<()>().await,
        }
    };
    let reason = tokio::select! {
        exit = &mut exit_watch => return exited(exit, ExitReason::Exited, None),
        _ = timeout_sleep => {
            tracing::info!(run_id, timeout_seconds = assignment.spec.timeout_seconds, "run timed out");
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
                        error_code: "kill_failed".to_string(),
                        error_message: "the task did not exit after SIGKILL".to_string(),
                    }
                }
            }
        }
    };
    let forced_code = (reason == ExitReason::Timeout).then_some(TIMEOUT_EXIT_CODE);
    exited(exit, reason, forced_code)
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
            error_code: String::new(),
            error_message: String::new(),
        },
        Ok(Err(e)) => Ending {
            reason,
            exit_code: forced_code.unwrap_or(-1),
            exited_at_unix_nanos: unix_nanos_now(),
            error_code: e.error_code().to_string(),
            error_message: e.to_string(),
        },
        Err(_) => Ending {
            reason,
            exit_code: forced_code.unwrap_or(-1),
            exited_at_unix_nanos: unix_nanos_now(),
            error_code: "task_failed".to_string(),
            error_message: "lost track of the task's exit".to_string(),
        },
    }
}

/// Gets every line into the outbox: wait for EOF, then delete the task (which closes the FIFOs'
/// write side) and drain again.
async fn drain_logs<R: ContainerRuntime>(runtime: &R, run_id: &str, pump: &mut LogPump) {
    if pump.wait_for_eof(LOG_EOF_WAIT).await {
        return;
    }
    tracing::debug!(
        run_id,
        "output still open after exit; deleting task to close it"
    );
    if let Err(error) = runtime.delete_task(run_id).await {
        tracing::warn!(run_id, %error, "deleting task failed");
    }
    if !pump.wait_for_eof(LOG_EOF_WAIT).await {
        tracing::warn!(run_id, "output did not reach EOF; keeping what was read");
        pump.stop_and_flush().await;
    }
}

#[cfg(test)]
mod tests;
