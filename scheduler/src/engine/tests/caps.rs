//! A runner's `max_concurrent_runs`: runs beyond it wait in the queue, say why and where, and go
//! out one per freed slot; the cap holds after a restart (a new leader).

use super::*;

fn capped(cap: u32) -> RunnerSpec {
    RunnerSpec {
        max_concurrent_runs: Some(cap),
        ..spec("fra", "standard-xs")
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
async fn runs_beyond_the_cap_wait_behind_it_and_take_freed_slots_in_order() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s.create_runner(P, capped(2)).await.expect("runner");
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(
            s.create_run(P, &runner.id, RunOverrides::default())
                .await
                .expect("run"),
        );
    }
    let out = assigned(&mut node);
    let ids: Vec<&str> = out.iter().map(|a| a.run_id.as_str()).collect();
    assert_eq!(ids, [runs[0].id.as_str(), runs[1].id.as_str()], "the cap");
    let third = s.get_run(P, &runner.id, &runs[2].id).await.expect("get");
    assert_eq!(
        third.pending_reason.as_deref(),
        Some(
            "waiting for a slot: the runner's max_concurrent_runs is 2 and 2 of its runs are \
             assigned or running; 1st of the runner's 3 waiting runs"
        )
    );
    assert_eq!(third.queue_position, Some(1));
    let fifth = s.get_run(P, &runner.id, &runs[4].id).await.expect("get");
    assert!(
        fifth
            .pending_reason
            .as_deref()
            .is_some_and(|r| r.ends_with("3rd of the runner's 3 waiting runs")),
        "{:?}",
        fifth.pending_reason
    );

    // Another runner in the region is not held back by this one's cap.
    let (free, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let other = s
        .create_run(P, &free.id, RunOverrides::default())
        .await
        .expect("run");
    let out = assigned(&mut node);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].run_id, other.id);

    // A slot frees when a run ends (not when it starts): exactly one more goes out, the oldest.
    s.run_started("fra-1", started(&out_of(&s, &runs[0]).await))
        .await
        .expect("started");
    assert!(
        assigned(&mut node).is_empty(),
        "started still holds its slot"
    );
    let first = out_of(&s, &runs[0]).await;
    // Reported before its container is cleaned up (the agent's usual order): the node's
    // memory stays held, the runner's slot does not.
    s.run_exited(
        "fra-1",
        RunExited {
            cleanup_pending: true,
            ..exited(&first, 0, ExitReason::Exited)
        },
    )
    .await
    .expect("exited");
    let out = assigned(&mut node);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].run_id, runs[2].id);
    // A run stopped while assigned frees its slot too.
    s.stop_run(P, &runner.id, &runs[1].id).await.expect("stop");
    let out = assigned(&mut node);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].run_id, runs[3].id);
    s.assert_index_consistent().await;

    // Raising the cap lets the rest out at once; lowering it holds new runs back.
    let (_, rev) = s.get_runner(P, &runner.id).await.expect("runner");
    let (_, rev) = s
        .update_runner(P, &runner.id, capped(3), rev)
        .await
        .expect("raise");
    let out = assigned(&mut node);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].run_id, runs[4].id);
    s.update_runner(P, &runner.id, capped(1), rev)
        .await
        .expect("lower");
    let late = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(assigned(&mut node).is_empty());
    let late = s.get_run(P, &runner.id, &late.id).await.expect("get");
    assert!(
        late.pending_reason
            .as_deref()
            .is_some_and(|r| r.contains("max_concurrent_runs is 1 and 3 of its runs")),
        "{:?}",
        late.pending_reason
    );
    s.assert_index_consistent().await;
}

/// The assignment `run` holds now, as its node received it.
async fn out_of<S: Store>(s: &Scheduler<S>, run: &Run) -> AssignRun {
    let live = s
        .get_run(P, &run.runner_id, &run.id)
        .await
        .expect("get run");
    AssignRun {
        run_id: live.id.clone(),
        lease_epoch: live.lease_epoch,
        spec: s.run_spec(&*s.state.lock().await, &live),
        runner_id: live.runner_id.clone(),
        trace_parent: None,
    }
}

#[tokio::test]
async fn the_cap_holds_after_a_restart_and_goes_with_its_runner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, runs) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
        let (runner, _) = s.create_runner(P, capped(2)).await.expect("runner");
        let mut runs = Vec::new();
        for _ in 0..4 {
            let run = s
                .create_run(P, &runner.id, RunOverrides::default())
                .await
                .expect("run");
            runs.push(run.id);
        }
        assert_eq!(assigned(&mut node).len(), 2);
        (runner.id, runs)
    };
    // A new scheduler (a restart, or a standby taking over) counts the runs that hold slots
    // from the active runs and reads the cap from the runner.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut node = attach(
        &s,
        register("fra-1", "fra", 8192, &[runs[0].as_str(), runs[1].as_str()]),
    )
    .await;
    let extra = s
        .create_run(P, &runner_id, RunOverrides::default())
        .await
        .expect("run");
    assert!(assigned(&mut node).is_empty(), "still at the cap");
    assert!(extra
        .pending_reason
        .as_deref()
        .is_some_and(|r| r.contains("max_concurrent_runs is 2 and 2")));
    s.assert_index_consistent().await;

    // Deleting the runner lifts its cap: its waiting runs are ordinary runs again.
    s.delete_runner(P, &runner_id).await.expect("delete");
    let ids: Vec<String> = assigned(&mut node).into_iter().map(|a| a.run_id).collect();
    assert_eq!(ids, [runs[2].clone(), runs[3].clone(), extra.id]);
    s.assert_index_consistent().await;
}
