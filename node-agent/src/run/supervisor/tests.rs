//! Supervision logic against a scripted fake runtime, on paused tokio time.

use std::collections::HashMap;
use std::sync::Mutex;

use std::io::Write as _;
use std::path::Path;

use berth_proto::v1::{AgentMessage, LogStream, RegistryAuth};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::run::logs::LogLimits;
use crate::runtime::{Created, PreparedImage};

fn append(path: &Path, text: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = file.write_all(text.as_bytes());
    }
}

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
    /// Output the shim only finishes copying when the task is deleted.
    late_output: Option<&'static str>,
    /// What the run's memory cgroup says about OOM kills (None: the cgroup is gone).
    oom_kills: Option<u64>,
    /// What the run's writable layer holds, growing by this many bytes per second of its life
    /// (None: the engine cannot tell).
    writes_per_second: Option<u64>,
}

#[derive(Default)]
struct FakeTask {
    out: Option<OutputFiles>,
    /// The output files held open for writing from create until all output is copied, as the
    /// shim holds them (its closes tell the supervisor the output is complete).
    writers: Vec<std::fs::File>,
    exit_tx: Option<oneshot::Sender<Result<TaskExit, RuntimeError>>>,
    kill_tx: Option<mpsc::UnboundedSender<StopSignal>>,
    /// A task some earlier agent process started: it is already running.
    adopted: bool,
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

impl FakeRuntime {
    /// Plays the script of a started (or adopted) task in the background.
    fn run_task(&self, run_id: &str) {
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
        let (mut writers, exit_tx) = {
            let mut tasks = self.tasks.lock().expect("lock");
            let task = tasks.get_mut(run_id).expect("created");
            task.kill_tx = Some(kill_tx);
            let exit_tx = task
                .exit_tx
                .take()
                .expect("watch_exit must come before start");
            if task.writers.is_empty() {
                // Adopted: the earlier process's shim has the files open.
                if let Some(out) = &task.out {
                    task.writers = [&out.stdout, &out.stderr]
                        .iter()
                        .filter_map(|p| std::fs::OpenOptions::new().append(true).open(p).ok())
                        .collect();
                }
            }
            let writers: Vec<std::fs::File> = task
                .writers
                .iter()
                .filter_map(|w| w.try_clone().ok())
                .collect();
            (writers, exit_tx)
        };
        let script = self.script.clone();
        let tasks = self.tasks.clone();
        let id = run_id.to_string();
        tokio::spawn(async move {
            if let [stdout, stderr] = &mut writers[..] {
                for line in &script.stdout {
                    let _ = stdout.write_all(format!("{line}\n").as_bytes());
                }
                for line in &script.stderr {
                    let _ = stderr.write_all(format!("{line}\n").as_bytes());
                }
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
            // All output copied: the shim closes the files (unless some comes late).
            drop(writers);
            if script.late_output.is_none() {
                if let Some(task) = tasks.lock().expect("lock").get_mut(&id) {
                    task.writers.clear();
                }
            }
            let _ = exit_tx.send(Ok(TaskExit {
                exit_status: status,
                exited_at_unix_nanos: 42,
            }));
        });
    }
}

impl ContainerRuntime for FakeRuntime {
    fn cached_images(&self) -> Vec<String> {
        Vec::new()
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PreparedImage, RuntimeError> {
        match auth {
            Some(auth) => self.record(format!("pull {image} as {}", auth.username)),
            None => self.record(format!("pull {image}")),
        }
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
            config: {
                let mut config = crate::image::manifest::ImageRunConfig::default();
                config.set_cmd(Some(vec!["sh".to_string()]));
                config
            },
        })
    }

    async fn create(
        &self,
        run_id: &str,
        _image: &PreparedImage,
        spec: &oci_spec::runtime::Spec,
        output: &OutputFiles,
    ) -> Result<Created, RuntimeError> {
        let pids = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.pids().as_ref())
            .map(|p| p.limit())
            .unwrap_or_default();
        self.record(format!("create {run_id} pids={pids}"));
        // Uploaded files: their host copies must exist before the container is created.
        for m in spec.mounts().iter().flatten() {
            if m.typ().as_deref() == Some("bind") {
                let source = m.source().clone().unwrap_or_default();
                let content = std::fs::read(&source).unwrap_or_default();
                self.record(format!(
                    "bind {} -> {} {:?} {}",
                    source.display(),
                    m.destination().display(),
                    m.options().clone().unwrap_or_default(),
                    String::from_utf8_lossy(&content)
                ));
            }
        }
        assert!(output.stdout.is_file() && output.stderr.is_file());
        let writers = [&output.stdout, &output.stderr]
            .iter()
            .filter_map(|p| std::fs::OpenOptions::new().append(true).open(p).ok())
            .collect();
        self.tasks.lock().expect("lock").insert(
            run_id.to_string(),
            FakeTask {
                out: Some(output.clone()),
                writers,
                ..Default::default()
            },
        );
        Ok(Created::default())
    }

    async fn watch_exit(&self, run_id: &str) -> Result<ExitWatch, RuntimeError> {
        self.record(format!("watch {run_id}"));
        let (tx, rx) = oneshot::channel();
        let adopted = match self.tasks.lock().expect("lock").get_mut(run_id) {
            Some(task) => {
                task.exit_tx = Some(tx);
                task.adopted
            }
            None => {
                let _ = tx.send(Err(RuntimeError::Task {
                    operation: "Tasks.Wait",
                    message: "not found".to_string(),
                }));
                false
            }
        };
        if adopted {
            self.run_task(run_id);
        }
        Ok(rx)
    }

    async fn start(&self, run_id: &str) -> Result<i64, RuntimeError> {
        self.record(format!("start {run_id}"));
        self.run_task(run_id);
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

    fn oom_kills(&self, run_id: &str) -> Option<u64> {
        self.record(format!("oom_kills {run_id}"));
        self.script.oom_kills
    }

    async fn writable_bytes(&self, _run_id: &str) -> Option<u64> {
        let rate = self.script.writes_per_second?;
        let elapsed = tokio::time::Instant::now()
            .duration_since(*STARTED.get_or_init(tokio::time::Instant::now));
        Some(rate.saturating_mul(elapsed.as_secs()))
    }

    async fn delete_task(&self, run_id: &str) -> Result<(), RuntimeError> {
        self.record(format!("delete_task {run_id}"));
        if let Some(task) = self.tasks.lock().expect("lock").get_mut(run_id) {
            if let (Some(late), Some(stdout)) = (self.script.late_output, task.writers.first_mut())
            {
                let _ = stdout.write_all(late.as_bytes());
            }
            task.writers.clear();
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
        runner_id: String::new(),
        run_id: "run-1".to_string(),
        lease_epoch: 3,
        spec: RunSpec {
            image: "127.0.0.1:5055/busybox:latest".to_string(),
            ..spec
        },
        trace_parent: None,
    }
}

fn settings() -> SupervisorSettings {
    SupervisorSettings {
        runtimes: Default::default(),
        cgroup_parent: "berth/test".to_string(),
        pids_limit: 1024,
        log_limits: LogLimits::default(),
        max_disk_bytes: None,
        sandboxes: None,
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

fn journal() -> (tempfile::TempDir, Journal) {
    let state = tempfile::tempdir().expect("tempdir");
    let journal = Journal::new(state.path());
    (state, journal)
}

async fn run(script: Script, spec: RunSpec) -> (Arc<FakeRuntime>, Vec<AgentMessage>) {
    let runtime = FakeRuntime::new(script);
    let outbox = SharedOutbox::new();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let (_state, journal) = journal();
    supervise(
        runtime.clone(),
        settings(),
        journal,
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
        messages.len() - 2,
        "RunExited is the last report before RunReleased"
    );
    assert!(matches!(
        messages.last().and_then(|m| m.body.as_ref()),
        Some(Body::RunReleased(_))
    ));
    // Reported before the cleanup, the capacity freed after it.
    let calls = runtime.calls();
    assert!(
        !calls.iter().any(|c| c == "delete_task run-1"),
        "the output was complete without deleting the task first: {calls:?}"
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
    let (_state, journal) = journal();
    let task = tokio::spawn(supervise(
        runtime.clone(),
        settings(),
        journal,
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
    let (_state, journal) = journal();
    let task = tokio::spawn(supervise(
        runtime.clone(),
        settings(),
        journal,
        assignment(RunSpec::default()),
        stop_rx,
        outbox.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    task.await.expect("supervisor finished");
    let messages = outbox.snapshot();
    assert_eq!(messages.len(), 2, "only RunExited and RunReleased");
    assert!(matches!(messages[1].body, Some(Body::RunReleased(_))));
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
    assert_eq!(
        exit.error_code(),
        berth_proto::v1::ErrorCode::ImagePullFailed
    );
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
    assert_eq!(
        exit.error_code(),
        berth_proto::v1::ErrorCode::InvalidCommand
    );
    assert!(!runtime.calls().iter().any(|c| c.starts_with("create")));
}

#[tokio::test(start_paused = true)]
async fn output_copied_until_task_delete_is_kept() {
    let script = Script {
        late_output: Some("late"),
        runs_for: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    let (runtime, messages) = run(script, RunSpec::default()).await;
    assert!(runtime.calls().iter().any(|c| c == "delete_task run-1"));
    let last = &messages[messages.len() - 2];
    assert!(matches!(last.body, Some(Body::RunExited(_))));
    assert!(messages.iter().any(|m| matches!(&m.body,
        Some(Body::LogBatch(b)) if b.lines.iter().any(|l| l.msg == "late"))));
}

#[tokio::test(start_paused = true)]
async fn registry_credentials_reach_the_pull_and_never_the_journal() {
    let runtime = FakeRuntime::new(Script {
        runs_for: None,
        ..Default::default()
    });
    let outbox = SharedOutbox::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (state, journal) = journal();
    let spec = RunSpec {
        registry_auth: Some(RegistryAuth {
            host: "127.0.0.1:5055".to_string(),
            username: "robot".to_string(),
            password: "hunter2-secret".to_string(),
        }),
        ..Default::default()
    };
    let task = tokio::spawn(supervise(
        runtime.clone(),
        settings(),
        journal.clone(),
        assignment(spec),
        stop_rx,
        outbox.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(runtime
        .calls()
        .contains(&"pull 127.0.0.1:5055/busybox:latest as robot".to_string()));
    let run_json =
        std::fs::read_to_string(state.path().join("runs/run-1/run.json")).expect("run.json");
    assert!(!run_json.contains("hunter2"), "{run_json}");
    stop_tx.send_replace(true);
    task.await.expect("supervisor");
}

fn lines_in(messages: &[AgentMessage]) -> Vec<(u64, i32, String)> {
    messages
        .iter()
        .filter_map(|m| match &m.body {
            Some(Body::LogBatch(b)) => Some(b.lines.clone()),
            _ => None,
        })
        .flatten()
        .map(|l| (l.seq, l.stream, l.msg))
        .collect()
}

/// Resumes a crashed run as a restarted agent does (default log limits, no stop requested) and
/// returns its outbox.
async fn resume_crashed(
    runtime: &Arc<FakeRuntime>,
    dir: RunDir,
    record: RunRecord,
    recorded_exit: Option<ExitRecord>,
) -> SharedOutbox {
    let outbox = SharedOutbox::new();
    let (_stop_tx, stop_rx) = watch::channel(false);
    resume(
        runtime.clone(),
        settings(),
        dir,
        record,
        recorded_exit,
        stop_rx,
        outbox.clone(),
    )
    .await;
    outbox
}

/// What an agent killed mid-run leaves: a journal of a started run, one numbered line (not
/// acknowledged), more output since, and the task still running in the fake engine.
fn crashed_run(
    journal: &Journal,
    runtime: &FakeRuntime,
    spec: RunSpec,
    started_ago: Duration,
) -> (RunDir, RunRecord) {
    let mut record = RunRecord {
        run_id: "run-1".to_string(),
        lease_epoch: 3,
        spec,
        image_digest: "sha256:fake".to_string(),
        started_at_unix_nanos: None,
        container_id: None,
    };
    let dir = journal.create(&record).expect("journal");
    let started = unix_nanos_now() - i64::try_from(started_ago.as_nanos()).expect("nanos");
    dir.mark_started(&mut record, started).expect("mark");
    let (mut log, _, _) = crate::run::journal::LineLog::open(&dir.lines()).expect("log");
    append(&dir.stdout(), "before\nwhile-do");
    log.append(&[crate::run::journal::LineRecord {
        seq: 1,
        stream: LogStream::Stdout as i32,
        next: 7,
        ts: 1,
        msg: "before".to_string(),
        marker: false,
    }])
    .expect("append");
    append(&dir.stdout(), "wn\n");
    append(&dir.stderr(), "oops\n");
    runtime.tasks.lock().expect("lock").insert(
        "run-1".to_string(),
        FakeTask {
            out: Some(OutputFiles {
                stdout: dir.stdout(),
                stderr: dir.stderr(),
            }),
            adopted: true,
            ..Default::default()
        },
    );
    (dir, record)
}

#[tokio::test(start_paused = true)]
async fn a_resumed_run_reports_its_real_exit_and_every_line_once() {
    let runtime = FakeRuntime::new(Script {
        stdout: vec!["after"],
        runs_for: Some(Duration::from_secs(2)),
        exit_status: 5,
        ..Default::default()
    });
    let (_state, journal) = journal();
    let (dir, record) = crashed_run(
        &journal,
        &runtime,
        RunSpec::default(),
        Duration::from_secs(1),
    );
    let outbox = resume_crashed(&runtime, dir.clone(), record, None).await;
    let messages = outbox.snapshot();
    assert!(matches!(&messages[0].body,
        Some(Body::RunStarted(s)) if s.lease_epoch == 3 && s.image_digest == "sha256:fake"));
    let lines = lines_in(&messages);
    let mut seqs: Vec<u64> = lines.iter().map(|l| l.0).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3, 4], "{lines:?}");
    let stream = |s: LogStream| -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.1 == s as i32)
            .map(|l| l.2.as_str())
            .collect()
    };
    assert_eq!(
        stream(LogStream::Stdout),
        vec!["before", "while-down", "after"]
    );
    assert_eq!(stream(LogStream::Stderr), vec!["oops"]);
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Exited as i32, 5)
    );
    assert_eq!(
        dir.read_exit().expect("exit").map(|e| e.exit_code),
        Some(5),
        "the exit is recorded before cleanup"
    );
    assert_eq!(
        runtime.calls().last().map(String::as_str),
        Some("cleanup run-1")
    );
}

#[tokio::test(start_paused = true)]
async fn a_resumed_run_keeps_its_original_timeout() {
    let runtime = FakeRuntime::new(Script {
        runs_for: None,
        ..Default::default()
    });
    let (_state, journal) = journal();
    let spec = RunSpec {
        timeout_seconds: 3,
        stop_grace_seconds: 1,
        ..Default::default()
    };
    let (dir, record) = crashed_run(&journal, &runtime, spec, Duration::from_secs(2));
    let begin = tokio::time::Instant::now();
    let outbox = resume_crashed(&runtime, dir, record, None).await;
    let exit = exit_of(&outbox.snapshot());
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Timeout as i32, 124)
    );
    let elapsed = begin.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(2),
        "about 1 s of the timeout was left: {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_recorded_exit_is_re_sent_without_touching_the_task_again() {
    let runtime = FakeRuntime::new(Script::default());
    let (_state, journal) = journal();
    let (dir, record) = crashed_run(
        &journal,
        &runtime,
        RunSpec::default(),
        Duration::from_secs(1),
    );
    dir.write_acked(1).expect("ack");
    let recorded = crate::run::journal::ExitRecord {
        reason: ExitReason::Exited as i32,
        exit_code: 0,
        exited_at_unix_nanos: 42,
        error_code: String::new(),
        error_message: String::new(),
        oom_killed: false,
    };
    let outbox = resume_crashed(&runtime, dir, record, Some(recorded)).await;
    let messages = outbox.snapshot();
    // Line 1 was acknowledged; the rest of the output is numbered from 2.
    let mut seqs: Vec<u64> = lines_in(&messages).iter().map(|l| l.0).collect();
    seqs.sort();
    assert_eq!(seqs, vec![2, 3]);
    let exit = exit_of(&messages);
    assert_eq!((exit.exit_code, exit.exited_at_unix_nanos), (0, 42));
    let calls = runtime.calls();
    assert!(!calls.iter().any(|c| c.starts_with("watch")), "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("cleanup run-1"));
}

#[tokio::test(start_paused = true)]
async fn a_vanished_task_still_ends_the_run() {
    let runtime = FakeRuntime::new(Script::default());
    let (_state, journal) = journal();
    let (dir, record) = crashed_run(
        &journal,
        &runtime,
        RunSpec::default(),
        Duration::from_secs(1),
    );
    runtime.tasks.lock().expect("lock").clear();
    let outbox = resume_crashed(&runtime, dir, record, None).await;
    let exit = exit_of(&outbox.snapshot());
    assert_eq!(exit.exit_code, -1);
    assert_eq!(exit.error_code(), berth_proto::v1::ErrorCode::TaskFailed);
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_reported_when_the_run_failed() {
    let script = Script {
        runs_for: Some(Duration::from_millis(5)),
        exit_status: 137,
        oom_kills: Some(1),
        ..Default::default()
    };
    let (runtime, messages) = run(script, RunSpec::default()).await;
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code, exit.oom_killed),
        (ExitReason::Exited as i32, 137, true)
    );
    let calls = runtime.calls();
    let asked = calls.iter().position(|c| c == "oom_kills run-1");
    // The task (and its cgroup) goes with the cleanup here, or earlier when the output had to
    // be drained by deleting it: the counter is read before either.
    let gone = calls
        .iter()
        .position(|c| c == "delete_task run-1" || c == "cleanup run-1");
    assert!(
        asked.is_some() && asked < gone,
        "the counter is read before the task (and its cgroup) goes: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_oom_kill_is_reported_for_a_success_a_timeout_or_an_empty_counter() {
    let succeeded = Script {
        runs_for: Some(Duration::from_millis(5)),
        exit_status: 0,
        oom_kills: Some(2),
        ..Default::default()
    };
    let (_, messages) = run(succeeded, RunSpec::default()).await;
    assert!(
        !exit_of(&messages).oom_killed,
        "a run that exits 0 succeeded"
    );
    let killed_otherwise = Script {
        runs_for: Some(Duration::from_millis(5)),
        exit_status: 137,
        oom_kills: Some(0),
        ..Default::default()
    };
    let (_, messages) = run(killed_otherwise, RunSpec::default()).await;
    assert!(!exit_of(&messages).oom_killed);
    let timed_out = Script {
        runs_for: None,
        oom_kills: Some(1),
        ..Default::default()
    };
    let spec = RunSpec {
        timeout_seconds: 1,
        ..Default::default()
    };
    let (_, messages) = run(timed_out, spec).await;
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.oom_killed),
        (ExitReason::Timeout as i32, false)
    );
}

#[tokio::test(start_paused = true)]
async fn a_re_adopted_run_that_was_oom_killed_is_reported_so() {
    let runtime = FakeRuntime::new(Script {
        runs_for: Some(Duration::from_millis(5)),
        exit_status: 137,
        oom_kills: Some(1),
        ..Default::default()
    });
    let (_state, journal) = journal();
    let (dir, record) = crashed_run(
        &journal,
        &runtime,
        RunSpec::default(),
        Duration::from_secs(1),
    );
    let outbox = resume_crashed(&runtime, dir.clone(), record, None).await;
    assert!(exit_of(&outbox.snapshot()).oom_killed);
    assert_eq!(
        dir.read_exit().expect("exit").map(|e| e.oom_killed),
        Some(true),
        "recorded, so a restart re-sends it as it was"
    );
}

#[tokio::test(start_paused = true)]
async fn the_node_pids_limit_reaches_the_containers_spec() {
    let runtime = FakeRuntime::new(Script {
        runs_for: Some(Duration::from_millis(1)),
        ..Default::default()
    });
    let (_state, journal) = journal();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let settings = SupervisorSettings {
        runtimes: Default::default(),
        pids_limit: 77,
        ..settings()
    };
    supervise(
        runtime.clone(),
        settings,
        journal,
        assignment(RunSpec::default()),
        stop_rx,
        SharedOutbox::new(),
    )
    .await;
    assert!(
        runtime
            .calls()
            .contains(&"create run-1 pids=77".to_string()),
        "{:?}",
        runtime.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn uploaded_files_are_in_place_before_create_and_gone_after_cleanup() {
    let runtime = FakeRuntime::new(Script {
        runs_for: Some(Duration::from_millis(10)),
        ..Default::default()
    });
    let outbox = SharedOutbox::new();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let (state, journal) = journal();
    let spec = RunSpec {
        files: vec![berth_proto::v1::RunFile {
            path: "/etc/berth/config.json".to_string(),
            content: b"{\"a\":1}".to_vec(),
            mode: 0o444,
        }],
        ..Default::default()
    };
    supervise(
        runtime.clone(),
        settings(),
        journal.clone(),
        assignment(spec),
        stop_rx,
        outbox.clone(),
    )
    .await;
    let files_dir = state.path().join("runs/run-1/files");
    let calls = runtime.calls();
    let want = format!(
        "bind {} -> /etc/berth/config.json [\"rbind\", \"ro\", \"nosuid\", \"nodev\"] {{\"a\":1}}",
        files_dir.join("0").display()
    );
    let bind = calls.iter().position(|c| *c == want);
    let create = calls.iter().position(|c| c.starts_with("create"));
    assert!(bind.is_some() && create < bind, "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("cleanup run-1"));
    assert!(!files_dir.exists(), "the host copy goes with the run");
    // The journal (kept until the exit is acknowledged) does not hold the content either.
    let record = journal.run_dir("run-1").read_record().expect("record");
    assert!(record.spec.files.is_empty());
    assert_eq!(exit_of(&outbox.snapshot()).exit_code, 0);
}

#[tokio::test(start_paused = true)]
async fn the_timeout_counts_from_the_process_start_not_the_pull() {
    let script = Script {
        pull_delay: Duration::from_secs(5),
        runs_for: Some(Duration::from_secs(3)),
        exit_status: 0,
        ..Default::default()
    };
    let (_, messages) = run(
        script,
        RunSpec {
            timeout_seconds: 4,
            ..Default::default()
        },
    )
    .await;
    // Pull (5 s) + run (3 s) is past the 4 s timeout, yet the process finished in time.
    let exit = exit_of(&messages);
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Exited as i32, 0)
    );
}

/// When the fake clock started counting a run's writes (the tests run one writer each).
static STARTED: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();

/// A run that writes past the node's per-run disk limit is killed at once (no SIGTERM grace)
/// and ends `disk_limit_exceeded`, saying how much it wrote; within the limit nothing happens.
#[tokio::test(start_paused = true)]
async fn a_run_that_writes_past_the_disk_limit_is_killed_with_a_clear_error() {
    let _ = STARTED.set(tokio::time::Instant::now());
    let script = Script {
        runs_for: None,
        writes_per_second: Some(100 << 20),
        ..Default::default()
    };
    let runtime = FakeRuntime::new(script);
    let outbox = SharedOutbox::new();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let (_state, journal) = journal();
    let settings = SupervisorSettings {
        runtimes: Default::default(),
        max_disk_bytes: Some(450 << 20),
        sandboxes: None,
        ..settings()
    };
    supervise(
        runtime.clone(),
        settings,
        journal,
        assignment(RunSpec::default()),
        stop_rx,
        outbox.clone(),
    )
    .await;
    let exit = exit_of(&outbox.snapshot());
    assert_eq!(exit.exit_code, 137, "{exit:?}");
    assert_eq!(
        exit.error_code(),
        berth_proto::v1::ErrorCode::DiskLimitExceeded
    );
    assert!(
        exit.error_message
            .contains("more than this node allows a run (450 MiB)"),
        "{}",
        exit.error_message
    );
    let kills: Vec<String> = runtime
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("kill"))
        .collect();
    assert_eq!(
        kills,
        ["kill run-1 9 all=true"],
        "SIGKILL at once, to every process"
    );
}
