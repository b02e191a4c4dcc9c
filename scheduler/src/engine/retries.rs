//! Retries (a runner's or a run's `retry_policy`): when an attempt ends for a cause its policy
//! lists, `stage` stores the next attempt, a new pending run, in the same unit of writes as the
//! end (so a failover never loses or doubles one), linked both ways. An attempt with a backoff
//! keeps its place in the queue but is not placed before `not_before`; the scheduler's timer
//! (`place_due_retries`) runs a pass when the earliest wait is over.

use super::{new_id, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::model::{FinalAttempt, Timeline};
use berth_core::retry::MAX_ATTEMPTS_MAX;
use berth_core::store::Store;
use berth_core::{now_unix_millis, Run, RunStatus};

/// The attempt after `run`, which is ending now, if its policy retries how it ended; `run` then
/// names it as its next attempt.
pub(super) fn next_attempt(run: &mut Run) -> Option<Run> {
    let policy = run.retry_policy.as_ref()?;
    let cause = policy.retries(run)?;
    let wait_seconds = policy.backoff_seconds_after(run.attempt);
    let now = now_unix_millis();
    let attempt = run.attempt + 1;
    let next = Run {
        id: new_id(),
        status: RunStatus::Pending,
        exit_code: None,
        image_digest: None,
        image_pull: None,
        node_id: None,
        lease_epoch: 0,
        created_at: now,
        started_at: None,
        completed_at: None,
        error_code: None,
        error_message: None,
        pending_reason: Some(reason(attempt, policy.max_attempts, cause.as_str())),
        stop_requested: false,
        oom_killed: false,
        queue_position: None,
        timeline: Timeline {
            created: berth_core::now_unix_micros(),
            ..Timeline::default()
        },
        attempt,
        first_attempt_id: Some(
            run.first_attempt_id
                .clone()
                .unwrap_or_else(|| run.id.clone()),
        ),
        previous_attempt_id: Some(run.id.clone()),
        next_attempt_id: None,
        not_before: (wait_seconds > 0).then(|| now + i64::from(wait_seconds) * 1000),
        retry_cause: Some(cause),
        final_attempt: None,
        runtime: None,
        ..run.clone()
    };
    tracing::info!(
        run_id = %run.id,
        next_run_id = %next.id,
        attempt,
        max_attempts = policy.max_attempts,
        cause = cause.as_str(),
        backoff_seconds = wait_seconds,
        "run retried"
    );
    run.next_attempt_id = Some(next.id.clone());
    Some(next)
}

fn reason(attempt: u32, max_attempts: u32, cause: &str) -> String {
    format!("retry: attempt {attempt} of {max_attempts} (the previous one ended: {cause})")
}

/// Why a retry still in its backoff waits.
pub(super) fn backoff_reason(run: &Run, until: i64) -> String {
    let max = run
        .retry_policy
        .as_ref()
        .map_or(run.attempt, |p| p.max_attempts);
    let cause = run.retry_cause.map_or("failed", |c| c.as_str());
    let seconds = ((until - now_unix_millis()).max(0) + 999) / 1000;
    format!(
        "{}; waiting for its backoff ({seconds} s left)",
        reason(run.attempt, max, cause)
    )
}

/// A waiting run's backoff end, if it is still ahead.
pub(super) fn in_backoff(run: &Run, now: i64) -> Option<i64> {
    run.not_before.filter(|&t| t > now)
}

impl State {
    /// Remembers when a queued retry's backoff ends (see `place_due_retries`).
    pub(super) fn note_backoff(&mut self, run: &Run) {
        // Most runs have no backoff: no clock read for them.
        let Some(at) = run.not_before else { return };
        if at > now_unix_millis() {
            self.backoffs.insert((at, run.id.clone()));
        }
    }
}

impl<S: Store> Scheduler<S> {
    /// Places the retries whose backoff is over, if any is (called by a timer; cheap when none
    /// is due).
    pub async fn place_due_retries(&self, now: i64) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let mut due = false;
        while st.backoffs.first().is_some_and(|(at, _)| *at <= now) {
            st.backoffs.pop_first();
            due = true;
        }
        if due {
            return self.settle(st, true).await;
        }
        Ok(())
    }

    /// The last attempt of `run`'s chain of retries (None when it was not retried): a read of
    /// each later attempt, at most the policy's limit.
    pub(super) async fn final_attempt(
        &self,
        run: &Run,
    ) -> Result<Option<FinalAttempt>, SchedulerError> {
        let mut next = run.next_attempt_id.clone();
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS_MAX {
            let Some(id) = next else { break };
            let (attempt, _) = self.load_run(&id).await?;
            next = attempt.next_attempt_id.clone();
            last = Some(attempt);
        }
        Ok(last.map(|a| FinalAttempt {
            id: a.id,
            attempt: a.attempt,
            status: a.status,
            exit_code: a.exit_code,
            error_code: a.error_code,
        }))
    }
}
