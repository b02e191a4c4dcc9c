//! Ephemeral runs and their one-shot nodes: the run goes to its own node only, and only with
//! its claim; the node takes nothing else; a node that never comes or is lost ends the run
//! `node_lost`; the node is removed once its run has ended and it has left.

use super::*;
use berth_core::agent::EphemeralClaim;
use berth_core::validate::RunInput;

pub(super) fn ephemeral_input() -> RunOverrides {
    RunOverrides::from_input(RunInput {
        ephemeral: Some(true),
        ..Default::default()
    })
    .expect("valid")
}

/// The registration of run `run`'s one-shot node, presenting `claim`.
pub(super) fn one_shot(run: &Run, claim: &str, mem: u64) -> Registration {
    let node_id = run.ephemeral.as_ref().expect("ephemeral").node_id.clone();
    Registration {
        max_concurrent_runs: 1,
        ephemeral: Some(EphemeralClaim {
            run_id: run.id.clone(),
            claim: claim.to_owned(),
        }),
        ..register(&node_id, "fra", mem, &[])
    }
}

fn assigned(rx: &mut Rx) -> Vec<AssignRun> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        if let AgentCommand::AssignRun(a) = c {
            out.push(a);
        }
    }
    out
}

#[tokio::test]
async fn an_ephemeral_run_goes_to_its_own_node_only_and_that_node_takes_nothing_else() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fleet = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let pin = run.ephemeral.clone().expect("pinned");
    let claim = pin
        .claim
        .clone()
        .expect("the claim is in the create answer");
    assert_eq!(pin.node_id, format!("eph-{}", run.id));
    assert!(
        assigned(&mut fleet).is_empty(),
        "a fleet node with room does not take it"
    );
    let read = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert!(
        read.ephemeral.as_ref().is_some_and(|e| e.claim.is_none()),
        "a read never shows the claim"
    );
    assert!(
        read.pending_reason
            .as_deref()
            .is_some_and(|r| r.starts_with(&format!(
                "waiting for its ephemeral node {} to connect",
                pin.node_id
            ))),
        "{:?}",
        read.pending_reason
    );
    assert_eq!(read.queue_position, None, "not in a region's queue");

    // A wrong claim, another run's node id, or a fleet node posing as it: refused.
    let (link, _rx) = recorder();
    let wrong = one_shot(&run, "berthclaim_0000", 4096);
    assert!(matches!(
        s.attach_node(wrong, link.clone()).await,
        Err(SchedulerError::Forbidden(_))
    ));
    let mut posing = register(&pin.node_id, "fra", 4096, &[]);
    posing.max_concurrent_runs = 1;
    assert!(matches!(
        s.attach_node(posing, link.clone()).await,
        Err(SchedulerError::Forbidden(_))
    ));
    let other_id = Registration {
        node_id: "eph-someone-else".into(),
        ..one_shot(&run, &claim, 4096)
    };
    assert!(matches!(
        s.attach_node(other_id, link.clone()).await,
        Err(SchedulerError::Forbidden(_))
    ));
    let too_small = one_shot(&run, &claim, 16);
    assert!(matches!(
        s.attach_node(too_small, link).await,
        Err(SchedulerError::Refused(_))
    ));

    // Its own node with the claim takes it at once.
    let mut own = attach(&s, one_shot(&run, &claim, 4096)).await;
    let got = assigned(&mut own);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].run_id, run.id);

    // A run of the fleet never goes to the ephemeral node, even when the fleet is full.
    s.set_draining("fra-1", true).await.expect("drain");
    let fleet_run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(
        assigned(&mut own).is_empty(),
        "the ephemeral node takes nothing else"
    );
    let waiting = s.get_run(P, &runner.id, &fleet_run.id).await.expect("get");
    assert!(
        waiting
            .pending_reason
            .as_deref()
            .is_some_and(|r| r.contains("1 reserved for another run")),
        "{:?}",
        waiting.pending_reason
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn the_run_ends_with_its_exit_and_the_node_is_removed_when_it_leaves() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let pin = run.ephemeral.clone().expect("pinned");
    let (link, mut rx) = recorder();
    let connection = s
        .attach_node(
            one_shot(&run, pin.claim.as_deref().unwrap_or_default(), 4096),
            link,
        )
        .await
        .expect("attach");
    let a = assigned(&mut rx).pop().expect("assigned");
    s.run_started(&pin.node_id, started(&a))
        .await
        .expect("started");
    s.run_exited(&pin.node_id, exited(&a, 7, ExitReason::Exited))
        .await
        .expect("exited");
    let ended = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Failed);
    assert_eq!(ended.exit_code, Some(7));
    assert_eq!(
        ended.node_id.as_deref(),
        Some(pin.node_id.as_str()),
        "the record names the node"
    );
    assert!(
        s.list_nodes()
            .await
            .iter()
            .any(|n| n.view.id == pin.node_id),
        "listed while connected"
    );

    s.detach_node(&pin.node_id, connection).await;
    assert!(
        !s.list_nodes()
            .await
            .iter()
            .any(|n| n.view.id == pin.node_id),
        "gone once it left"
    );
    s.assert_index_consistent().await;

    // Coming back for a run that has ended, with nothing of it: refused.
    let (link, _rx) = recorder();
    let again = one_shot(&run, pin.claim.as_deref().unwrap_or_default(), 4096);
    assert!(matches!(
        s.attach_node(again, link).await,
        Err(SchedulerError::Refused(_))
    ));
}

#[tokio::test]
async fn a_node_that_never_comes_or_is_lost_ends_the_run_node_lost() {
    let s = Scheduler::open(
        MemoryStore::new(),
        Config {
            ephemeral_connect_timeout: Duration::from_secs(5),
            ..config_fast_expiry()
        },
    )
    .await
    .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    // Never comes: ended once its connect_by has passed, not before.
    let never = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let by = never.ephemeral.as_ref().expect("pinned").connect_by;
    s.expire_ephemeral_runs(by - 1).await.expect("expire");
    assert_eq!(
        s.get_run(P, &runner.id, &never.id)
            .await
            .expect("get")
            .status,
        RunStatus::Pending
    );
    s.expire_ephemeral_runs(by + 1).await.expect("expire");
    let ended = s.get_run(P, &runner.id, &never.id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Failed);
    assert_eq!(ended.error_code, Some(ErrorCode::NodeLost));

    // Lost before it started the run: the run ends (there is no other node to queue it for).
    let lost = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let pin = lost.ephemeral.clone().expect("pinned");
    let mut rx = attach(
        &s,
        one_shot(&lost, pin.claim.as_deref().unwrap_or_default(), 4096),
    )
    .await;
    assert_eq!(assigned(&mut rx).len(), 1);
    s.expire_nodes(Instant::now() + Duration::from_secs(10))
        .await
        .expect("expire");
    let ended = s.get_run(P, &runner.id, &lost.id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Failed);
    assert_eq!(ended.error_code, Some(ErrorCode::NodeLost));
    assert!(
        ended
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("before it started")),
        "{:?}",
        ended.error_message
    );
    // Its link is gone with it; the node is removed with its run ended.
    assert!(!s
        .list_nodes()
        .await
        .iter()
        .any(|n| n.view.id == pin.node_id));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_restarted_scheduler_keeps_the_pin_and_drops_finished_ephemeral_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let (runner_id, waiting_id, node_of_ended) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-xs"))
            .await
            .expect("runner");
        let waiting = s
            .create_run(P, &runner.id, ephemeral_input())
            .await
            .expect("run");
        // One whose node ran it and then went away without the scheduler seeing it leave.
        let ended = s
            .create_run(P, &runner.id, ephemeral_input())
            .await
            .expect("run");
        let pin = ended.ephemeral.clone().expect("pinned");
        let mut rx = attach(
            &s,
            one_shot(&ended, pin.claim.as_deref().unwrap_or_default(), 4096),
        )
        .await;
        let a = assigned(&mut rx).pop().expect("assigned");
        s.run_started(&pin.node_id, started(&a))
            .await
            .expect("started");
        s.run_exited(&pin.node_id, exited(&a, 0, ExitReason::Exited))
            .await
            .expect("exited");
        (runner.id, waiting.id, pin.node_id)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    assert!(
        !s.list_nodes()
            .await
            .iter()
            .any(|n| n.view.id == node_of_ended),
        "an ephemeral node whose run ended is not loaded"
    );
    let mut fleet = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    assert!(
        assigned(&mut fleet).is_empty(),
        "still pinned after a restart"
    );
    let read = s.get_run(P, &runner_id, &waiting_id).await.expect("get");
    assert_eq!(read.status, RunStatus::Pending);
    assert!(read
        .pending_reason
        .as_deref()
        .is_some_and(|r| r.contains("ephemeral node")));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn batches_and_schedules_refuse_ephemeral_runs_naming_the_field() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    match s
        .create_runs(
            P,
            &runner.id,
            vec![RunOverrides::default(), ephemeral_input()],
        )
        .await
    {
        Err(SchedulerError::Invalid(e)) => {
            assert_eq!(e.0[0].field, "runs[1].ephemeral");
        }
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_ephemeral_run_waits_behind_its_runners_cap() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fleet = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let capped = RunnerSpec {
        max_concurrent_runs: Some(1),
        ..spec("fra", "standard-xs")
    };
    let (runner, _) = s.create_runner(P, capped).await.expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(assigned(&mut fleet).len(), 1);
    let run = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let claim = run
        .ephemeral
        .as_ref()
        .and_then(|e| e.claim.clone())
        .expect("claim");
    let mut own = attach(&s, one_shot(&run, &claim, 4096)).await;
    assert!(assigned(&mut own).is_empty(), "the cap holds it back");
    let read = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert!(
        read.pending_reason
            .as_deref()
            .is_some_and(|r| r.contains("max_concurrent_runs is 1")),
        "{:?}",
        read.pending_reason
    );
    // The slot frees: it goes to its node.
    s.stop_run(P, &runner.id, &first.id).await.ok();
    let a = out_of_fleet(&s, &first).await;
    s.run_exited("fra-1", exited(&a, 143, ExitReason::Exited))
        .await
        .expect("exited");
    let got = assigned(&mut own);
    assert_eq!(got.len(), 1, "assigned once the slot is free");
    assert_eq!(got[0].run_id, run.id);
}

async fn out_of_fleet<S: Store>(s: &Scheduler<S>, run: &Run) -> AssignRun {
    let live = s.get_run(P, &run.runner_id, &run.id).await.expect("get");
    AssignRun {
        run_id: live.id.clone(),
        lease_epoch: live.lease_epoch,
        spec: s.run_spec(&*s.state.lock().await, &live),
        runner_id: live.runner_id.clone(),
        trace_parent: None,
    }
}
