use super::*;
use crate::run::logs::LogLimits;
use crate::runtime::{Created, ExitWatch, OutputFiles, PreparedImage, RuntimeError, StopSignal};
use berth_proto::v1::{Ack, RegistryAuth, RunSpec};

/// A runtime whose pulls fail after `pull_takes` (or never end): enough to have runs in
/// flight without containers.
struct SlowPulls {
    pull_takes: Option<Duration>,
    /// Runs holding a network (what `list_networks` reports).
    networks: Vec<String>,
    cleaned: std::sync::Mutex<Vec<String>>,
}

impl ContainerRuntime for SlowPulls {
    fn cached_images(&self) -> Vec<String> {
        Vec::new()
    }
    async fn pull_image(
        &self,
        image: &str,
        _auth: Option<&RegistryAuth>,
    ) -> Result<PreparedImage, RuntimeError> {
        match self.pull_takes {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
        Err(RuntimeError::ImagePull {
            image: image.to_string(),
            message: "unreachable".to_string(),
        })
    }
    async fn create(
        &self,
        _run_id: &str,
        _image: &PreparedImage,
        _spec: &oci_spec::runtime::Spec,
        _output: &OutputFiles,
    ) -> Result<Created, RuntimeError> {
        Err(RuntimeError::Create("not in this test".to_string()))
    }
    async fn watch_exit(&self, _run_id: &str) -> Result<ExitWatch, RuntimeError> {
        Err(RuntimeError::Create("not in this test".to_string()))
    }
    async fn start(&self, _run_id: &str) -> Result<i64, RuntimeError> {
        Err(RuntimeError::Start("not in this test".to_string()))
    }
    async fn kill(&self, _: &str, _: StopSignal, _: bool) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn oom_kills(&self, _run_id: &str) -> Option<u64> {
        None
    }
    async fn delete_task(&self, _run_id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn cleanup(&self, run_id: &str) {
        self.cleaned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(run_id.to_string());
    }
    async fn list_containers(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    fn list_networks(&self) -> Vec<String> {
        self.networks.clone()
    }
}

fn agent(state: &std::path::Path, pull_takes: Option<Duration>) -> Arc<Agent<SlowPulls>> {
    let config = AgentConfig {
        runtimes: Default::default(),
        schedulers: berth_core::failover::SchedulerAddrs::parse("http://127.0.0.1:1").expect("url"),
        node_id: "n1".to_string(),
        region: "test".to_string(),
        total_memory_mib: 1024,
        cpus: 1,
        max_runs: 4,
        containerd_socket: state.join("containerd.sock"),
        namespace: "test".to_string(),
        cgroup_parent: "berth/n1".to_string(),
        state_dir: state.to_path_buf(),
        insecure_registries: vec![],
        pids_limit: 1024,
        log_limits: LogLimits::default(),
        shutdown_grace: Duration::from_secs(30),
        credential: None,
        max_sandboxes: 0,
        sandbox_max_idle: Duration::from_secs(600),
        max_run_disk_bytes: None,
        ephemeral: None,
    };
    Arc::new(Agent::new(
        config,
        Arc::new(SlowPulls {
            pull_takes,
            networks: vec![],
            cleaned: Default::default(),
        }),
    ))
}

fn assign(agent: &Agent<SlowPulls>, run_id: &str) {
    agent.handle(SchedulerMessage {
        body: Some(scheduler_message::Body::AssignRun(AssignRun {
            run_id: run_id.to_string(),
            lease_epoch: 2,
            runner_id: String::new(),
            traceparent: String::new(),
            spec: Some(RunSpec {
                image: "127.0.0.1:5/busybox:latest".to_string(),
                ..Default::default()
            }),
        })),
    });
}

fn exits(agent: &Agent<SlowPulls>) -> Vec<RunExited> {
    agent
        .outbox()
        .snapshot()
        .into_iter()
        .filter_map(|m| match m.body {
            Some(Body::RunExited(e)) => Some(e),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_draining_agent_refuses_new_runs_as_node_draining() {
    let state = tempfile::tempdir().expect("tempdir");
    let agent = agent(state.path(), None);
    agent.draining.store(true, Ordering::SeqCst);
    assign(&agent, "r1");
    let exits = exits(&agent);
    assert_eq!(exits.len(), 1);
    let exit = &exits[0];
    assert_eq!(
        (exit.reason, exit.exit_code, exit.lease_epoch),
        (ExitReason::StartFailed as i32, -1, 2)
    );
    assert_eq!(exit.error_code(), berth_proto::v1::ErrorCode::NodeDraining);
    assert!(agent.runs().is_empty(), "nothing was started");
}

#[tokio::test(start_paused = true)]
async fn drain_returns_once_runs_ended_and_were_acknowledged() {
    let state = tempfile::tempdir().expect("tempdir");
    let idle = agent(state.path(), None);
    let begin = tokio::time::Instant::now();
    idle.drain().await;
    assert!(
        begin.elapsed() < Duration::from_secs(1),
        "nothing to wait for"
    );

    let agent = agent(state.path(), Some(Duration::from_secs(3)));
    // A scheduler is there to acknowledge: the drain waits for it.
    agent.connected.store(true, Ordering::SeqCst);
    assign(&agent, "r1");
    let acker = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(exit) = agent
                    .outbox()
                    .snapshot()
                    .into_iter()
                    .find(|m| matches!(m.body, Some(Body::RunReleased(_))))
                {
                    agent.handle(SchedulerMessage {
                        body: Some(scheduler_message::Body::Ack(Ack {
                            up_to_seq: exit.seq,
                        })),
                    });
                    return;
                }
            }
        })
    };
    let begin = tokio::time::Instant::now();
    agent.drain().await;
    let waited = begin.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(5),
        "waited for the run, not the whole grace: {waited:?}"
    );
    assert!(agent.runs().is_empty() && agent.outbox().is_empty());
    acker.await.expect("acker");
}

#[tokio::test(start_paused = true)]
async fn with_no_scheduler_drain_returns_once_runs_ended_without_waiting_for_acknowledgements() {
    let state = tempfile::tempdir().expect("tempdir");
    let agent = agent(state.path(), Some(Duration::from_secs(3)));
    assign(&agent, "r1");
    let begin = tokio::time::Instant::now();
    agent.drain().await;
    let waited = begin.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(5),
        "waited for the run, not for acknowledgements nobody sends: {waited:?}"
    );
    assert_eq!(exits(&agent).len(), 1, "its exit waits for the next start");
    assert!(
        agent.runs().contains_key("r1"),
        "not acknowledged, so not forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_after_the_grace() {
    let state = tempfile::tempdir().expect("tempdir");
    let agent = agent(state.path(), None);
    assign(&agent, "r1");
    let begin = tokio::time::Instant::now();
    agent.drain().await;
    let waited = begin.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    assert!(agent.runs().contains_key("r1"), "left for the next start");
}

#[tokio::test]
async fn recovery_releases_networks_of_runs_nobody_knows() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = agent(state.path(), None).config.clone();
    config.state_dir = state.path().to_path_buf();
    let runtime = Arc::new(SlowPulls {
        pull_takes: None,
        networks: vec!["gone-1".to_string(), "gone-2".to_string()],
        cleaned: Default::default(),
    });
    let agent = Agent::new(config, runtime.clone());
    agent.recover().await;
    let cleaned = runtime.cleaned.lock().expect("lock").clone();
    assert_eq!(cleaned, vec!["gone-1".to_string(), "gone-2".to_string()]);
    assert!(agent.runs().is_empty(), "nothing re-adopted");
}

/// A scheduler that ends the session on every log batch that is not made of refusal markers,
/// and acknowledges everything else.
struct RefusingScheduler {
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    delivered: mpsc::UnboundedSender<berth_proto::v1::LogBatch>,
}

#[tonic::async_trait]
impl berth_proto::v1::agent_service_server::AgentService for RefusingScheduler {
    type AttachStream = ReceiverStream<Result<SchedulerMessage, tonic::Status>>;

    async fn enroll(
        &self,
        _: tonic::Request<berth_proto::v1::EnrollRequest>,
    ) -> Result<tonic::Response<berth_proto::v1::EnrollResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("this fake does not enroll"))
    }

    async fn leave(
        &self,
        _: tonic::Request<berth_proto::v1::LeaveRequest>,
    ) -> Result<tonic::Response<berth_proto::v1::LeaveResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "this fake does not take leaves",
        ))
    }

    async fn attach(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::AttachStream>, tonic::Status> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let delivered = self.delivered.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let reply = match message.body {
                    Some(Body::Register(_)) => {
                        scheduler_message::Body::Registered(berth_proto::v1::Registered {
                            heartbeat_interval_seconds: 1,
                            stale_run_ids: vec![],
                        })
                    }
                    Some(Body::LogBatch(batch)) => {
                        let defused = batch
                            .lines
                            .iter()
                            .all(|l| l.msg.starts_with(crate::outbox::REFUSED_MARKER_PREFIX));
                        if !defused {
                            let _ = tx
                                .send(Err(tonic::Status::resource_exhausted("batch refused")))
                                .await;
                            return;
                        }
                        let _ = delivered.send(batch);
                        scheduler_message::Body::Ack(Ack {
                            up_to_seq: message.seq,
                        })
                    }
                    _ => continue,
                };
                if tx
                    .send(Ok(SchedulerMessage { body: Some(reply) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// The scheduler keeps ending the session on the same log batch (whatever the reason): after
/// REFUSALS_BEFORE_DEFUSE sessions the agent sends it with its lines' text replaced by the
/// reason, instead of re-sending it unchanged forever.
#[tokio::test]
async fn a_log_batch_the_scheduler_keeps_refusing_goes_out_as_markers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel();
    let service = RefusingScheduler {
        sessions: sessions.clone(),
        delivered: delivered_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(berth_proto::v1::agent_service_server::AgentServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let state = tempfile::tempdir().expect("tempdir");
    let base = agent(state.path(), None);
    let agent = Agent::new(
        AgentConfig {
            runtimes: Default::default(),
            schedulers: berth_core::failover::SchedulerAddrs::parse(&format!("http://{addr}"))
                .expect("url"),
            ..base.config.clone()
        },
        Arc::new(SlowPulls {
            pull_takes: None,
            networks: vec![],
            cleaned: Default::default(),
        }),
    );
    agent
        .outbox()
        .push(Body::LogBatch(berth_proto::v1::LogBatch {
            run_id: "r1".to_string(),
            lines: vec![berth_proto::v1::LogLine {
                seq: 7,
                stream: 1,
                msg: "the batch the scheduler will not take".to_string(),
                ts_unix_nanos: 1,
            }],
        }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let batch = tokio::time::timeout(Duration::from_secs(30), delivered.recv())
        .await
        .expect("the batch got through in time")
        .expect("a batch");
    assert_eq!(batch.lines.len(), 1);
    assert_eq!(batch.lines[0].seq, 7, "the line keeps its number");
    let text = &batch.lines[0].msg;
    assert!(
        text.starts_with(crate::outbox::REFUSED_MARKER_PREFIX) && text.contains("batch refused"),
        "the marker gives the reason: {text}"
    );
    assert_eq!(
        sessions.load(Ordering::SeqCst),
        crate::outbox::REFUSALS_BEFORE_DEFUSE as usize + 1,
        "refused three times, then delivered"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
}

/// Serves [`RefusingScheduler`] (which registers every session) on a loopback port.
async fn registering_scheduler() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (delivered, _) = mpsc::unbounded_channel();
    let service = RefusingScheduler {
        sessions: sessions.clone(),
        delivered,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(berth_proto::v1::agent_service_server::AgentServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, sessions)
}

/// Runs an agent given `schedulers` until it opened a session with the scheduler counting
/// `sessions`; returns how long that took.
async fn time_to_attach(
    schedulers: &str,
    sessions: &std::sync::atomic::AtomicUsize,
    within: Duration,
) -> Duration {
    let state = tempfile::tempdir().expect("tempdir");
    let base = agent(state.path(), None);
    let agent = Agent::new(
        AgentConfig {
            runtimes: Default::default(),
            schedulers: berth_core::failover::SchedulerAddrs::parse(schedulers).expect("urls"),
            ..base.config.clone()
        },
        Arc::new(SlowPulls {
            pull_takes: None,
            networks: vec![],
            cleaned: Default::default(),
        }),
    );
    let started = std::time::Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let attached = async {
        while sessions.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let took = tokio::time::timeout(within, attached)
        .await
        .map(|()| started.elapsed());
    let _ = stop.send(());
    running.abort();
    took.unwrap_or_else(|_| panic!("no session within {within:?}"))
}

#[tokio::test]
async fn an_agent_registers_with_the_next_address_when_the_first_refuses() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = format!("http://{}", closed.local_addr().expect("addr"));
    let (url, sessions) = registering_scheduler().await;
    // Released only once the live scheduler has its port, so the two cannot be the same.
    drop(closed);
    let took = time_to_attach(
        &format!("{refused},{url}"),
        &sessions,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("registered with the second address after {took:?}");
}

/// A frozen scheduler (SIGSTOP) accepts connections and answers nothing: the HTTP/2 keepalive
/// gives it up, well before the 10 s register timeout would.
#[tokio::test]
async fn an_agent_leaves_a_frozen_scheduler_for_the_next_address_within_seconds() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let frozen = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let (url, sessions) = registering_scheduler().await;
    let took = time_to_attach(
        &format!("{frozen},{url}"),
        &sessions,
        Duration::from_secs(8),
    )
    .await;
    eprintln!("left the frozen scheduler after {took:?}");
}
