//! Schedules: each fire creates one run, once, also after a restart; `forbid` skips a fire
//! while a run of the schedule has not ended, `replace` stops it; missed fires follow
//! `catch_up`; a paused schedule does not fire; a deleted runner takes its schedules along.

use super::*;
use berth_core::schedule::{CatchUp, OverlapPolicy, ScheduleInput};

fn every_10s(overlap: OverlapPolicy, catch_up: CatchUp) -> ScheduleInput {
    ScheduleInput {
        cron: Some("*/10 * * * * *".into()),
        overlap: Some(overlap),
        catch_up: Some(catch_up),
        run: Some(berth_core::validate::RunInput {
            command: Some("echo scheduled".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn runs_of<S: Store>(s: &Scheduler<S>, runner: &str) -> Vec<Run> {
    s.list_runs(P, runner, None, 1000, false)
        .await
        .expect("list")
        .0
}

#[tokio::test]
async fn each_fire_creates_one_run_once_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, first_fire) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-xs"))
            .await
            .expect("runner");
        let sched = s
            .create_schedule(
                P,
                &runner.id,
                every_10s(OverlapPolicy::Allow, CatchUp::Skip),
            )
            .await
            .expect("schedule");
        let at = sched.next_fire_at.expect("a next fire");
        s.fire_due_schedules(at - 1).await.expect("fire");
        assert!(runs_of(&s, &runner.id).await.is_empty(), "not yet due");
        s.fire_due_schedules(at + 1).await.expect("fire");
        s.fire_due_schedules(at + 2).await.expect("fire again");
        let runs = runs_of(&s, &runner.id).await;
        assert_eq!(runs.len(), 1, "one run per fire");
        assert_eq!(runs[0].schedule_id.as_deref(), Some(sched.id.as_str()));
        assert_eq!(runs[0].scheduled_for, Some(at));
        assert_eq!(runs[0].command.as_deref(), Some("echo scheduled"));
        let shown = s.get_schedule(P, &runner.id, &sched.id).await.expect("get");
        assert_eq!((shown.fired, shown.next_fire_at), (1, Some(at + 10_000)));
        (runner.id, at)
    };
    // A new scheduler (a restart or a new leader) at the same instant fires nothing again.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    s.fire_due_schedules(first_fire + 3).await.expect("fire");
    assert_eq!(runs_of(&s, &runner_id).await.len(), 1);
    s.fire_due_schedules(first_fire + 10_001)
        .await
        .expect("fire");
    let runs = runs_of(&s, &runner_id).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].scheduled_for, Some(first_fire + 10_000));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn forbid_skips_while_a_run_is_on_and_replace_stops_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let forbid = s
        .create_schedule(
            P,
            &runner.id,
            every_10s(OverlapPolicy::Forbid, CatchUp::Skip),
        )
        .await
        .expect("schedule");
    let at = forbid.next_fire_at.expect("next");
    s.fire_due_schedules(at + 1).await.expect("fire");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.fire_due_schedules(at + 10_001).await.expect("fire");
    assert!(node.try_recv().is_err(), "forbid: no second run");
    let shown = s
        .get_schedule(P, &runner.id, &forbid.id)
        .await
        .expect("get");
    assert_eq!((shown.fired, shown.skipped), (1, 1));
    assert!(shown
        .last_skip_reason
        .as_deref()
        .is_some_and(|r| r.contains(&a.run_id)));
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    s.fire_due_schedules(at + 20_001).await.expect("fire");
    next_assign(&mut node);
    s.delete_schedule(P, &runner.id, &forbid.id)
        .await
        .expect("delete");
    // The second run of the forbid schedule is still on; replace it.
    let replace = s
        .create_schedule(
            P,
            &runner.id,
            every_10s(OverlapPolicy::Replace, CatchUp::Skip),
        )
        .await
        .expect("schedule");
    let at = replace.next_fire_at.expect("next");
    s.fire_due_schedules(at + 1).await.expect("fire");
    let first = next_assign(&mut node);
    s.run_started("fra-1", started(&first))
        .await
        .expect("started");
    s.fire_due_schedules(at + 10_001).await.expect("fire");
    match node.try_recv() {
        Ok(AgentCommand::StopRun { run_id }) => assert_eq!(run_id, first.run_id),
        other => panic!("expected the earlier run stopped first, got {other:?}"),
    }
    let second = next_assign(&mut node);
    assert_ne!(second.run_id, first.run_id);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn missed_fires_follow_catch_up_and_paused_schedules_do_not_fire() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let skip = s
        .create_schedule(
            P,
            &runner.id,
            every_10s(OverlapPolicy::Allow, CatchUp::Skip),
        )
        .await
        .expect("schedule");
    let once = s
        .create_schedule(
            P,
            &runner.id,
            every_10s(OverlapPolicy::Allow, CatchUp::RunOnce),
        )
        .await
        .expect("schedule");
    let paused = s
        .create_schedule(
            P,
            &runner.id,
            ScheduleInput {
                paused: Some(true),
                ..every_10s(OverlapPolicy::Allow, CatchUp::RunOnce)
            },
        )
        .await
        .expect("schedule");
    // The control plane was "down" for ten minutes, and the last minute's fires are late but
    // within the grace: those fire; the older ones are missed.
    let at = skip.next_fire_at.expect("next");
    let now = at + 600_000 + 5_000;
    s.fire_due_schedules(now).await.expect("fire");
    let runs = runs_of(&s, &runner.id).await;
    let of = |id: &str| {
        runs.iter()
            .filter(|r| r.schedule_id.as_deref() == Some(id))
            .count()
    };
    assert_eq!(of(&skip.id), 6, "the fires within the last minute");
    assert_eq!(
        of(&once.id),
        6,
        "run_once adds nothing when a fire is on time"
    );
    assert_eq!(of(&paused.id), 0);
    let skipped = s.get_schedule(P, &runner.id, &skip.id).await.expect("get");
    assert_eq!(skipped.skipped, 55);

    // Hourly schedules left for over two hours: every fire is older than the grace. `skip`
    // drops them all; `run_once` fires once, for the latest.
    let hourly = |catch_up| ScheduleInput {
        cron: Some("0 * * * *".into()),
        catch_up: Some(catch_up),
        ..Default::default()
    };
    let h_skip = s
        .create_schedule(P, &runner.id, hourly(CatchUp::Skip))
        .await
        .expect("schedule");
    let h_once = s
        .create_schedule(P, &runner.id, hourly(CatchUp::RunOnce))
        .await
        .expect("schedule");
    let first = h_skip.next_fire_at.expect("next");
    s.fire_due_schedules(first + 2 * 3_600_000 + 120_000)
        .await
        .expect("fire");
    let runs = runs_of(&s, &runner.id).await;
    let of = |id: &str| -> Vec<Option<i64>> {
        runs.iter()
            .filter(|r| r.schedule_id.as_deref() == Some(id))
            .map(|r| r.scheduled_for)
            .collect()
    };
    assert!(of(&h_skip.id).is_empty());
    assert_eq!(of(&h_once.id), [Some(first + 2 * 3_600_000)]);
    let shown = s
        .get_schedule(P, &runner.id, &h_once.id)
        .await
        .expect("get");
    assert_eq!(
        (shown.skipped, shown.next_fire_at),
        (2, Some(first + 3 * 3_600_000))
    );

    // Deleting the runner deletes its schedules.
    s.delete_runner(P, &runner.id).await.expect("delete");
    assert!(not_found(s.get_schedule(P, &runner.id, &skip.id).await));
}

#[tokio::test]
async fn a_long_backlog_fires_a_bounded_transaction_at_a_time_and_loses_none() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let every_second = s
        .create_schedule(
            P,
            &runner.id,
            ScheduleInput {
                cron: Some("* * * * * *".into()),
                ..Default::default()
            },
        )
        .await
        .expect("schedule");
    let first = every_second.next_fire_at.expect("next");
    // 40 fires due, all within the grace: more than one transaction may hold.
    let now = first + 39_000;
    s.fire_due_schedules(now).await.expect("fire");
    assert_eq!(
        runs_of(&s, &runner.id).await.len(),
        16,
        "one bounded transaction"
    );
    for _ in 0..3 {
        s.fire_due_schedules(now).await.expect("fire");
    }
    let fires: Vec<i64> = runs_of(&s, &runner.id)
        .await
        .iter()
        .filter_map(|r| r.scheduled_for)
        .collect();
    let want: Vec<i64> = (0..40).map(|i| first + i * 1000).collect();
    assert_eq!(fires, want, "every fire once, in order");
}
