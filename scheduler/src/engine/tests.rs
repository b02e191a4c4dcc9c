//! Engine tests against the in-memory store, with a recorder standing in for each agent.

use super::*;
use crate::placement::NodeStatus;
use berth_core::agent::{
    AgentCommand, AgentLink, AssignRun, ExitReason, Heartbeat, LinkClosed, LogBatch, LogLine,
    PullFor, PullProgress, Registration, RunExited, RunStarted, WarmupResult,
};
use berth_core::model::ImagePull;
use berth_core::model::LogStream;
use berth_core::model::WarmupStatus;
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, MemoryStore};
use berth_core::validate::RegistrySpec;
use berth_core::validate::RunInput;
use berth_core::{EnvVar, RunnerSpec};

/// The project every test acts in unless it says otherwise.
const P: &str = berth_core::auth::DEFAULT_PROJECT;

fn spec(region: &str, itype: &str) -> RunnerSpec {
    RunnerSpec {
        name: "test-runner".into(),
        image_name: "busybox".into(),
        image_tag: "latest".into(),
        run_command: Some("echo hi".into()),
        argv: vec![],
        entrypoint: None,
        timeout_seconds: 30,
        region: region.into(),
        instance_type: itype.into(),
        env_variables: vec![EnvVar {
            env_key: "A".into(),
            env_val: "1".into(),
            secret: false,
        }],
        container_registry_id: None,
        stop_grace_seconds: None,
    }
}

fn register(node: &str, region: &str, mem: u64, active: &[&str]) -> Registration {
    Registration {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        region: region.into(),
        total_memory_mib: mem,
        cpus: 2,
        max_concurrent_runs: 8,
        active_run_ids: active.iter().map(|s| s.to_string()).collect(),
        agent_version: "test".into(),
        cached_images: vec![],
    }
}

fn config() -> Config {
    Config {
        default_registry: "127.0.0.1:5000".into(),
        stop_wait: Duration::from_millis(200),
        ..Config::default()
    }
}

/// The fake agent: records every command the engine sends it, in order, for the test to read
/// from the other end.
struct Recorder(mpsc::UnboundedSender<AgentCommand>);

impl AgentLink for Recorder {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed> {
        self.0.send(command).map_err(|_| LinkClosed)
    }
}

type Rx = mpsc::UnboundedReceiver<AgentCommand>;

fn recorder() -> (Link, Rx) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Recorder(tx)), rx)
}

async fn attach<S: Store>(s: &Scheduler<S>, reg: Registration) -> Rx {
    let (link, mut rx) = recorder();
    s.attach_node(reg, link).await.expect("attach");
    match rx.recv().await {
        Some(AgentCommand::Registered(_)) => {}
        other => panic!("expected Registered first, got {other:?}"),
    }
    match rx.recv().await {
        Some(AgentCommand::WarmPins { .. }) => {}
        other => panic!("expected the warm pins after Registered, got {other:?}"),
    }
    rx
}

fn next_assign(rx: &mut Rx) -> AssignRun {
    match rx.try_recv().ok() {
        Some(AgentCommand::AssignRun(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn started(a: &AssignRun) -> RunStarted {
    RunStarted {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        started_at_unix_nanos: 1_000_000_000,
        image_digest: Some("sha256:abc".into()),
    }
}

fn exited(a: &AssignRun, code: i32, reason: ExitReason) -> RunExited {
    RunExited {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        exit_code: code,
        exited_at_unix_nanos: 3_500_000_000,
        reason,
        error_code: String::new(),
        error_message: String::new(),
        oom_killed: false,
    }
}

#[tokio::test]
async fn a_run_goes_to_its_region_and_ends_succeeded_with_its_logs() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let mut ams = attach(&s, register("ams-1", "ams", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(run.node_id.as_deref(), Some("ams-1"));
    assert!(fra.try_recv().is_err(), "nothing goes to fra");
    let a = next_assign(&mut ams);
    let spec = a.spec.clone();
    assert_eq!(spec.image, "127.0.0.1:5000/busybox:latest");
    assert_eq!(
        spec.cmd,
        Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
    );
    assert_eq!(spec.entrypoint, None, "the image's entrypoint stays");
    assert_eq!(spec.memory_mib, 1024);
    assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));

    s.run_started("ams-1", started(&a)).await.expect("started");
    let line = |seq, stream, msg: &str| LogLine {
        seq,
        stream,
        msg: msg.into(),
        ts_unix_nanos: 5,
    };
    let batch = LogBatch {
        run_id: a.run_id.clone(),
        lines: vec![
            line(1, LogStream::Stdout, "out"),
            line(2, LogStream::Stderr, "err"),
        ],
    };
    s.append_logs("ams-1", batch.clone()).await.expect("logs");
    s.append_logs("ams-1", batch)
        .await
        .expect("a re-send is harmless");
    s.run_exited("ams-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");

    let run = s.get_run(P, &runner.id, &a.run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.image_digest.as_deref(), Some("sha256:abc"));
    assert_eq!(run.duration_seconds(), Some(3));
    let (logs, more) = s
        .list_logs(P, &runner.id, &a.run_id, 0, 10)
        .await
        .expect("logs");
    assert!(!more);
    let got: Vec<(u64, &str)> = logs.iter().map(|l| (l.id, l.msg.as_str())).collect();
    assert_eq!(got, vec![(1, "out"), (2, "err")]);
    assert_eq!(logs[1].stream, LogStream::Stderr);
    let (page, more) = s
        .list_logs(P, &runner.id, &a.run_id, 1, 10)
        .await
        .expect("logs");
    assert_eq!((page.len(), more), (1, false));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_that_does_not_fit_waits_with_a_reason_and_starts_when_capacity_frees() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let second = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(second.status, RunStatus::Pending);
    assert_eq!(second.node_id, None);
    assert_eq!(
        second.pending_reason.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 full")
    );
    assert!(node.try_recv().is_err());

    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 3, ExitReason::Exited))
        .await
        .expect("exited");
    let first = s.get_run(P, &runner.id, &first.id).await.expect("get");
    assert_eq!(
        (first.status, first.exit_code),
        (RunStatus::Failed, Some(3))
    );
    let b = next_assign(&mut node);
    assert_eq!(
        b.run_id, second.id,
        "the waiting run takes the freed capacity"
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn timeouts_stops_and_start_failures_map_to_statuses() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    for (reason, code, want, err) in [
        (ExitReason::Timeout, 124, RunStatus::Failed, Some("timeout")),
        (ExitReason::Stopped, 143, RunStatus::Canceled, None),
        (
            ExitReason::StartFailed,
            -1,
            RunStatus::Failed,
            Some("image_pull_failed"),
        ),
    ] {
        let run = s
            .create_run(P, &runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        if reason != ExitReason::StartFailed {
            s.run_started("fra-1", started(&a)).await.expect("started");
        }
        let mut e = exited(&a, code, reason);
        if reason == ExitReason::StartFailed {
            e.error_code = "image_pull_failed".into();
        }
        s.run_exited("fra-1", e).await.expect("exited");
        let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
        assert_eq!(run.status, want, "{reason:?}");
        assert_eq!(run.error_code.as_deref(), err, "{reason:?}");
        if reason == ExitReason::Timeout {
            assert_eq!(run.exit_code, Some(124));
        }
    }
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn an_oom_kill_is_recorded_on_the_run() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let oom = RunExited {
        oom_killed: true,
        ..exited(&a, 137, ExitReason::Exited)
    };
    s.run_exited("fra-1", oom).await.expect("exited");
    let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (run.status, run.exit_code, run.oom_killed),
        (RunStatus::Failed, Some(137), true)
    );
    assert_eq!(run.error_code.as_deref(), Some("oom_killed"));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_refused_by_a_shutting_down_node_goes_elsewhere() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut small = attach(&s, register("fra-small", "fra", 2048, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut small);
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let refused = RunExited {
        error_code: NODE_DRAINING.into(),
        ..exited(&a, -1, ExitReason::StartFailed)
    };
    s.run_exited("fra-small", refused).await.expect("refused");
    let b = next_assign(&mut big);
    assert_eq!(
        (b.run_id.as_str(), b.lease_epoch),
        (run.id.as_str(), a.lease_epoch + 1)
    );
    let nodes = s.list_nodes().await;
    let small_node = nodes
        .iter()
        .find(|n| n.view.id == "fra-small")
        .expect("node");
    assert_eq!(
        small_node.view.status,
        NodeStatus::Draining,
        "no more runs go to it"
    );
    let got = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (got.status, got.node_id.as_deref()),
        (RunStatus::Pending, Some("fra-big"))
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn stopping_a_pending_run_cancels_it_and_fences_a_late_start() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let stopped = s.stop_run(P, &runner.id, &run.id).await.expect("stop");
    assert_eq!(stopped.status, RunStatus::Canceled);
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    s.run_started("fra-1", started(&a))
        .await
        .expect("late start");
    assert!(
        matches!(node.try_recv().ok(), Some(AgentCommand::StopRun { .. })),
        "a late start is fenced"
    );
    let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        run.status,
        RunStatus::Canceled,
        "a canceled run never runs again"
    );
    let again = s
        .stop_run(P, &runner.id, &run.id)
        .await
        .expect("stop twice");
    assert_eq!(again, run, "a finished run is returned unchanged");
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_restarted_node_that_lost_its_runs_requeues_or_fails_them() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let started_run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let waiting = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let b = next_assign(&mut node);
    assert_eq!(b.run_id, waiting.id);

    let mut reg = register("fra-1", "fra", 2048, &["unknown-run"]);
    reg.boot_id = "boot-2".into();
    let (link, mut rx) = recorder();
    s.attach_node(reg, link).await.expect("re-register");
    match rx.try_recv().ok() {
        Some(AgentCommand::Registered(r)) => {
            assert_eq!(r.stale_run_ids, vec!["unknown-run".to_string()])
        }
        other => panic!("expected Registered, got {other:?}"),
    }
    assert!(matches!(
        rx.try_recv().ok(),
        Some(AgentCommand::WarmPins { .. })
    ));
    let lost = s
        .get_run(P, &runner.id, &started_run.id)
        .await
        .expect("get");
    assert_eq!(
        (lost.status, lost.error_code.as_deref()),
        (RunStatus::Failed, Some("node_restarted"))
    );
    let again = next_assign(&mut rx);
    assert_eq!(
        again.run_id, waiting.id,
        "the unstarted run is placed again"
    );
    assert_eq!(again.lease_epoch, b.lease_epoch + 1, "under a new lease");
    // The old lease's reports are ignored.
    s.run_exited("fra-1", exited(&b, 0, ExitReason::Exited))
        .await
        .expect("stale exit");
    let w = s.get_run(P, &runner.id, &waiting.id).await.expect("get");
    assert_eq!(w.status, RunStatus::Pending);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn runs_survive_a_scheduler_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, run_id, assign) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(P, &runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        (runner.id, run.id, a)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Running);
    let _node = attach(&s, register("fra-1", "fra", 2048, &[&run_id])).await;
    s.run_exited("fra-1", exited(&assign, 0, ExitReason::Exited))
        .await
        .expect("exit after restart");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    s.assert_index_consistent().await;
}

fn config_fast_expiry() -> Config {
    Config {
        node_ttl: Duration::from_secs(2),
        lost_grace: Duration::from_secs(1),
        ..config()
    }
}

#[tokio::test]
async fn a_silent_node_is_lost_its_started_runs_fail_and_unstarted_runs_move() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let mut a = attach(&s, register("fra-a", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let running = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let assigned = next_assign(&mut a);
    s.run_started("fra-a", started(&assigned))
        .await
        .expect("started");
    let mut b = attach(&s, register("fra-b", "fra", 1024, &[])).await;
    let unstarted = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let first_b = next_assign(&mut b);
    assert_eq!(first_b.run_id, unstarted.id);

    // Not yet: within TTL + grace nothing happens.
    s.expire_nodes(Instant::now() + Duration::from_secs(2))
        .await
        .expect("expire");
    assert_eq!(
        s.get_run(P, &runner.id, &running.id)
            .await
            .expect("get")
            .status,
        RunStatus::Running
    );

    // Both nodes go silent past TTL + grace.
    s.expire_nodes(Instant::now() + Duration::from_secs(4))
        .await
        .expect("expire");
    let lost = s.get_run(P, &runner.id, &running.id).await.expect("get");
    assert_eq!(
        (lost.status, lost.error_code.as_deref()),
        (RunStatus::Failed, Some("node_lost"))
    );
    let nodes = s.list_nodes().await;
    assert!(
        nodes.iter().all(|n| n.view.status == NodeStatus::Lost),
        "both silent in this test"
    );
    let moved = s.get_run(P, &runner.id, &unstarted.id).await.expect("get");
    assert_eq!(
        (moved.status, moved.node_id),
        (RunStatus::Pending, None),
        "re-queued"
    );

    // fra-a comes back with its old container still running: it is fenced.
    s.heartbeat(
        "fra-a",
        Heartbeat {
            free_memory_mib: 0,
            running_run_ids: vec![running.id.clone()],
            cached_images: vec![],
        },
    )
    .await;
    match a.try_recv().ok() {
        Some(AgentCommand::StopRun { run_id }) => assert_eq!(run_id, running.id),
        other => panic!("expected StopRun for the revoked lease, got {other:?}"),
    }
    let late_exit = exited(&assigned, 0, ExitReason::Exited);
    s.run_exited("fra-a", late_exit).await.expect("late exit");
    let still = s.get_run(P, &runner.id, &running.id).await.expect("get");
    assert_eq!(
        still.status,
        RunStatus::Failed,
        "a revoked run never turns succeeded"
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn any_message_from_a_node_keeps_it_alive() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let _node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let t0 = Instant::now();
    // A log batch or a report arriving counts as much as a heartbeat (the stream reader touches).
    s.touch("fra-1", t0 + Duration::from_secs(3));
    s.expire_nodes(t0 + Duration::from_secs(5))
        .await
        .expect("expire");
    assert_eq!(
        s.list_nodes().await[0].view.status,
        NodeStatus::Ready,
        "2 s since the last message"
    );
    s.expire_nodes(t0 + Duration::from_secs(7))
        .await
        .expect("expire");
    assert_eq!(
        s.list_nodes().await[0].view.status,
        NodeStatus::Lost,
        "4 s since the last message"
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_draining_node_takes_no_new_runs_until_resumed() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let info = s.set_draining("fra-1", true).await.expect("drain");
    assert_eq!(info.view.status, NodeStatus::Draining);
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        run.pending_reason.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 draining")
    );
    assert_eq!(run.queue_position, Some(1));
    assert!(node.try_recv().is_err());
    s.set_draining("fra-1", false).await.expect("resume");
    assert_eq!(next_assign(&mut node).run_id, run.id, "placed once resumed");
    assert!(matches!(
        s.set_draining("nope", true).await,
        Err(SchedulerError::NotFound { .. })
    ));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn queue_positions_count_waiting_runs_per_region() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (fra, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (ams, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let f1 = s
        .create_run(P, &fra.id, RunInput::default())
        .await
        .expect("run");
    let a1 = s
        .create_run(P, &ams.id, RunInput::default())
        .await
        .expect("run");
    let f2 = s
        .create_run(P, &fra.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(f1.queue_position, Some(1));
    assert_eq!(a1.queue_position, Some(1));
    assert_eq!(f2.queue_position, Some(2));
    s.stop_run(P, &fra.id, &f1.id).await.expect("stop");
    assert_eq!(
        s.get_run(P, &fra.id, &f2.id)
            .await
            .expect("get")
            .queue_position,
        Some(1)
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_that_waited_too_long_gets_capacity_reserved() {
    let s = Scheduler::open(
        MemoryStore::new(),
        Config {
            reserve_after: Duration::ZERO,
            ..config()
        },
    )
    .await
    .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
    let (small, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (big, _) = s
        .create_runner(P, spec("fra", "standard-m"))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &small.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, first.id);
    let waiting_big = s
        .create_run(P, &big.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        waiting_big.pending_reason.as_deref(),
        Some("no node in fra with 2048 MiB free: 1 full; node fra-1 is reserved for this run")
    );
    // Without the reservation this small run would fit in the free 1024 MiB and starve the big one.
    let small_again = s
        .create_run(P, &small.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(small_again.node_id, None);
    assert_eq!(
        small_again.pending_reason.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 reserved for an older run")
    );
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert_eq!(
        next_assign(&mut node).run_id,
        waiting_big.id,
        "the old big run goes first"
    );
    s.assert_index_consistent().await;
}

fn next_pins(rx: &mut Rx) -> Vec<String> {
    match rx.try_recv().ok() {
        Some(AgentCommand::WarmPins { images }) => images,
        other => panic!("expected WarmPins, got {other:?}"),
    }
}

/// A warm pin follows its runner's latest warmup: a warmup on another node moves it (both
/// nodes hear their new set), deleting the runner releases it, and a re-registering node gets
/// its set again; a scheduler restart rebuilds the pins from the stored runners.
#[tokio::test]
async fn warm_pins_move_with_the_warmup_and_go_with_the_runner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let image = "127.0.0.1:5000/busybox:latest".to_string();
    let runner_id = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut one = attach(&s, register("fra-1", "fra", 4096, &[])).await;
        let mut two = attach(&s, register("fra-2", "fra", 4096, &[])).await;
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        s.set_draining("fra-2", true).await.expect("drain");
        s.warmup_runner(P, &runner.id).await.expect("warmup");
        assert!(matches!(one.try_recv().ok(), Some(AgentCommand::Warmup(_))));
        assert_eq!(next_pins(&mut one), [image.as_str()]);
        assert!(two.try_recv().is_err(), "fra-2's pins did not change");
        s.set_draining("fra-2", false).await.expect("resume");
        runner.id
    };
    // A restarted scheduler knows the pin from the stored runner.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut one = attach_keeping_pins(&s, register("fra-1", "fra", 4096, &[])).await;
    assert_eq!(next_pins(&mut one), [image.as_str()]);
    let mut two = attach(&s, register("fra-2", "fra", 4096, &[])).await;

    s.set_draining("fra-1", true).await.expect("drain");
    s.warmup_runner(P, &runner_id)
        .await
        .expect("warmup elsewhere");
    assert!(next_pins(&mut one).is_empty(), "moved away from fra-1");
    assert!(matches!(two.try_recv().ok(), Some(AgentCommand::Warmup(_))));
    assert_eq!(next_pins(&mut two), [image.as_str()]);

    s.delete_runner(P, &runner_id).await.expect("delete");
    assert!(next_pins(&mut two).is_empty(), "released with the runner");
    assert!(one.try_recv().is_err());
}

/// Like `attach`, but leaves the pin set (sent right after Registered) in the channel.
async fn attach_keeping_pins<S: Store>(s: &Scheduler<S>, reg: Registration) -> Rx {
    let (link, mut rx) = recorder();
    s.attach_node(reg, link).await.expect("attach");
    match rx.recv().await {
        Some(AgentCommand::Registered(_)) => {}
        other => panic!("expected Registered first, got {other:?}"),
    }
    rx
}

#[tokio::test]
async fn warmup_pins_the_node_that_pulled_the_image() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut small = attach(&s, register("fra-small", "fra", 2048, &[])).await;
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    // Spread would not matter: best fit would pick fra-small; make the warmup land on fra-big.
    s.set_draining("fra-small", true).await.expect("drain");
    let (warming, _) = s.warmup_runner(P, &runner.id).await.expect("warmup");
    let w = warming.warmup.clone().expect("warmup state");
    assert_eq!(
        (w.node_id.as_str(), w.status),
        ("fra-big", WarmupStatus::Pending)
    );
    match big.try_recv().ok() {
        Some(AgentCommand::Warmup(msg)) => assert_eq!(msg.image, "127.0.0.1:5000/busybox:latest"),
        other => panic!("expected Warmup, got {other:?}"),
    }
    assert_eq!(
        next_pins(&mut big),
        ["127.0.0.1:5000/busybox:latest"],
        "the warmed image is pinned on its node"
    );
    s.set_draining("fra-small", false).await.expect("resume");
    let result = WarmupResult {
        runner_id: runner.id.clone(),
        image: w.image.clone(),
        outcome: Ok("sha256:x".into()),
    };
    s.warmup_result("fra-big", result.clone())
        .await
        .expect("result");
    let (warm, _) = s.get_runner(P, &runner.id).await.expect("runner");
    assert!(warm.warmed_at.is_some());
    assert_eq!(warm.warm_pin(), Some("fra-big"));
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        run.node_id.as_deref(),
        Some("fra-big"),
        "the pin beats best fit"
    );
    assert!(small.try_recv().is_err());
    let _ = next_assign(&mut big);

    let failed = WarmupResult {
        outcome: Err("404 not found".into()),
        ..result
    };
    s.warmup_result("fra-big", failed).await.expect("result");
    let (cold, _) = s.get_runner(P, &runner.id).await.expect("runner");
    let w = cold.warmup.clone().expect("warmup");
    assert_eq!(w.status, WarmupStatus::Failed);
    assert_eq!(w.error.as_deref(), Some("image_pull_failed: 404 not found"));
    assert_eq!(cold.warm_pin(), None);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn nodes_with_leases_are_lost_if_they_never_come_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, run_id) = {
        let s = Scheduler::open(
            EmbeddedStore::open(&path).expect("store"),
            config_fast_expiry(),
        )
        .await
        .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
        s.set_draining("fra-1", true).await.expect("drain");
        s.set_draining("fra-1", false).await.expect("resume");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(P, &runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        (runner.id, run.id)
    };
    let s = Scheduler::open(
        EmbeddedStore::open(&path).expect("store"),
        config_fast_expiry(),
    )
    .await
    .expect("reopen");
    let nodes = s.list_nodes().await;
    assert_eq!(nodes.len(), 1, "the node is known from the store");
    assert_eq!(nodes[0].view.status, NodeStatus::Disconnected);
    s.expire_nodes(Instant::now() + Duration::from_secs(10))
        .await
        .expect("expire");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(
        (run.status, run.error_code.as_deref()),
        (RunStatus::Failed, Some("node_lost"))
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn private_registries_seal_passwords_and_hand_credentials_only_to_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let key = Arc::new(SecretKey::generate());
    let cfg = || Config {
        secrets: Some(key.clone()),
        ..config()
    };
    let spec_private = |registry_id: &str| RunnerSpec {
        image_name: "team/app".into(),
        container_registry_id: Some(registry_id.to_owned()),
        ..spec("fra", "standard-s")
    };
    let (reg_id, runner_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), cfg())
            .await
            .expect("open");
        let reg = s
            .create_registry(
                P,
                RegistrySpec {
                    name: "private".into(),
                    host: "127.0.0.1:5002".into(),
                    username: "berth".into(),
                    password: "s3cret-pass".into(),
                },
            )
            .await
            .expect("registry");
        assert!(!reg.password_sealed.contains("s3cret-pass"));
        let missing = s.create_runner(P, spec_private("nope")).await;
        assert!(
            matches!(missing, Err(SchedulerError::Invalid(_))),
            "unknown registry id is a field error"
        );
        let (runner, _) = s
            .create_runner(P, spec_private(&reg.id))
            .await
            .expect("runner");
        let in_use = s.delete_registry(P, &reg.id).await;
        assert!(matches!(in_use, Err(SchedulerError::InUse(_))));
        (reg.id, runner.id)
    };
    // The password is nowhere in the store file in clear.
    let raw = std::fs::read(&path).expect("read store");
    assert!(
        !raw.windows(11).any(|w| w == b"s3cret-pass"),
        "password stored in clear"
    );
    // After a restart the credentials are unsealed again and reach the node with the run.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), cfg())
        .await
        .expect("reopen");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let run = s
        .create_run(P, &runner_id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        run.image, "127.0.0.1:5002/team/app:latest",
        "the registry's host names the image"
    );
    let a = next_assign(&mut node);
    let auth = a.spec.registry_auth.expect("credentials in the spec");
    assert_eq!(
        (
            auth.host.as_str(),
            auth.username.as_str(),
            auth.password.as_str()
        ),
        ("127.0.0.1:5002", "berth", "s3cret-pass")
    );
    // Without a key, a store holding sealed secrets refuses to open.
    drop(s);
    assert!(
        Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .is_err()
    );
    let _ = reg_id;
}

#[tokio::test]
async fn usage_bills_started_runs_by_the_second_grouped() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (small, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (medium, _) = s
        .create_runner(P, spec("fra", "standard-m"))
        .await
        .expect("runner");
    // standard-s: 4,000 nano-USD/s for 2.5 s → 3 s; standard-m: 8,000 for 2.5 s → 3 s.
    for runner in [&small, &medium] {
        s.create_run(P, &runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
            .await
            .expect("exited");
    }
    // A run canceled while pending is never billed.
    s.set_draining("fra-1", true).await.expect("drain");
    let never = s
        .create_run(P, &small.id, RunInput::default())
        .await
        .expect("run");
    s.stop_run(P, &small.id, &never.id).await.expect("stop");

    let rows = s
        .usage(P, 0, i64::MAX, UsageGroup::InstanceType)
        .await
        .expect("usage");
    let got: Vec<(String, u64, u64, u64)> = rows
        .into_iter()
        .map(|r| (r.key, r.runs, r.billed_seconds, r.cost_nano_usd))
        .collect();
    assert_eq!(
        got,
        vec![
            ("standard-m".to_string(), 1, 3, 24_000),
            ("standard-s".to_string(), 1, 3, 12_000)
        ]
    );
    let days = s
        .usage(P, 0, i64::MAX, UsageGroup::Day)
        .await
        .expect("usage");
    assert_eq!(days.len(), 1);
    assert_eq!(
        days[0].key, "1970-01-01",
        "the test's runs ended 3.5 s after the epoch"
    );
    assert!(
        s.usage(P, 0, 3_000, UsageGroup::Runner)
            .await
            .expect("usage")
            .is_empty(),
        "ended at 3,500 ms: outside [0, 3000)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_one_idempotency_key_create_one_run() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, id) = (s.clone(), runner.id.clone());
        tasks.push(tokio::spawn(async move {
            s.create_run_with_key(P, &id, RunInput::default(), Some("retry-me"))
                .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut replays = 0;
    for t in tasks {
        let (run, replayed) = t.await.expect("join").expect("create");
        ids.insert(run.id);
        replays += usize::from(replayed);
    }
    assert_eq!((ids.len(), replays), (1, 7), "one run, seven replays");
    let (other, replayed) = s
        .create_run_with_key(P, &runner.id, RunInput::default(), Some("another"))
        .await
        .expect("create");
    assert!(!replayed && !ids.contains(&other.id));
    let (runner2, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (scoped, replayed) = s
        .create_run_with_key(P, &runner2.id, RunInput::default(), Some("retry-me"))
        .await
        .expect("create");
    assert!(
        !replayed && !ids.contains(&scoped.id),
        "keys are per runner"
    );
    assert_eq!(
        s.list_runs(P, &runner.id, None, usize::MAX)
            .await
            .expect("list")
            .0
            .len(),
        2
    );
}

#[test]
fn utc_days() {
    assert_eq!(usage::utc_day(0), "1970-01-01");
    assert_eq!(usage::utc_day(1_795_000_000_000), "2026-11-18");
    assert_eq!(usage::utc_day(951_782_400_000), "2000-02-29");
    assert_eq!(usage::utc_day(-1), "1969-12-31");
    assert_eq!(
        usage::utc_day(i64::MAX),
        "9999-12-31",
        "beyond the calendar clamps"
    );
}

#[test]
fn image_references() {
    assert_eq!(
        image_reference("docker.io", "busybox", "latest"),
        "docker.io/library/busybox:latest"
    );
    assert_eq!(
        image_reference("127.0.0.1:5000", "busybox", "1.36"),
        "127.0.0.1:5000/busybox:1.36"
    );
    assert_eq!(
        image_reference("docker.io", "ghcr.io/a/b", "v1"),
        "ghcr.io/a/b:v1"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_eq!(
        image_reference("r:1", "x/y", &digest),
        format!("r:1/x/y@{digest}")
    );
}

fn not_found<T: std::fmt::Debug>(r: Result<T, SchedulerError>) -> bool {
    matches!(r, Err(SchedulerError::NotFound { .. }))
}

#[tokio::test]
async fn another_projects_records_are_not_found_and_never_listed() {
    let key = Arc::new(SecretKey::generate());
    let s = Scheduler::open(
        MemoryStore::new(),
        Config {
            secrets: Some(key),
            ..config()
        },
    )
    .await
    .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let reg = s
        .create_registry(
            "alpha",
            RegistrySpec {
                name: "private".into(),
                host: "127.0.0.1:5002".into(),
                username: "berth".into(),
                password: "s3cret-pass".into(),
            },
        )
        .await
        .expect("registry");
    let (runner, _) = s
        .create_runner("alpha", spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (run, _) = s
        .create_run_with_key("alpha", &runner.id, RunInput::default(), Some("k1"))
        .await
        .expect("run");
    assert_eq!(
        (runner.project.as_str(), run.project.as_str()),
        ("alpha", "alpha")
    );
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.append_logs(
        "fra-1",
        LogBatch {
            run_id: a.run_id.clone(),
            lines: vec![LogLine {
                seq: 1,
                stream: LogStream::Stdout,
                msg: "alpha's line".into(),
                ts_unix_nanos: 1,
            }],
        },
    )
    .await
    .expect("logs");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");

    // beta sees none of it, by id or in lists.
    let b = "beta";
    assert!(not_found(s.get_runner(b, &runner.id).await));
    assert!(not_found(
        s.update_runner(b, &runner.id, spec("fra", "standard-s"), 0)
            .await
    ));
    assert!(not_found(s.delete_runner(b, &runner.id).await));
    assert!(not_found(s.get_run(b, &runner.id, &run.id).await));
    assert!(not_found(
        s.list_runs(b, &runner.id, None, usize::MAX).await
    ));
    assert!(not_found(s.stop_run(b, &runner.id, &run.id).await));
    assert!(not_found(s.list_logs(b, &runner.id, &run.id, 0, 10).await));
    assert!(not_found(s.warmup_runner(b, &runner.id).await));
    assert!(not_found(
        s.create_run(b, &runner.id, RunInput::default()).await
    ));
    assert!(not_found(
        s.create_run_with_key(b, &runner.id, RunInput::default(), Some("k1"))
            .await
    ));
    assert!(not_found(
        s.create_runs(b, &runner.id, vec![RunInput::default()])
            .await
    ));
    assert!(not_found(s.get_registry(b, &reg.id).await));
    assert!(not_found(s.delete_registry(b, &reg.id).await));
    assert!(s.list_runners(b).await.expect("list").is_empty());
    assert!(s.list_registries(b).await.expect("list").is_empty());
    assert!(s
        .usage(b, 0, i64::MAX, UsageGroup::Runner)
        .await
        .expect("usage")
        .is_empty());
    // beta's runner may not name alpha's registry: to beta it does not exist.
    let borrowed = RunnerSpec {
        container_registry_id: Some(reg.id.clone()),
        ..spec("fra", "standard-s")
    };
    assert!(matches!(
        s.create_runner(b, borrowed.clone()).await,
        Err(SchedulerError::Invalid(_))
    ));
    // The same idempotency key in beta's own runner creates beta's own run.
    let (beta_runner, _) = s
        .create_runner(b, spec("fra", "standard-s"))
        .await
        .expect("beta runner");
    let (beta_run, replayed) = s
        .create_run_with_key(b, &beta_runner.id, RunInput::default(), Some("k1"))
        .await
        .expect("beta run");
    assert!(!replayed && beta_run.id != run.id && beta_run.project == b);

    // alpha sees its own.
    assert_eq!(s.list_runners("alpha").await.expect("list").len(), 1);
    assert_eq!(s.list_registries("alpha").await.expect("list").len(), 1);
    let (logs, _) = s
        .list_logs("alpha", &runner.id, &run.id, 0, 10)
        .await
        .expect("alpha's logs");
    assert_eq!(logs.len(), 1);
    let usage = s
        .usage("alpha", 0, i64::MAX, UsageGroup::Runner)
        .await
        .expect("usage");
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].key, runner.id);
    assert!(
        s.create_runner("alpha", borrowed).await.is_ok(),
        "a runner may name its own project's registry"
    );
}

#[tokio::test]
async fn records_written_before_projects_belong_to_default() {
    let store = MemoryStore::new();
    let legacy = serde_json::json!({
        "id": "0190aaaa-0000-7000-8000-000000000001",
        "spec": spec("fra", "standard-s"),
        "warmed_at": null, "created_at": 1, "updated_at": 1
    });
    store
        .commit(Txn::new().put(
            keys::runner("0190aaaa-0000-7000-8000-000000000001"),
            serde_json::to_vec(&legacy).expect("json"),
            Expect::Absent,
        ))
        .await
        .expect("seed");
    let s = Scheduler::open(store, config()).await.expect("open");
    let (r, _) = s
        .get_runner("default", "0190aaaa-0000-7000-8000-000000000001")
        .await
        .expect("a legacy runner is in default");
    assert_eq!(r.project, "default");
    assert!(not_found(
        s.get_runner("alpha", "0190aaaa-0000-7000-8000-000000000001")
            .await
    ));
}

#[tokio::test]
async fn api_keys_are_stored_hashed_verified_and_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("open");
    let bad = s.create_api_key("Not_A_Project", "x").await;
    assert!(matches!(bad, Err(SchedulerError::Invalid(ref v)) if v.0[0].field == "project"));
    let (key, plaintext) = s.create_api_key("alpha", "ci").await.expect("create");
    let (other, _) = s.create_api_key("beta", "").await.expect("create");
    let presented = berth_core::auth::parse_key(&plaintext).expect("well-formed");
    assert_eq!(presented.key_id, key.key_id);

    let who = s.authenticate_api_key(&plaintext).await.expect("valid key");
    assert_eq!(
        (who.project.as_str(), who.key_id.as_str()),
        ("alpha", key.key_id.as_str())
    );
    // A wrong secret with a real key id, an unknown id, garbage: all the same refusal.
    let wrong_secret = format!("berth_{}_{}", key.key_id, "0".repeat(64));
    let unknown_id = format!("berth_{}_{}", "f".repeat(16), presented.secret);
    for bad in [wrong_secret.as_str(), unknown_id.as_str(), "garbage", ""] {
        assert!(
            matches!(
                s.authenticate_api_key(bad).await,
                Err(SchedulerError::Unauthenticated)
            ),
            "{bad}"
        );
    }
    assert_eq!(s.list_api_keys(None).await.expect("list").len(), 2);
    let alpha_keys = s.list_api_keys(Some("alpha")).await.expect("list");
    assert_eq!(alpha_keys.len(), 1);
    assert_eq!(alpha_keys[0].key_id, key.key_id);

    let revoked = s.revoke_api_key(&key.key_id).await.expect("revoke");
    assert!(revoked.revoked_at.is_some());
    assert!(matches!(
        s.authenticate_api_key(&plaintext).await,
        Err(SchedulerError::Unauthenticated)
    ));
    let again = s.revoke_api_key(&key.key_id).await.expect("revoke twice");
    assert_eq!(
        again.revoked_at, revoked.revoked_at,
        "revoking is idempotent"
    );
    assert!(not_found(s.revoke_api_key("nope").await));
    assert!(s.authenticate_api_key(&plaintext).await.is_err());
    assert!(s.list_api_keys(Some("beta")).await.expect("list")[0].key_id == other.key_id);

    // Only the hash is stored: the secret is nowhere in the store file.
    drop(s);
    let raw = std::fs::read(&path).expect("read store");
    assert!(
        !raw.windows(presented.secret.len())
            .any(|w| w == presented.secret.as_bytes()),
        "the secret is stored in clear"
    );
    assert!(raw
        .windows(key.secret_sha256.len())
        .any(|w| w == key.secret_sha256.as_bytes()));
}

/// Pull progress shows on the pending run (with its reason) only for the current lease; the
/// last report's figures are stored with the run when it starts.
#[tokio::test]
async fn pull_progress_shows_while_pending_and_is_kept_at_the_start() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let report = |done: u64, epoch: u64, complete: bool| PullProgress {
        pull_for: PullFor::Run {
            run_id: a.run_id.clone(),
            lease_epoch: epoch,
        },
        image: "127.0.0.1:5000/busybox:latest".into(),
        progress: ImagePull {
            bytes_done: done,
            bytes_total: 1000,
            layers_done: u32::from(complete),
            layers_total: 1,
        },
        complete,
    };
    s.pull_progress("fra-1", report(400, a.lease_epoch + 1, false));
    s.pull_progress("fra-2", report(400, a.lease_epoch, false));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.image_pull, None, "other leases' reports are ignored");
    s.pull_progress("fra-1", report(400, a.lease_epoch, false));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.image_pull.map(|p| p.bytes_done), Some(400));
    assert_eq!(shown.pending_reason.as_deref(), Some("pulling the image"));
    s.pull_progress("fra-1", report(1000, a.lease_epoch, true));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.pending_reason, None, "fetched: no longer pulling");
    s.run_started("fra-1", started(&a)).await.expect("started");
    let running = s.get_run(P, &runner.id, &run.id).await.expect("get");
    let pull = running.image_pull.expect("stored at the start");
    assert_eq!(
        (pull.bytes_done, pull.bytes_total, pull.layers_done),
        (1000, 1000, 1)
    );
}

#[tokio::test]
async fn files_and_the_stop_grace_reach_the_node_and_only_their_digest_reaches_the_api() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (plain, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (graceful, _) = s
        .create_runner(
            P,
            RunnerSpec {
                stop_grace_seconds: Some(30),
                ..spec("fra", "standard-s")
            },
        )
        .await
        .expect("runner");
    let file = |path: &str| berth_core::validate::FileInput {
        path: Some(path.into()),
        content_base64: Some("aGVsbG8=".into()),
        mode: None,
    };
    // The scheduler's flag, the runner's grace, the run's own.
    let cases = [
        (&plain, None, 2),
        (&graceful, None, 30),
        (&graceful, Some(5), 5),
    ];
    for (runner, run_grace, want) in cases {
        let run = s
            .create_run(
                P,
                &runner.id,
                RunInput {
                    files: Some(vec![file("/etc/app.conf")]),
                    stop_grace_seconds: run_grace,
                    ..Default::default()
                },
            )
            .await
            .expect("run");
        assert_eq!(run.stop_grace_seconds, Some(want));
        let a = next_assign(&mut fra);
        let sent = a.spec;
        assert_eq!(sent.stop_grace_seconds, want);
        let sent_files: Vec<(&str, &[u8], u32)> = sent
            .files
            .iter()
            .map(|f| (f.path.as_str(), &*f.content, f.mode))
            .collect();
        assert_eq!(sent_files, [("/etc/app.conf", &b"hello"[..], 0o444)]);
        // The API shows the file by its digest (its gRPC form has no field for content).
        let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
        assert_eq!(shown.files.len(), 1);
        assert_eq!(shown.files[0].size_bytes, 5);
        assert_eq!(shown.files[0].sha256, sent.files[0].sha256);
        assert_eq!(shown.stop_grace_seconds, Some(want));
    }
    // Once a run has ended its files' contents leave the store; the digests stay.
    let run = s
        .create_run(
            P,
            &plain.id,
            RunInput {
                files: Some(vec![file("/etc/ends.conf")]),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    let a = next_assign(&mut fra);
    let stored = |id: String| {
        let s = &s;
        async move { s.store.get(&keys::run_files(&id)).await.expect("get") }
    };
    assert!(stored(run.id.clone()).await.is_some(), "kept while active");
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert!(stored(run.id.clone()).await.is_none(), "gone once ended");
    let ended = s.get_run(P, &plain.id, &run.id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Succeeded);
    assert_eq!(ended.files.len(), 1, "the record still names the file");
    // The scheduler re-checks what arrives over gRPC.
    let bad = s
        .create_run(
            P,
            &plain.id,
            RunInput {
                files: Some(vec![file("/proc/x")]),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(bad, Err(SchedulerError::Invalid(_))), "{bad:?}");
}

#[tokio::test]
async fn a_restarted_scheduler_still_sends_the_files_of_a_waiting_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let file = berth_core::validate::FileInput {
        path: Some("/etc/app.conf".into()),
        content_base64: Some("aGVsbG8=".into()),
        mode: Some(0o600),
    };
    let (runner_id, run_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(
                P,
                &runner.id,
                RunInput {
                    files: Some(vec![file]),
                    ..Default::default()
                },
            )
            .await
            .expect("run");
        // The record itself holds no content; it is stored once beside it.
        let raw = s.store.get(&keys::run(&run.id)).await.expect("get");
        let raw = String::from_utf8(raw.map(|kv| kv.value).unwrap_or_default()).unwrap_or_default();
        assert!(
            raw.contains("/etc/app.conf") && !raw.contains("aGVsbG8"),
            "{raw}"
        );
        (runner.id, run.id)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let a = next_assign(&mut fra);
    assert_eq!(a.run_id, run_id);
    let sent = a.spec;
    assert_eq!(sent.files.len(), 1);
    assert_eq!(&*sent.files[0].content, b"hello");
    assert_eq!(sent.files[0].mode, 0o600);
    let shown = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(shown.files[0].size_bytes, 5);
}
