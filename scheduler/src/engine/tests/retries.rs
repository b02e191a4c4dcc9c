//! Retry policies: the causes a policy lists start another attempt (a run of its own, linked
//! both ways), up to its attempts, after its backoff; what it does not list, a user's stop and an
//! unlisted timeout never do; a run's own policy replaces its runner's; a retry in its backoff
//! survives a restart.

use super::*;
use berth_core::retry::{RetryCause, RetryPolicy};

fn policy(max_attempts: u32, backoff_seconds: u32, retry_on: &[RetryCause]) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff_seconds,
        backoff_multiplier: 2,
        max_backoff_seconds: 60,
        retry_on: retry_on.to_vec(),
        exit_codes: vec![],
    }
}

fn retried(p: RetryPolicy) -> RunnerSpec {
    RunnerSpec {
        retry_policy: Some(p),
        ..spec("fra", "standard-xs")
    }
}

async fn end<S: Store>(s: &Scheduler<S>, a: &AssignRun, code: i32, reason: ExitReason) {
    s.run_started("fra-1", started(a)).await.expect("started");
    s.run_exited("fra-1", exited(a, code, reason))
        .await
        .expect("exited");
}

#[tokio::test]
async fn listed_causes_retry_up_to_the_attempts_and_the_first_run_shows_the_outcome() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, retried(policy(3, 0, &[RetryCause::ExitCode])))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a1 = next_assign(&mut node);
    end(&s, &a1, 1, ExitReason::Exited).await;
    // The second attempt is a new run, placed at once (no backoff).
    let a2 = next_assign(&mut node);
    assert_ne!(a2.run_id, first.id);
    let second = s.get_run(P, &runner.id, &a2.run_id).await.expect("get");
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.previous_attempt_id.as_deref(),
        Some(first.id.as_str())
    );
    assert_eq!(second.first_attempt_id.as_deref(), Some(first.id.as_str()));
    assert_eq!(second.retry_cause, Some(RetryCause::ExitCode));
    let shown = s.get_run(P, &runner.id, &first.id).await.expect("get");
    assert_eq!(
        shown.status,
        RunStatus::Failed,
        "each attempt keeps its own end"
    );
    assert_eq!(shown.next_attempt_id.as_deref(), Some(a2.run_id.as_str()));
    assert_eq!(
        shown.final_attempt.as_ref().map(|f| (f.attempt, f.status)),
        Some((2, RunStatus::Pending))
    );

    end(&s, &a2, 1, ExitReason::Exited).await;
    let a3 = next_assign(&mut node);
    end(&s, &a3, 1, ExitReason::Exited).await;
    assert!(node.try_recv().is_err(), "three attempts in all");
    let shown = s.get_run(P, &runner.id, &first.id).await.expect("get");
    let last = shown.final_attempt.expect("the chain's end");
    assert_eq!(
        (last.id.as_str(), last.attempt, last.status, last.exit_code),
        (a3.run_id.as_str(), 3, RunStatus::Failed, Some(1))
    );
    // Each attempt is a run of the runner, billed for itself.
    let (runs, _) = s
        .list_runs(P, &runner.id, None, 100, false)
        .await
        .expect("list");
    assert_eq!(runs.len(), 3);
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn what_the_policy_does_not_list_never_retries() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let only_75 = RetryPolicy {
        exit_codes: vec![75],
        ..policy(5, 0, &[RetryCause::ExitCode, RetryCause::NodeLost])
    };
    let (runner, _) = s.create_runner(P, retried(only_75)).await.expect("runner");
    let run = |_: ()| s.create_run(P, &runner.id, RunOverrides::default());
    // An exit code the policy does not list, a timeout (not listed), success, a user's stop.
    for (code, reason) in [
        (1, ExitReason::Exited),
        (124, ExitReason::Timeout),
        (0, ExitReason::Exited),
        (143, ExitReason::Stopped),
    ] {
        run(()).await.expect("run");
        let a = next_assign(&mut node);
        end(&s, &a, code, reason).await;
        assert!(node.try_recv().is_err(), "{code} {reason:?} is not retried");
    }
    // A listed code is.
    run(()).await.expect("run");
    let a = next_assign(&mut node);
    end(&s, &a, 75, ExitReason::Exited).await;
    assert_eq!(next_assign(&mut node).run_id.len(), a.run_id.len());

    // A run's own policy replaces the runner's: one attempt, no retry.
    let own = RunOverrides::from_input(berth_core::validate::RunInput {
        retry_policy: Some(policy(1, 0, &[])),
        ..Default::default()
    })
    .expect("valid");
    s.create_run(P, &runner.id, own).await.expect("run");
    let a = next_assign(&mut node);
    end(&s, &a, 75, ExitReason::Exited).await;
    assert!(node.try_recv().is_err(), "the run's own policy holds");
}

#[tokio::test]
async fn a_lost_node_retries_on_another_node() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let _a = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, retried(policy(2, 0, &[RetryCause::NodeLost])))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let mut a = _a;
    let a1 = next_assign(&mut a);
    s.run_started("fra-1", started(&a1)).await.expect("started");
    let mut b = attach(&s, register("fra-2", "fra", 8192, &[])).await;
    s.touch("fra-2", Instant::now() + Duration::from_secs(10));
    s.expire_nodes(Instant::now() + Duration::from_secs(4))
        .await
        .expect("expire");
    let lost = s.get_run(P, &runner.id, &first.id).await.expect("get");
    assert_eq!(lost.error_code, Some(ErrorCode::NodeLost));
    let a2 = next_assign(&mut b);
    assert_eq!(lost.next_attempt_id.as_deref(), Some(a2.run_id.as_str()));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_retry_waits_for_its_backoff_even_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, retry_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
        let (runner, _) = s
            .create_runner(P, retried(policy(2, 1, &[RetryCause::ExitCode])))
            .await
            .expect("runner");
        let first = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        end(&s, &a, 3, ExitReason::Exited).await;
        assert!(node.try_recv().is_err(), "not before its backoff");
        let shown = s.get_run(P, &runner.id, &first.id).await.expect("get");
        let retry_id = shown.next_attempt_id.clone().expect("retried");
        let retry = s.get_run(P, &runner.id, &retry_id).await.expect("get");
        assert!(retry.not_before.is_some());
        assert!(
            retry
                .pending_reason
                .as_deref()
                .is_some_and(|r| r.starts_with("retry: attempt 2 of 2 (the previous one ended: exit_code); waiting for its backoff")),
            "{:?}",
            retry.pending_reason
        );
        (runner.id, retry_id)
    };
    // The retry is stored with the end of the attempt before it: a new scheduler has it, and
    // places it once its backoff is over.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    assert!(node.try_recv().is_err(), "still in its backoff");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.place_due_retries(now_unix_millis())
        .await
        .expect("due retries");
    assert_eq!(next_assign(&mut node).run_id, retry_id);
    let placed = s.get_run(P, &runner_id, &retry_id).await.expect("get");
    assert_eq!(placed.attempt, 2);
    s.assert_index_consistent().await;
}
