//! Engine tests against the in-memory store and fake agent channels.

use super::*;
use berth_core::store::{EmbeddedStore, MemoryStore};
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
        }],
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
