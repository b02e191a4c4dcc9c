//! Supervision logic against a scripted fake runtime, on paused tokio time.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_proto::v1::{AgentMessage, LogStream};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::runtime::{PreparedImage, TaskOutput};

/// What the fake container does once started.
#[derive(Clone, Default)]
struct Script {
    pull_delay: Duration,
    pull_error: Option<String>,
    stdout: Vec<&'static str>,
    stderr: Vec<&'static str>,
    /// None: runs until killed.
    runs_for: Option<Duration>,
    exit_status: u32,
    ignores_sigterm: bool,
    /// The output stays open after the exit until the task is deleted.
    holds_output: bool,
}

#[derive(Default)]
struct FakeTask {
    out: Option<(DuplexStream, DuplexStream)>,
    exit_tx: Option<oneshot::Sender<Result<TaskExit, RuntimeError>>>,
    kill_tx: Option<mpsc::UnboundedSender<StopSignal>>,
    held: Option<(DuplexStream, DuplexStream)>,
}

struct FakeRuntime {
    script: Script,
    calls: Mutex<Vec<String>>,
    tasks: Arc<Mutex<HashMap<String, FakeTask>>>,
}

impl FakeRuntime {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(Self {
            script,
            calls: Mutex::new(Vec::new()),
            tasks: Arc::new(Mutex::new(HashMap::new())),
        })
    }
    fn record(&self, call: String) {
        self.calls.lock().expect("lock").push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

impl ContainerRuntime for FakeRuntime {
    fn cached_images(&self) -> Vec<String> {
        Vec::new()
    }

    async fn pull_image(&self, image: &str) -> Result<PreparedImage, RuntimeError> {
        self.record(format!("pull {image}"));
        tokio::time::sleep(self.script.pull_delay).await;
        if let Some(message) = &self.script.pull_error {
            return Err(RuntimeError::ImagePull {
                image: image.to_string(),
                message: message.clone(),
            });
        }
        Ok(PreparedImage {
            digest: "sha256:fake".to_string(),
            top_chain_id: "sha256:chain".to_string(),
            config: crate::manifest::ImageRunConfig {
                cmd: Some(vec!["sh".to_string()]),
                ..Default::default()
            },
        })
    }

    async fn create(
        &self,
        run_id: &str,
        _image: &PreparedImage,
        _spec: &oci_spec::runtime::Spec,
    ) -> Result<TaskOutput, RuntimeError> {
        self.record(format!("create {run_id}"));
        let (out_w, out_r) = tokio::io::duplex(1 << 16);
        let (err_w, err_r) = tokio::io::duplex(1 << 16);
        self.tasks.lock().expect("lock").insert(
            run_id.to_string(),
            FakeTask {
                out: Some((out_w, err_w)),
                ..Default::default()
            },
        );
        Ok(TaskOutput {
            stdout: Box::new(out_r),
            stderr: Box::new(err_r),
        })
    }

    async fn watch_exit(&self, run_id: &str) -> Result<ExitWatch, RuntimeError> {
        self.record(format!("watch {run_id}"));
        let (tx, rx) = oneshot::channel();
        if let Some(task) = self.tasks.lock().expect("lock").get_mut(run_id) {
            task.exit_tx = Some(tx);
        }
        Ok(rx)
    }

    async fn start(&self, run_id: &str) -> Result<i64, RuntimeError> {
        self.record(format!("start {run_id}"));
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
        let (out, exit_tx) = {
            let mut tasks = self.tasks.lock().expect("lock");
            let task = tasks.get_mut(run_id).expect("created");
            task.kill_tx = Some(kill_tx);
            let exit_tx = task
                .exit_tx
                .take()
                .expect("watch_exit must come before start");
            (task.out.take().expect("output"), exit_tx)
        };
        let script = self.script.clone();
        let tasks = self.tasks.clone();
        let id = run_id.to_string();
        tokio::spawn(async move {
            let (mut out_w, mut err_w) = out;
            for line in &script.stdout {
                let _ = out_w.write_all(format!("{line}\n").as_bytes()).await;
            }
            for line in &script.stderr {
                let _ = err_w.write_all(format!("{line}\n").as_bytes()).await;
            }
            let run = async {
                match script.runs_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(run);
            let status = loop {
                tokio::select! {
                    _ = &mut run => break script.exit_status,
                    Some(sig) = kill_rx.recv() => match sig {
                        StopSignal::Term if !script.ignores_sigterm => break 143,
                        StopSignal::Term => continue,
                        StopSignal::Kill => break 137,
                    },
                }
            };
            if script.holds_output {
                if let Some(task) = tasks.lock().expect("lock").get_mut(&id) {
                    task.held = Some((out_w, err_w));
                }
            }
            let _ = exit_tx.send(Ok(TaskExit {
                exit_status: status,
                exited_at_unix_nanos: 42,
            }));
        });
        Ok(7)
    }

    async fn kill(&self, run_id: &str, signal: StopSignal, all: bool) -> Result<(), RuntimeError> {
        self.record(format!("kill {run_id} {} all={all}", signal.number()));
        if let Some(tx) = self
            .tasks
            .lock()
            .expect("lock")
            .get(run_id)
            .and_then(|t| t.kill_tx.clone())
        {
            let _ = tx.send(signal);
        }
        Ok(())
    }

    async fn delete_task(&self, run_id: &str) -> Result<(), RuntimeError> {
        self.record(format!("delete_task {run_id}"));
        if let Some(task) = self.tasks.lock().expect("lock").get_mut(run_id) {
            task.held = None;
        }
        Ok(())
    }

    async fn cleanup(&self, run_id: &str) {
        self.record(format!("cleanup {run_id}"));
        self.tasks.lock().expect("lock").remove(run_id);
    }

    async fn list_containers(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
}

fn assignment(spec: RunSpec) -> Assignment {
    Assignment {
        run_id: "run-1".to_string(),
        lease_epoch: 3,
        spec: RunSpec {
            image: "127.0.0.1:5055/busybox:latest".to_string(),
            ..spec
        },
    }
}

fn settings() -> SupervisorSettings {
    SupervisorSettings {
        cgroup_parent: "berth/test".to_string(),
    }
}

fn exit_of(messages: &[AgentMessage]) -> RunExited {
    let exits: Vec<RunExited> = messages
        .iter()
        .filter_map(|m| match &m.body {
            Some(Body::RunExited(e)) => Some(e.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(exits.len(), 1, "exactly one RunExited");
    exits[0].clone()
}

async fn run(script: Script, spec: RunSpec) -> (Arc<FakeRuntime>, Vec<AgentMessage>) {
    let runtime = FakeRuntime::new(script);
    let outbox = SharedOutbox::new();
    let (_stop_tx, stop_rx) = watch::channel(false);
    supervise(
        runtime.clone(),
        settings(),
        assignment(spec),
        stop_rx,
        outbox.clone(),
    )
    .await;
    (runtime, outbox.snapshot())
}

#[tokio::test(start_paused = true)]
async fn normal_exit_reports_logs_then_exit() {
    let script = Script {
        stdout: vec!["hello", "world"],
        stderr: vec!["oops"],
        runs_for: Some(Duration::from_millis(10)),
        exit_status: 0,
        ..Default::default()
    };
    let (runtime, messages) = run(script, RunSpec::default()).await;
    let started = messages
        .iter()
        .position(|m| matches!(m.body, Some(Body::RunStarted(_))))
        .expect("RunStarted");
    let exited_at = messages
        .iter()
        .position(|m| matches!(m.body, Some(Body::RunExited(_))))
        .expect("RunExited");
    assert_eq!(
        exited_at,
        messages.len() - 1,
        "RunExited is the last report"
    );
    assert!(started < exited_at);
    let lines: Vec<(u64, i32, String)> = messages
        .iter()
        .filter_map(|m| match &m.body {
            Some(Body::LogBatch(b)) => Some(b.lines.clone()),
            _ => None,
        })
        .flatten()
        .map(|l| (l.seq, l.stream, l.msg))
        .collect();
    let mut seqs: Vec<u64> = lines.iter().map(|l| l.0).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(
        lines.contains(&(3, LogStream::Stderr as i32, "oops".to_string()))
            || lines
                .iter()
                .any(|l| l.2 == "oops" && l.1 == LogStream::Stderr as i32)
    );
    let exit = exit_of(&messages);
    assert_eq!(exit.reason, ExitReason::Exited as i32);
    assert_eq!(exit.exit_code, 0);
    assert_eq!(exit.lease_epoch, 3);
    assert_eq!(exit.exited_at_unix_nanos, 42);
    let calls = runtime.calls();
    let watch = calls
        .iter()
        .position(|c| c.starts_with("watch"))
        .expect("watch");
    let start = calls
        .iter()
        .position(|c| c.starts_with("start"))
        .expect("start");
    assert!(watch < start, "wait before start: {calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("cleanup run-1"));
}

#[tokio::test(start_paused = true)]
async fn nonzero_exit_code_is_reported() {
    let script = Script {
        runs_for: Some(Duration::from_millis(1)),
        exit_status: 3,
        ..Default::default()
    };
    let (_, messages) = run(script, RunSpec::default()).await;
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Exited as i32, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_sends_term_then_kill_and_reports_124() {
    let script = Script {
        runs_for: None,
        ignores_sigterm: true,
        ..Default::default()
    };
    let begin = tokio::time::Instant::now();
    let (runtime, messages) = run(
        script,
        RunSpec {
            timeout_seconds: 1,
            stop_grace_seconds: 0,
            ..Default::default()
        },
    )
    .await;
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Timeout as i32, 124)
    );
    let calls = runtime.calls();
    assert!(
        calls.contains(&"kill run-1 15 all=false".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"kill run-1 9 all=true".to_string()),
        "{calls:?}"
    );
    // 1 s timeout + 2 s default grace.
    let elapsed = begin.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert_eq!(calls.last().map(String::as_str), Some("cleanup run-1"));
}

#[tokio::test(start_paused = true)]
async fn stop_reports_real_exit_code() {
    let runtime = FakeRuntime::new(Script {
        runs_for: None,
        ..Default::default()
    });
    let outbox = SharedOutbox::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(supervise(
        runtime.clone(),
        settings(),
        assignment(RunSpec::default()),
        stop_rx,
        outbox.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop_tx.send_replace(true);
    task.await.expect("supervisor finished");
    let exit = exit_of(&outbox.snapshot());
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Stopped as i32, 143)
    );
    assert!(
        !runtime.calls().iter().any(|c| c.contains(" 9 ")),
        "no SIGKILL needed"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_during_pull_aborts_start() {
    let runtime = FakeRuntime::new(Script {
        pull_delay: Duration::from_secs(60),
        ..Default::default()
    });
    let outbox = SharedOutbox::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(supervise(
        runtime.clone(),
        settings(),
        assignment(RunSpec::default()),
        stop_rx,
        outbox.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    task.await.expect("supervisor finished");
    let messages = outbox.snapshot();
    assert_eq!(messages.len(), 1, "only RunExited");
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Stopped as i32, -1)
    );
    let calls = runtime.calls();
    assert!(!calls.iter().any(|c| c.starts_with("create")), "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("cleanup run-1"));
}

#[tokio::test(start_paused = true)]
async fn pull_failure_is_start_failed() {
    let script = Script {
        pull_error: Some("manifest unknown".to_string()),
        ..Default::default()
    };
    let (runtime, messages) = run(script, RunSpec::default()).await;
    let exit = exit_of(&messages);
    assert_eq!(exit.reason, ExitReason::StartFailed as i32);
    assert_eq!(exit.exit_code, -1);
    assert_eq!(exit.error_code, "image_pull_failed");
    assert!(exit.error_message.contains("manifest unknown"));
    assert_eq!(
        runtime.calls().last().map(String::as_str),
        Some("cleanup run-1")
    );
}

#[tokio::test(start_paused = true)]
async fn empty_command_is_invalid_command() {
    let spec = RunSpec {
        entrypoint_set: true,
        cmd_set: true,
        ..Default::default()
    };
    let (runtime, messages) = run(Script::default(), spec).await;
    let exit = exit_of(&messages);
    assert_eq!(exit.reason, ExitReason::StartFailed as i32);
    assert_eq!(exit.error_code, "invalid_command");
    assert!(!runtime.calls().iter().any(|c| c.starts_with("create")));
}

#[tokio::test(start_paused = true)]
async fn output_held_open_is_drained_after_task_delete() {
    let script = Script {
        stdout: vec!["late"],
        runs_for: Some(Duration::from_millis(1)),
        holds_output: true,
        ..Default::default()
    };
    let (runtime, messages) = run(script, RunSpec::default()).await;
    assert!(runtime.calls().iter().any(|c| c == "delete_task run-1"));
    let last = messages.last().expect("messages");
    assert!(matches!(last.body, Some(Body::RunExited(_))));
    assert!(messages.iter().any(|m| matches!(&m.body,
        Some(Body::LogBatch(b)) if b.lines.iter().any(|l| l.msg == "late"))));
}
