//! END-TO-END against a real containerd and registry (tier 3). Needs root, cgroup v1 and:
//! - `BERTH_CONTAINERD_SOCKET`: a containerd 1.6 gRPC socket;
//! - `BERTH_TEST_REGISTRY`: `host:port` of a plain-HTTP registry holding `busybox:latest` (a
//!   busybox-static image whose /bin has sh, echo, sleep).
//!
//! It FAILS when they are missing, on purpose: a silently skipped end-to-end test proves nothing.
//! Run it with `cargo test -p berth-node-agent --test e2e_containerd -- --nocapture`.
//!
//! A fake scheduler (the real `AgentService` gRPC contract on 127.0.0.1:0) assigns runs to the
//! real agent and checks the reports.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_node_agent::config::AgentConfig;
use berth_node_agent::containerd::{ContainerdRuntime, ContainerdSettings};
use berth_node_agent::image::pull::Puller;
use berth_node_agent::image::registry::RegistryClient;
use berth_node_agent::scheduler_link::session::Agent;
use berth_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use berth_proto::v1::{
    agent_message::Body, scheduler_message, Ack, AgentMessage, AssignRun, ExitReason, LogLine,
    LogStream, Registered, RunExited, RunSpec, SchedulerMessage, StopRun,
};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use containerd_client::services::v1::{ListContainersRequest, ListRequest};
use futures::Stream;
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const NAMESPACE: &str = "berth-e2e";
const CGROUP_PARENT: &str = "berth/e2e";

struct FakeScheduler {
    /// Everything agents send, for the test to inspect.
    seen: mpsc::UnboundedSender<AgentMessage>,
    /// The test's commands for the (single) attached agent.
    commands: Arc<Mutex<mpsc::UnboundedReceiver<SchedulerMessage>>>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FakeScheduler {
    type AttachStream = OutStream;

    async fn enroll(
        &self,
        _: Request<berth_proto::v1::EnrollRequest>,
    ) -> Result<Response<berth_proto::v1::EnrollResponse>, Status> {
        Err(Status::unimplemented("this fake does not enroll"))
    }

    async fn leave(
        &self,
        _: Request<berth_proto::v1::LeaveRequest>,
    ) -> Result<Response<berth_proto::v1::LeaveResponse>, Status> {
        Err(Status::unimplemented("this fake does not take leaves"))
    }

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let seen = self.seen.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let mut commands = commands.lock().await;
            // Like the real scheduler, say nothing before the agent's Register has been answered.
            let mut registered = false;
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let Ok(Some(message)) = message else { return };
                        if matches!(message.body, Some(Body::Register(_))) {
                            registered = true;
                            let _ = tx.send(Ok(SchedulerMessage { body: Some(scheduler_message::Body::Registered(Registered {
                                heartbeat_interval_seconds: 1,
                                stale_run_ids: vec![],
                            })) })).await;
                        }
                        if message.seq > 0 {
                            let _ = tx.send(Ok(SchedulerMessage { body: Some(scheduler_message::Body::Ack(Ack { up_to_seq: message.seq })) })).await;
                        }
                        let _ = seen.send(message);
                    }
                    Some(command) = commands.recv(), if registered => {
                        if tx.send(Ok(command)).await.is_err() { return; }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this end-to-end test needs a real containerd and registry (see the file header)")
    })
}

#[derive(Default)]
struct RunReport {
    started: bool,
    image_digest: String,
    lines: Vec<LogLine>,
    exit: Option<RunExited>,
    /// Set when a log line arrived after RunExited (must never happen).
    line_after_exit: bool,
    /// RunReleased arrived: the run is cleaned up (it follows RunExited).
    released: bool,
}

struct Harness {
    seen: mpsc::UnboundedReceiver<AgentMessage>,
    commands: mpsc::UnboundedSender<SchedulerMessage>,
    reports: HashMap<String, RunReport>,
}

impl Harness {
    fn absorb(&mut self, message: AgentMessage) {
        match message.body {
            Some(Body::RunStarted(s)) => {
                let r = self.reports.entry(s.run_id.clone()).or_default();
                r.started = true;
                r.image_digest = s.image_digest;
            }
            Some(Body::LogBatch(b)) => {
                let r = self.reports.entry(b.run_id.clone()).or_default();
                if r.exit.is_some() {
                    r.line_after_exit = true;
                }
                r.lines.extend(b.lines);
            }
            Some(Body::RunExited(e)) => {
                let id = e.run_id.clone();
                self.reports.entry(id).or_default().exit = Some(e);
            }
            Some(Body::RunReleased(r)) => {
                let report = self.reports.entry(r.run_id).or_default();
                // Released only after the exit was reported.
                assert!(report.exit.is_some(), "RunReleased before RunExited");
                report.released = true;
            }
            _ => {}
        }
    }

    async fn until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&HashMap<String, RunReport>) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        while !done(&self.reports) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.seen.recv()).await {
                Ok(Some(message)) => self.absorb(message),
                _ => panic!("condition not met within {limit:?}"),
            }
        }
    }

    fn assign(&self, run_id: &str, spec: RunSpec) {
        self.commands
            .send(SchedulerMessage {
                body: Some(scheduler_message::Body::AssignRun(AssignRun {
                    run_id: run_id.to_string(),
                    lease_epoch: 1,
                    spec: Some(spec),
                    runner_id: String::new(),
                    traceparent: String::new(),
                })),
            })
            .expect("scheduler alive");
    }

    async fn exit_of(&mut self, run_id: &str, limit: Duration) -> RunExited {
        let id = run_id.to_string();
        self.until(limit, |r| r.get(&id).is_some_and(|r| r.exit.is_some()))
            .await;
        self.reports[run_id].exit.clone().expect("exit")
    }

    /// Waits for the run's RunReleased: its container, cgroups and files are gone.
    async fn released(&mut self, run_id: &str, limit: Duration) {
        let id = run_id.to_string();
        self.until(limit, |r| r.get(&id).is_some_and(|r| r.released))
            .await;
    }
}

fn shell(image: &str, script: &str) -> RunSpec {
    RunSpec {
        image: image.to_string(),
        cmd_set: true,
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        memory_mib: 64,
        cpu_millis: 500,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_containers_end_to_end() {
    let socket = required_env("BERTH_CONTAINERD_SOCKET");
    let registry = required_env("BERTH_TEST_REGISTRY");
    let image = format!("{registry}/busybox:latest");
    let _ = tracing_subscriber::fmt()
        .with_env_filter("berth_node_agent=debug")
        .try_init();

    // Fake scheduler.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let service = FakeScheduler {
        seen: seen_tx,
        commands: Arc::new(Mutex::new(cmd_rx)),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // The real agent.
    let state = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig {
        runtimes: Default::default(),
        schedulers: berth_core::failover::SchedulerAddrs::parse(&format!("http://{addr}"))
            .expect("url"),
        node_id: "e2e".into(),
        region: "test".into(),
        total_memory_mib: 1024,
        cpus: 2,
        max_runs: 8,
        containerd_socket: PathBuf::from(&socket),
        namespace: NAMESPACE.into(),
        cgroup_parent: CGROUP_PARENT.into(),
        state_dir: state.path().to_path_buf(),
        insecure_registries: vec![],
        pids_limit: berth_node_agent::run::spec::DEFAULT_PIDS_LIMIT,
        log_limits: Default::default(),
        shutdown_grace: Duration::from_secs(5),
        credential: None,
        max_sandboxes: 0,
        sandbox_max_idle: Duration::from_secs(600),
        max_run_disk_bytes: None,
        ephemeral: None,
    };
    let channel = containerd_client::connect(&socket)
        .await
        .expect("containerd");
    let puller = Arc::new(Puller::new(
        channel.clone(),
        NAMESPACE.into(),
        RegistryClient::new(vec![]),
    ));
    let runtime = Arc::new(ContainerdRuntime::new(
        channel.clone(),
        ContainerdSettings {
            sandbox_binary: None,
            namespace: NAMESPACE.into(),
            cgroup_parent: CGROUP_PARENT.into(),
            cgroups: berth_node_agent::run::cgroup::Cgroups::detect(std::path::Path::new(
                berth_node_agent::run::cgroup::CGROUP_ROOT,
            ))
            .expect("a cgroup layout the agent knows"),
            min_free_disk_bytes: 0,
            shim_groups: None,
        },
        puller,
        None,
    ));
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config, runtime).run(async {
        let _ = agent_stopped.await;
    }));

    let mut h = Harness {
        seen: seen_rx,
        commands: cmd_tx,
        reports: HashMap::new(),
    };
    h.until(Duration::from_secs(10), |_| true).await;

    // 1. stdout and stderr, in order; two concurrent runs of one image share one pull.
    h.assign(
        "e2e-echo",
        shell(&image, "echo out1; echo err1 >&2; echo out2; printf tail"),
    );
    h.assign("e2e-exit3", shell(&image, "exit 3"));
    let exit = h.exit_of("e2e-echo", Duration::from_secs(30)).await;
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Exited as i32, 0),
        "{exit:?}"
    );
    let report = &h.reports["e2e-echo"];
    assert!(report.started && report.image_digest.starts_with("sha256:"));
    assert!(!report.line_after_exit);
    let mut lines: Vec<(u64, i32, String)> = report
        .lines
        .iter()
        .map(|l| (l.seq, l.stream, l.msg.clone()))
        .collect();
    lines.sort();
    let out: Vec<&str> = lines
        .iter()
        .filter(|l| l.1 == LogStream::Stdout as i32)
        .map(|l| l.2.as_str())
        .collect();
    let err: Vec<&str> = lines
        .iter()
        .filter(|l| l.1 == LogStream::Stderr as i32)
        .map(|l| l.2.as_str())
        .collect();
    assert_eq!(out, vec!["out1", "out2", "tail"]);
    assert_eq!(err, vec!["err1"]);
    assert_eq!(
        lines.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );

    // 2. exit code.
    let exit = h.exit_of("e2e-exit3", Duration::from_secs(30)).await;
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Exited as i32, 3),
        "{exit:?}"
    );

    // 3. timeout.
    let begin = Instant::now();
    h.assign(
        "e2e-timeout",
        RunSpec {
            timeout_seconds: 1,
            ..shell(&image, "sleep 30")
        },
    );
    let exit = h.exit_of("e2e-timeout", Duration::from_secs(20)).await;
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Timeout as i32, 124),
        "{exit:?}"
    );
    assert!(
        begin.elapsed() < Duration::from_secs(8),
        "timeout took {:?}",
        begin.elapsed()
    );

    // 4. stop of a running run, with its memory limit visible while it runs.
    h.assign(
        "e2e-stop",
        RunSpec {
            stop_grace_seconds: 1,
            ..shell(&image, "trap 'exit 7' TERM; while true; do sleep 0.1; done")
        },
    );
    h.until(Duration::from_secs(20), |r| {
        r.get("e2e-stop").is_some_and(|r| r.started)
    })
    .await;
    let limit_file =
        format!("/sys/fs/cgroup/memory/{CGROUP_PARENT}/e2e-stop/memory.limit_in_bytes");
    let limit =
        std::fs::read_to_string(&limit_file).expect("memory limit file exists while running");
    assert_eq!(limit.trim(), (64u64 * 1024 * 1024).to_string());
    h.commands
        .send(SchedulerMessage {
            body: Some(scheduler_message::Body::StopRun(StopRun {
                run_id: "e2e-stop".into(),
            })),
        })
        .expect("scheduler alive");
    let exit = h.exit_of("e2e-stop", Duration::from_secs(20)).await;
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::Stopped as i32, 7),
        "{exit:?}"
    );
    // The exit is reported first; the cleanup follows, then RunReleased.
    h.released("e2e-stop", Duration::from_secs(20)).await;
    assert!(
        !std::path::Path::new(&limit_file).exists(),
        "cgroup removed"
    );

    // 5. pull failure.
    h.assign(
        "e2e-nopull",
        shell(&format!("{registry}/does-not-exist:latest"), "true"),
    );
    let exit = h.exit_of("e2e-nopull", Duration::from_secs(20)).await;
    assert_eq!(exit.reason, ExitReason::StartFailed as i32);
    assert_eq!(
        (exit.exit_code, exit.error_code()),
        (-1, berth_proto::v1::ErrorCode::ImagePullFailed),
        "{exit:?}"
    );

    // Nothing of any run is left in containerd once each is released.
    for run in h.reports.keys().cloned().collect::<Vec<_>>() {
        h.released(&run, Duration::from_secs(20)).await;
    }
    let containers = ContainersClient::new(channel.clone())
        .list(ns(Request::new(ListContainersRequest { filters: vec![] })))
        .await
        .expect("list containers")
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "containers left: {containers:?}");
    let leases = LeasesClient::new(channel.clone())
        .list(ns(Request::new(ListRequest { filters: vec![] })))
        .await
        .expect("list leases")
        .into_inner()
        .leases;
    assert!(leases.is_empty(), "leases left: {leases:?}");
    let mut snapshots = SnapshotsClient::new(channel.clone())
        .list(ns(Request::new(ListSnapshotsRequest {
            snapshotter: "overlayfs".into(),
            filters: vec![],
        })))
        .await
        .expect("list snapshots")
        .into_inner();
    while let Some(page) = snapshots.message().await.expect("snapshots") {
        for info in page.info {
            assert!(
                !info.name.starts_with("e2e-") && !info.name.starts_with("berth-extract"),
                "snapshot left: {}",
                info.name
            );
        }
    }
    let _ = stop_agent.send(());
    let _ = agent.await;
}

fn ns<T>(mut r: Request<T>) -> Request<T> {
    r.metadata_mut()
        .insert("containerd-namespace", NAMESPACE.parse().expect("ascii"));
    r
}
