//! Waiting runs: reasons, queue positions, the starvation guard.

use super::*;

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
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let second = s
        .create_run(P, &runner.id, RunOverrides::default())
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
        .create_run(P, &fra.id, RunOverrides::default())
        .await
        .expect("run");
    let a1 = s
        .create_run(P, &ams.id, RunOverrides::default())
        .await
        .expect("run");
    let f2 = s
        .create_run(P, &fra.id, RunOverrides::default())
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
        .create_run(P, &small.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, first.id);
    let waiting_big = s
        .create_run(P, &big.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(
        waiting_big.pending_reason.as_deref(),
        Some("no node in fra with 2048 MiB free: 1 full; node fra-1 is reserved for this run")
    );
    // Without the reservation this small run would fit in the free 1024 MiB and starve the big one.
    let small_again = s
        .create_run(P, &small.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(small_again.node_id, None);
    assert_eq!(
        small_again.pending_reason.as_deref(),
        Some("no node in fra with 1024 MiB free: 1 reserved for another run")
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

#[tokio::test]
async fn a_pass_stops_at_the_first_run_nothing_can_fit_and_every_skipped_run_says_why() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (small, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (big, _) = s
        .create_runner(P, spec("fra", "standard-m"))
        .await
        .expect("runner");
    let running = s
        .create_run(P, &small.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut fra);
    assert_eq!(a.run_id, running.id);
    // Sizes interleaved: the pass stops after the first small run found no node, and the
    // runs after it (both sizes) are skipped.
    let mut waiting = Vec::new();
    for runner in [&big, &small, &big, &small, &big] {
        let run = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        waiting.push((runner.id.clone(), run.id));
    }
    // One more waiting run costs a pass two looks (the oldest of each size), not one per run.
    let visits = s.state.lock().await.pass_visits;
    let extra = s
        .create_run(P, &big.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(s.state.lock().await.pass_visits - visits, 2);
    s.stop_run(P, &big.id, &extra.id).await.expect("stop");
    let full = |mib: u64| format!("no node in fra with {mib} MiB free: 1 full");
    let expect = [full(2048), full(1024), full(2048), full(1024), full(2048)];
    for (i, ((runner, run), want)) in waiting.iter().zip(&expect).enumerate() {
        let run = s.get_run(P, runner, run).await.expect("get");
        assert_eq!(
            run.pending_reason.as_deref(),
            Some(want.as_str()),
            "run {i}"
        );
        assert_eq!(run.queue_position, u32::try_from(i + 1).ok(), "run {i}");
    }
    // Another region is placed in the same passes, whatever fra's queue holds.
    let mut ams = attach(&s, register("ams-1", "ams", 1024, &[])).await;
    let (ams_runner, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let ams_run = s
        .create_run(P, &ams_runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(next_assign(&mut ams).run_id, ams_run.id);

    // Capacity frees: the oldest run that fits (the first small one) takes it, past the big
    // one that can never fit this node, and the rest move up.
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert_eq!(next_assign(&mut fra).run_id, waiting[1].1);
    let still = [
        (0, 1, full(2048)),
        (2, 2, full(2048)),
        (3, 3, full(1024)),
        (4, 4, full(2048)),
    ];
    for (i, position, want) in still {
        let (runner, run) = &waiting[i];
        let run = s.get_run(P, runner, run).await.expect("get");
        assert_eq!(
            run.pending_reason.as_deref(),
            Some(want.as_str()),
            "run {i}"
        );
        assert_eq!(run.queue_position, Some(position), "run {i}");
    }
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn active_runs_list_the_queue_per_project_with_the_positions_each_run_has() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (mine, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (theirs, _) = s
        .create_runner("beta", spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (ams, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    // Interleaved: beta's runs and ams's stand between P's fra runs.
    let mut created = vec![];
    for i in 0..12 {
        let (project, runner) = match i % 3 {
            0 => (P, &mine.id),
            1 => ("beta", &theirs.id),
            _ => (P, &ams.id),
        };
        let run = s
            .create_run(project, runner, RunOverrides::default())
            .await
            .expect("run");
        created.push((project, run));
    }
    s.stop_run(P, &mine.id, &created[3].1.id)
        .await
        .expect("stop");

    // Every project's (an admin), in pages of 5: each run's position is the one `get_run` says.
    let mut all = vec![];
    let mut after = None;
    loop {
        let (page, next) = s
            .list_active_runs(None, None, None, after.as_deref(), 5)
            .await
            .expect("list");
        all.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(all.len(), 11, "the stopped run has ended");
    for run in &all {
        let alone = s
            .get_run(&run.project, &run.runner_id, &run.id)
            .await
            .expect("get");
        assert_eq!(run.queue_position, alone.queue_position, "{}", run.id);
        assert!(run.queue_position.is_some());
    }
    // fra's queue: P's 0, beta's 1, beta's 4, P's 6, ... (P's 3 was stopped).
    let (p_fra, _) = s
        .list_active_runs(Some(P), None, Some("fra"), None, 100)
        .await
        .expect("list");
    let positions: Vec<_> = p_fra.iter().map(|r| r.queue_position).collect();
    assert_eq!(positions, vec![Some(1), Some(4), Some(6)]);
    assert!(p_fra.iter().all(|r| r.project == P && r.region == "fra"));
    let (running, _) = s
        .list_active_runs(Some(P), Some(RunStatus::Running), None, None, 100)
        .await
        .expect("list");
    assert!(running.is_empty());

    // A runner's runs, newest first, paged with the same cursor.
    let (newest, next) = s.list_runs(P, &mine.id, None, 2, true).await.expect("list");
    let ids: Vec<_> = newest.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, vec![created[9].1.id.clone(), created[6].1.id.clone()]);
    let positions: Vec<_> = newest.iter().map(|r| r.queue_position).collect();
    assert_eq!(
        positions,
        vec![Some(6), Some(4)],
        "a page's positions, newest first"
    );
    let (older, next) = s
        .list_runs(P, &mine.id, next.as_deref(), 2, true)
        .await
        .expect("list");
    let ids: Vec<_> = older.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, vec![created[3].1.id.clone(), created[0].1.id.clone()]);
    assert_eq!(next, None);
}
