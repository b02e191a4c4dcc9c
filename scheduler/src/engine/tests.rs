//! Engine tests against the in-memory store and fake agent channels.

use super::*;
use berth_core::model::WarmupStatus;
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, MemoryStore};
use berth_core::validate::RegistrySpec;
use berth_proto::v1::scheduler_message::Body;

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

fn register(node: &str, region: &str, mem: u64, active: &[&str]) -> pb::Register {
    pb::Register {
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

type Rx = mpsc::UnboundedReceiver<pb::SchedulerMessage>;

async fn attach<S: Store>(s: &Scheduler<S>, reg: pb::Register) -> Rx {
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.attach_node(reg, tx).await.expect("attach");
    match rx.recv().await.and_then(|m| m.body) {
        Some(Body::Registered(_)) => {}
        other => panic!("expected Registered first, got {other:?}"),
    }
    rx
}

fn next_assign(rx: &mut Rx) -> pb::AssignRun {
    match rx.try_recv().ok().and_then(|m| m.body) {
        Some(Body::AssignRun(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn started(a: &pb::AssignRun) -> pb::RunStarted {
    pb::RunStarted {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        started_at_unix_nanos: 1_000_000_000,
        image_digest: "sha256:abc".into(),
    }
}

fn exited(a: &pb::AssignRun, code: i32, reason: pb::ExitReason) -> pb::RunExited {
    pb::RunExited {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        exit_code: code,
        exited_at_unix_nanos: 3_500_000_000,
        reason: reason as i32,
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
        .create_runner(spec("ams", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(run.node_id.as_deref(), Some("ams-1"));
    assert!(fra.try_recv().is_err(), "nothing goes to fra");
    let a = next_assign(&mut ams);
    let spec = a.spec.clone().expect("spec");
    assert_eq!(spec.image, "127.0.0.1:5000/busybox:latest");
    assert_eq!(spec.cmd, vec!["sh", "-c", "echo hi"]);
    assert_eq!(spec.memory_mib, 1024);
    assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));

    s.run_started("ams-1", started(&a)).await.expect("started");
    let line = |seq, stream: pb::LogStream, msg: &str| pb::LogLine {
        seq,
        stream: stream as i32,
        msg: msg.into(),
        ts_unix_nanos: 5,
    };
    let batch = pb::LogBatch {
        run_id: a.run_id.clone(),
        lines: vec![
            line(1, pb::LogStream::Stdout, "out"),
            line(2, pb::LogStream::Stderr, "err"),
        ],
    };
    s.append_logs("ams-1", batch.clone()).await.expect("logs");
    s.append_logs("ams-1", batch)
        .await
        .expect("a re-send is harmless");
    s.run_exited("ams-1", exited(&a, 0, pb::ExitReason::Exited))
        .await
        .expect("exited");

    let run = s.get_run(&runner.id, &a.run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.image_digest.as_deref(), Some("sha256:abc"));
    assert_eq!(run.duration_seconds(), Some(3));
    let (logs, more) = s.list_logs(&a.run_id, 0, 10).await.expect("logs");
    assert!(!more);
    let got: Vec<(u64, &str)> = logs.iter().map(|l| (l.id, l.msg.as_str())).collect();
    assert_eq!(got, vec![(1, "out"), (2, "err")]);
    assert_eq!(logs[1].stream, LogStream::Stderr);
    let (page, more) = s.list_logs(&a.run_id, 1, 10).await.expect("logs");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let first = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let second = s
        .create_run(&runner.id, RunInput::default())
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
    s.run_exited("fra-1", exited(&a, 3, pb::ExitReason::Exited))
        .await
        .expect("exited");
    let first = s.get_run(&runner.id, &first.id).await.expect("get");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    for (reason, code, want, err) in [
        (
            pb::ExitReason::Timeout,
            124,
            RunStatus::Failed,
            Some("timeout"),
        ),
        (pb::ExitReason::Stopped, 143, RunStatus::Canceled, None),
        (
            pb::ExitReason::StartFailed,
            -1,
            RunStatus::Failed,
            Some("image_pull_failed"),
        ),
    ] {
        let run = s
            .create_run(&runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        if reason != pb::ExitReason::StartFailed {
            s.run_started("fra-1", started(&a)).await.expect("started");
        }
        let mut e = exited(&a, code, reason);
        if reason == pb::ExitReason::StartFailed {
            e.error_code = "image_pull_failed".into();
        }
        s.run_exited("fra-1", e).await.expect("exited");
        let run = s.get_run(&runner.id, &run.id).await.expect("get");
        assert_eq!(run.status, want, "{reason:?}");
        assert_eq!(run.error_code.as_deref(), err, "{reason:?}");
        if reason == pb::ExitReason::Timeout {
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let oom = pb::RunExited {
        oom_killed: true,
        ..exited(&a, 137, pb::ExitReason::Exited)
    };
    s.run_exited("fra-1", oom).await.expect("exited");
    let run = s.get_run(&runner.id, &run.id).await.expect("get");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut small);
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let refused = pb::RunExited {
        error_code: NODE_DRAINING.into(),
        ..exited(&a, -1, pb::ExitReason::StartFailed)
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
    let got = s.get_run(&runner.id, &run.id).await.expect("get");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let stopped = s.stop_run(&runner.id, &run.id).await.expect("stop");
    assert_eq!(stopped.status, RunStatus::Canceled);
    assert!(matches!(
        node.try_recv().ok().and_then(|m| m.body),
        Some(Body::StopRun(_))
    ));
    s.run_started("fra-1", started(&a))
        .await
        .expect("late start");
    assert!(
        matches!(
            node.try_recv().ok().and_then(|m| m.body),
            Some(Body::StopRun(_))
        ),
        "a late start is fenced"
    );
    let run = s.get_run(&runner.id, &run.id).await.expect("get");
    assert_eq!(
        run.status,
        RunStatus::Canceled,
        "a canceled run never runs again"
    );
    let again = s.stop_run(&runner.id, &run.id).await.expect("stop twice");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let started_run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let waiting = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let b = next_assign(&mut node);
    assert_eq!(b.run_id, waiting.id);

    let mut reg = register("fra-1", "fra", 2048, &["unknown-run"]);
    reg.boot_id = "boot-2".into();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.attach_node(reg, tx).await.expect("re-register");
    match rx.try_recv().ok().and_then(|m| m.body) {
        Some(Body::Registered(r)) => assert_eq!(r.stale_run_ids, vec!["unknown-run".to_string()]),
        other => panic!("expected Registered, got {other:?}"),
    }
    let lost = s.get_run(&runner.id, &started_run.id).await.expect("get");
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
    s.run_exited("fra-1", exited(&b, 0, pb::ExitReason::Exited))
        .await
        .expect("stale exit");
    let w = s.get_run(&runner.id, &waiting.id).await.expect("get");
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
            .create_runner(spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(&runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        (runner.id, run.id, a)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let run = s.get_run(&runner_id, &run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Running);
    let _node = attach(&s, register("fra-1", "fra", 2048, &[&run_id])).await;
    s.run_exited("fra-1", exited(&assign, 0, pb::ExitReason::Exited))
        .await
        .expect("exit after restart");
    let run = s.get_run(&runner_id, &run_id).await.expect("get");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let running = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let assigned = next_assign(&mut a);
    s.run_started("fra-a", started(&assigned))
        .await
        .expect("started");
    let mut b = attach(&s, register("fra-b", "fra", 1024, &[])).await;
    let unstarted = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    let first_b = next_assign(&mut b);
    assert_eq!(first_b.run_id, unstarted.id);

    // Not yet: within TTL + grace nothing happens.
    s.expire_nodes(Instant::now() + Duration::from_secs(2))
        .await
        .expect("expire");
    assert_eq!(
        s.get_run(&runner.id, &running.id)
            .await
            .expect("get")
            .status,
        RunStatus::Running
    );

    // Both nodes go silent past TTL + grace.
    s.expire_nodes(Instant::now() + Duration::from_secs(4))
        .await
        .expect("expire");
    let lost = s.get_run(&runner.id, &running.id).await.expect("get");
    assert_eq!(
        (lost.status, lost.error_code.as_deref()),
        (RunStatus::Failed, Some("node_lost"))
    );
    let nodes = s.list_nodes().await;
    assert!(
        nodes.iter().all(|n| n.view.status == NodeStatus::Lost),
        "both silent in this test"
    );
    let moved = s.get_run(&runner.id, &unstarted.id).await.expect("get");
    assert_eq!(
        (moved.status, moved.node_id),
        (RunStatus::Pending, None),
        "re-queued"
    );

    // fra-a comes back with its old container still running: it is fenced.
    s.heartbeat(
        "fra-a",
        pb::Heartbeat {
            free_memory_mib: 0,
            running_run_ids: vec![running.id.clone()],
            cached_images: vec![],
        },
    )
    .await;
    match a.try_recv().ok().and_then(|m| m.body) {
        Some(Body::StopRun(stop)) => assert_eq!(stop.run_id, running.id),
        other => panic!("expected StopRun for the revoked lease, got {other:?}"),
    }
    let late_exit = exited(&assigned, 0, pb::ExitReason::Exited);
    s.run_exited("fra-a", late_exit).await.expect("late exit");
    let still = s.get_run(&runner.id, &running.id).await.expect("get");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(&runner.id, RunInput::default())
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (ams, _) = s
        .create_runner(spec("ams", "standard-s"))
        .await
        .expect("runner");
    let f1 = s
        .create_run(&fra.id, RunInput::default())
        .await
        .expect("run");
    let a1 = s
        .create_run(&ams.id, RunInput::default())
        .await
        .expect("run");
    let f2 = s
        .create_run(&fra.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(f1.queue_position, Some(1));
    assert_eq!(a1.queue_position, Some(1));
    assert_eq!(f2.queue_position, Some(2));
    s.stop_run(&fra.id, &f1.id).await.expect("stop");
    assert_eq!(
        s.get_run(&fra.id, &f2.id)
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (big, _) = s
        .create_runner(spec("fra", "standard-m"))
        .await
        .expect("runner");
    let first = s
        .create_run(&small.id, RunInput::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, first.id);
    let waiting_big = s
        .create_run(&big.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        waiting_big.pending_reason.as_deref(),
        Some("no node in fra with 2048 MiB free: 1 full; node fra-1 is reserved for this run")
    );
    // Without the reservation this small run would fit in the free 1024 MiB and starve the big one.
    let small_again = s
        .create_run(&small.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(small_again.node_id, None);
    assert_eq!(
        small_again.pending_reason.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 reserved for an older run")
    );
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 0, pb::ExitReason::Exited))
        .await
        .expect("exited");
    assert_eq!(
        next_assign(&mut node).run_id,
        waiting_big.id,
        "the old big run goes first"
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn warmup_pins_the_node_that_pulled_the_image() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut small = attach(&s, register("fra-small", "fra", 2048, &[])).await;
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    // Spread would not matter: best fit would pick fra-small; make the warmup land on fra-big.
    s.set_draining("fra-small", true).await.expect("drain");
    let (warming, _) = s.warmup_runner(&runner.id).await.expect("warmup");
    let w = warming.warmup.clone().expect("warmup state");
    assert_eq!(
        (w.node_id.as_str(), w.status),
        ("fra-big", WarmupStatus::Pending)
    );
    match big.try_recv().ok().and_then(|m| m.body) {
        Some(Body::Warmup(msg)) => assert_eq!(msg.image, "127.0.0.1:5000/busybox:latest"),
        other => panic!("expected Warmup, got {other:?}"),
    }
    s.set_draining("fra-small", false).await.expect("resume");
    let result = pb::WarmupResult {
        runner_id: runner.id.clone(),
        image: w.image.clone(),
        ok: true,
        image_digest: "sha256:x".into(),
        error_message: String::new(),
    };
    s.warmup_result("fra-big", result.clone())
        .await
        .expect("result");
    let (warm, _) = s.get_runner(&runner.id).await.expect("runner");
    assert!(warm.warmed_at.is_some());
    assert_eq!(warm.warm_pin(), Some("fra-big"));
    let run = s
        .create_run(&runner.id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        run.node_id.as_deref(),
        Some("fra-big"),
        "the pin beats best fit"
    );
    assert!(small.try_recv().is_err());
    let _ = next_assign(&mut big);

    let failed = pb::WarmupResult {
        ok: false,
        error_message: "404 not found".into(),
        ..result
    };
    s.warmup_result("fra-big", failed).await.expect("result");
    let (cold, _) = s.get_runner(&runner.id).await.expect("runner");
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
            .create_runner(spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(&runner.id, RunInput::default())
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
    let run = s.get_run(&runner_id, &run_id).await.expect("get");
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
            .create_registry(RegistrySpec {
                name: "private".into(),
                host: "127.0.0.1:5002".into(),
                username: "berth".into(),
                password: "s3cret-pass".into(),
            })
            .await
            .expect("registry");
        assert!(!reg.password_sealed.contains("s3cret-pass"));
        let missing = s.create_runner(spec_private("nope")).await;
        assert!(
            matches!(missing, Err(SchedulerError::Invalid(_))),
            "unknown registry id is a field error"
        );
        let (runner, _) = s
            .create_runner(spec_private(&reg.id))
            .await
            .expect("runner");
        let in_use = s.delete_registry(&reg.id).await;
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
        .create_run(&runner_id, RunInput::default())
        .await
        .expect("run");
    assert_eq!(
        run.image, "127.0.0.1:5002/team/app:latest",
        "the registry's host names the image"
    );
    let a = next_assign(&mut node);
    let auth = a
        .spec
        .and_then(|sp| sp.registry_auth)
        .expect("credentials in the spec");
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (medium, _) = s
        .create_runner(spec("fra", "standard-m"))
        .await
        .expect("runner");
    // standard-s: 4,000 nano-USD/s for 2.5 s → 3 s; standard-m: 8,000 for 2.5 s → 3 s.
    for runner in [&small, &medium] {
        s.create_run(&runner.id, RunInput::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        s.run_exited("fra-1", exited(&a, 0, pb::ExitReason::Exited))
            .await
            .expect("exited");
    }
    // A run canceled while pending is never billed.
    s.set_draining("fra-1", true).await.expect("drain");
    let never = s
        .create_run(&small.id, RunInput::default())
        .await
        .expect("run");
    s.stop_run(&small.id, &never.id).await.expect("stop");

    let rows = s
        .usage(0, i64::MAX, UsageGroup::InstanceType)
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
    let days = s.usage(0, i64::MAX, UsageGroup::Day).await.expect("usage");
    assert_eq!(days.len(), 1);
    assert_eq!(
        days[0].key, "1970-01-01",
        "the test's runs ended 3.5 s after the epoch"
    );
    assert!(
        s.usage(0, 3_000, UsageGroup::Runner)
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
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, id) = (s.clone(), runner.id.clone());
        tasks.push(tokio::spawn(async move {
            s.create_run_with_key(&id, RunInput::default(), Some("retry-me"))
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
        .create_run_with_key(&runner.id, RunInput::default(), Some("another"))
        .await
        .expect("create");
    assert!(!replayed && !ids.contains(&other.id));
    let (runner2, _) = s
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (scoped, replayed) = s
        .create_run_with_key(&runner2.id, RunInput::default(), Some("retry-me"))
        .await
        .expect("create");
    assert!(
        !replayed && !ids.contains(&scoped.id),
        "keys are per runner"
    );
    assert_eq!(s.list_runs(&runner.id).await.expect("list").len(), 2);
}

#[test]
fn utc_days() {
    assert_eq!(super::utc_day(0), "1970-01-01");
    assert_eq!(super::utc_day(1_795_000_000_000), "2026-11-18");
    assert_eq!(super::utc_day(951_782_400_000), "2000-02-29");
    assert_eq!(super::utc_day(-1), "1969-12-31");
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

#[tokio::test]
async fn files_and_the_stop_grace_reach_the_node_and_only_their_digest_reaches_the_api() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (plain, _) = s
        .create_runner(spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (graceful, _) = s
        .create_runner(RunnerSpec {
            stop_grace_seconds: Some(30),
            ..spec("fra", "standard-s")
        })
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
        let sent = a.spec.expect("spec");
        assert_eq!(sent.stop_grace_seconds, want);
        assert_eq!(
            sent.files,
            vec![pb::RunFile {
                path: "/etc/app.conf".into(),
                content: b"hello".to_vec(),
                mode: 0o444,
            }]
        );
        let shown: pb::Run = (&s.get_run(&runner.id, &run.id).await.expect("get")).into();
        assert_eq!(shown.files.len(), 1);
        assert_eq!(shown.files[0].size_bytes, 5);
        assert_eq!(shown.stop_grace_seconds, Some(want));
    }
    // The scheduler re-checks what arrives over gRPC.
    let bad = s
        .create_run(
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
            .create_runner(spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(
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
    let sent = a.spec.expect("spec");
    assert_eq!(sent.files.len(), 1);
    assert_eq!(sent.files[0].content, b"hello".to_vec());
    assert_eq!(sent.files[0].mode, 0o600);
    let shown = s.get_run(&runner_id, &run_id).await.expect("get");
    assert_eq!(shown.files[0].size_bytes, 5);
}
