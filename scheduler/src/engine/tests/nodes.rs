//! Nodes: re-registration, liveness and loss, draining.

use super::*;

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
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
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
        (lost.status, lost.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_restarted"))
    );
    // The run it reported without a lease holds the node (its size unknown) until it is gone.
    assert!(rx.try_recv().is_err(), "nothing placed while it still runs");
    s.heartbeat("fra-1", Heartbeat::default()).await;
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
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let assigned = next_assign(&mut a);
    s.run_started("fra-a", started(&assigned))
        .await
        .expect("started");
    let mut b = attach(&s, register("fra-b", "fra", 1024, &[])).await;
    let unstarted = s
        .create_run(P, &runner.id, RunOverrides::default())
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
        (lost.status, lost.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    let nodes = s.list_nodes().await;
    assert!(
        nodes.iter().all(|n| n.view.status == NodeState::Lost),
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
        NodeState::Ready,
        "2 s since the last message"
    );
    s.expire_nodes(t0 + Duration::from_secs(7))
        .await
        .expect("expire");
    assert_eq!(
        s.list_nodes().await[0].view.status,
        NodeState::Lost,
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
    assert_eq!(info.view.status, NodeState::Draining);
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
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
            .create_run(P, &runner.id, RunOverrides::default())
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
    assert_eq!(nodes[0].view.status, NodeState::Disconnected);
    s.expire_nodes(Instant::now() + Duration::from_secs(10))
        .await
        .expect("expire");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(
        (run.status, run.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    s.assert_index_consistent().await;
}

/// A node with room for one 1024 MiB run loses its running run to expiry; a second run waits.
/// Returns the scheduler, the node's recorder, the runner, the lost run's assignment and the
/// waiting run's id.
async fn lost_node_with_a_waiting_run(
) -> (Arc<Scheduler<MemoryStore>>, Rx, String, AssignRun, String) {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.expire_nodes(Instant::now() + Duration::from_secs(4))
        .await
        .expect("expire");
    let lost = s.get_run(P, &runner.id, &a.run_id).await.expect("get");
    assert_eq!(
        (lost.status, lost.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(node.try_recv().is_err(), "nothing placed on a lost node");
    s.assert_index_consistent().await;
    (s, node, runner.id, a, waiting.id)
}

fn heartbeat_running(ids: &[&str]) -> Heartbeat {
    Heartbeat {
        free_memory_mib: 0,
        running_run_ids: ids.iter().map(|s| s.to_string()).collect(),
        cached_images: vec![],
    }
}

#[tokio::test]
async fn a_returning_node_takes_no_run_while_its_stale_container_runs() {
    let (s, mut node, runner, lost, waiting) = lost_node_with_a_waiting_run().await;
    // Back, still running the revoked run: told to stop it, and nothing new fits meanwhile.
    s.heartbeat("fra-1", heartbeat_running(&[&lost.run_id]))
        .await;
    match node.try_recv().ok() {
        Some(AgentCommand::StopRun { run_id }) => assert_eq!(run_id, lost.run_id),
        other => panic!("expected StopRun for the revoked lease, got {other:?}"),
    }
    assert!(
        node.try_recv().is_err(),
        "no assignment while it still runs"
    );
    let w = s.get_run(P, &runner, &waiting).await.expect("get");
    assert_eq!(
        (w.status, w.pending_reason.as_deref()),
        (
            RunStatus::Pending,
            Some("no node in fra with 1024 MiB free: 1 full")
        )
    );
    assert_eq!(s.list_nodes().await[0].view.free_memory_mib(), 0);
    s.assert_index_consistent().await;
    // Still running at the next heartbeat: still held (and asked again to stop).
    s.heartbeat("fra-1", heartbeat_running(&[&lost.run_id]))
        .await;
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    assert!(
        node.try_recv().is_err(),
        "no assignment while it still runs"
    );
    // Its exit report comes once the container is cleaned up: the waiting run goes there.
    s.run_exited("fra-1", exited(&lost, 143, ExitReason::Stopped))
        .await
        .expect("late exit");
    assert_eq!(next_assign(&mut node).run_id, waiting);
    let l = s.get_run(P, &runner, &lost.run_id).await.expect("get");
    assert_eq!(l.error_code.map(ErrorCode::as_str), Some("node_lost"));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_heartbeat_that_no_longer_lists_a_stale_run_frees_its_capacity() {
    let (s, mut node, _runner, lost, waiting) = lost_node_with_a_waiting_run().await;
    s.heartbeat("fra-1", heartbeat_running(&[&lost.run_id]))
        .await;
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    assert!(node.try_recv().is_err());
    s.heartbeat("fra-1", heartbeat_running(&[])).await;
    assert_eq!(next_assign(&mut node).run_id, waiting);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_lost_node_that_registers_again_stops_its_stale_runs_before_taking_new_ones() {
    let (s, _old, _runner, lost, waiting) = lost_node_with_a_waiting_run().await;
    // A new stream (the old one broke), listing the revoked run and one the scheduler never
    // heard of (its memory is unknown: the whole node is held).
    let (link, mut node) = recorder();
    s.attach_node(
        register("fra-1", "fra", 4096, &[&lost.run_id, "unknown-run"]),
        link,
    )
    .await
    .expect("attach");
    match node.recv().await {
        Some(AgentCommand::Registered(r)) => {
            let mut stale = r.stale_run_ids.clone();
            stale.sort();
            let mut want = vec![lost.run_id.clone(), "unknown-run".to_owned()];
            want.sort();
            assert_eq!(stale, want);
        }
        other => panic!("expected Registered, got {other:?}"),
    }
    assert!(matches!(
        node.recv().await,
        Some(AgentCommand::WarmPins { .. })
    ));
    assert!(
        node.try_recv().is_err(),
        "no assignment before the stale runs are gone"
    );
    s.assert_index_consistent().await;
    // The revoked run is gone, the unknown one still runs: 4096 MiB, all held.
    s.heartbeat("fra-1", heartbeat_running(&["unknown-run"]))
        .await;
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    assert!(
        node.try_recv().is_err(),
        "the unknown run holds the whole node"
    );
    s.heartbeat("fra-1", heartbeat_running(&[])).await;
    assert_eq!(next_assign(&mut node).run_id, waiting);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn lines_of_a_run_whose_node_was_lost_are_not_stored_after_its_end() {
    let (s, _node, _runner, lost, _waiting) = lost_node_with_a_waiting_run().await;
    let batch = LogBatch {
        run_id: lost.run_id.clone(),
        lines: vec![LogLine {
            seq: 1,
            stream: LogStream::Stdout,
            msg: "written after the node was declared lost".into(),
            ts_unix_nanos: 5,
        }],
    };
    s.append_logs("fra-1", batch)
        .await
        .expect("dropped, not failed");
    let stored = s
        .store
        .list_prefix(&keys::logs_prefix(&lost.run_id))
        .await
        .expect("list");
    assert!(stored.is_empty(), "{stored:?}");
}

#[tokio::test]
async fn a_run_canceled_while_assigned_holds_its_node_until_the_node_says_it_is_gone() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    // Room for one standard-s run.
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, first.id);
    let stopped = s.stop_run(P, &runner.id, &first.id).await.expect("stop");
    assert_eq!(stopped.status, RunStatus::Canceled);
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    // The agent may have started it already: the next run waits for its word.
    let second = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(
        node.try_recv().is_err(),
        "placed while the canceled run may run"
    );
    s.assert_index_consistent().await;
    // It had started and was stopped: its exit report frees the node.
    s.run_exited("fra-1", exited(&a, 137, ExitReason::Stopped))
        .await
        .expect("exit");
    assert_eq!(next_assign(&mut node).run_id, second.id);
    let second_a = s.get_run(P, &runner.id, &second.id).await.expect("get");
    assert_eq!(second_a.node_id.as_deref(), Some("fra-1"));
    s.assert_index_consistent().await;

    // Canceled before the agent ever had it: the next heartbeat, not listing it, frees it.
    let third = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    s.stop_run(P, &runner.id, &second.id).await.expect("stop");
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    assert!(node.try_recv().is_err());
    s.heartbeat("fra-1", Heartbeat::default()).await;
    assert_eq!(next_assign(&mut node).run_id, third.id);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_node_whose_sessions_keep_failing_is_lost_until_it_delivers_again() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let secs = Duration::from_secs_f64;
    let now = Instant::now();
    let before = now.checked_sub(secs(5.0)).expect("a clock 5 s old");
    let mut a = attach(&s, register("fra-a", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let running = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let assigned = next_assign(&mut a);
    s.run_started("fra-a", started(&assigned))
        .await
        .expect("started");

    // Its sessions have kept ending in errors for 5 s (TTL + grace is 3 s), each time it
    // registered again, so it never went silent.
    s.record_delivery_error("fra-a", "message too large", before);
    s.record_delivery_error("fra-a", "message too large", now + secs(0.5));
    s.touch("fra-a", now + secs(0.9));
    s.expire_nodes(now + secs(1.0)).await.expect("expire");
    let nodes = s.list_nodes().await;
    assert_eq!(nodes[0].view.status, NodeState::Lost, "it cannot deliver");
    let lost = s.get_run(P, &runner.id, &running.id).await.expect("get");
    assert_eq!(
        (lost.status, lost.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    assert_eq!(
        s.delivery_error("fra-a").as_deref(),
        Some("message too large"),
        "the node still shows why"
    );

    // Registering and heartbeating again do not make it ready while the streak goes on.
    let _a = attach(&s, register("fra-a", "fra", 1024, &[])).await;
    assert_eq!(s.list_nodes().await[0].view.status, NodeState::Lost);
    s.heartbeat("fra-a", heartbeat_running(&[])).await;
    assert_eq!(s.list_nodes().await[0].view.status, NodeState::Lost);
    s.expire_nodes(now + secs(1.0)).await.expect("expire");
    assert_eq!(s.list_nodes().await[0].view.status, NodeState::Lost);

    // It delivers a report: it is back.
    s.clear_delivery_error("fra-a");
    s.expire_nodes(now + secs(1.0)).await.expect("expire");
    assert_eq!(s.list_nodes().await[0].view.status, NodeState::Ready);
    assert_eq!(s.delivery_error("fra-a"), None);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_healthy_idle_node_is_not_lost_after_one_transient_error() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let secs = Duration::from_secs_f64;
    let t0 = Instant::now();
    let _first = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    s.record_delivery_error("fra-1", "connection reset", t0);
    // It registers again and only sends heartbeats (never a report to clear the error).
    let _second = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    for at in [2.5, 5.0, 10.0] {
        s.touch("fra-1", t0 + secs(at - 0.1));
        s.expire_nodes(t0 + secs(at)).await.expect("expire");
        assert_eq!(
            s.list_nodes().await[0].view.status,
            NodeState::Ready,
            "{at} s after one error, its session up since"
        );
    }
    // A session that lasted past the TTL and then failed starts a new streak.
    s.record_delivery_error("fra-1", "connection reset", t0 + secs(10.0));
    s.touch("fra-1", t0 + secs(12.9));
    s.expire_nodes(t0 + secs(13.0)).await.expect("expire");
    assert_eq!(s.list_nodes().await[0].view.status, NodeState::Ready);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn an_exit_reported_before_cleanup_holds_the_capacity_until_the_release() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, first.id);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let early = RunExited {
        cleanup_pending: true,
        ..exited(&a, 0, ExitReason::Exited)
    };
    s.run_exited("fra-1", early.clone()).await.expect("exit");
    // The run has ended for its users at once, with its timeline...
    let ended = s.get_run(P, &runner.id, &a.run_id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Succeeded);
    assert_eq!(
        (ended.timeline.exited, ended.timeline.exit_reported),
        (3_500_000, 3_600_000)
    );
    assert!(ended.timeline.ended > 0 && ended.timeline.created > 0);
    // ...but its memory is held while the node cleans up: nothing else is placed there, and a
    // heartbeat that still lists it asks for no stop.
    assert!(node.try_recv().is_err(), "nothing placed during cleanup");
    assert_eq!(s.list_nodes().await[0].view.free_memory_mib(), 0);
    s.heartbeat("fra-1", heartbeat_running(&[&a.run_id])).await;
    assert!(
        node.try_recv().is_err(),
        "no stop for a run being cleaned up"
    );
    // A re-sent exit report (after an agent restart) frees nothing either.
    s.run_exited("fra-1", early).await.expect("again");
    assert!(node.try_recv().is_err());
    s.assert_index_consistent().await;
    // Cleaned up: the waiting run takes its place.
    s.run_released(
        "fra-1",
        RunReleased {
            run_id: a.run_id.clone(),
            lease_epoch: a.lease_epoch,
        },
    )
    .await
    .expect("released");
    assert_eq!(next_assign(&mut node).run_id, waiting.id);
    s.assert_index_consistent().await;
    // A second release holds nothing and changes nothing.
    s.run_released(
        "fra-1",
        RunReleased {
            run_id: a.run_id.clone(),
            lease_epoch: a.lease_epoch,
        },
    )
    .await
    .expect("released twice");
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_being_cleaned_up_is_released_by_a_heartbeat_that_no_longer_lists_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let early = RunExited {
        cleanup_pending: true,
        ..exited(&a, 1, ExitReason::Exited)
    };
    s.run_exited("fra-1", early).await.expect("exit");
    assert!(node.try_recv().is_err());
    // The release was lost with a scheduler restart, say: the agent's list is the truth.
    s.heartbeat("fra-1", heartbeat_running(&[])).await;
    assert_eq!(next_assign(&mut node).run_id, waiting.id);
    s.assert_index_consistent().await;
}
