//! Schedules (`core::schedule`): their CRUD and their fires. The leader keeps every schedule in
//! memory (loaded by `open`) and a timer (`fire_due_schedules`) fires what is due.
//!
//! Exactly once: a fire's run (or its skip) and the schedule's advanced `next_fire_at` are
//! staged as one unit of writes — one store transaction — so after a crash or a failover the
//! new leader finds either both (the fire is past) or neither (it fires it). A fire's run is an
//! ordinary run with `schedule_id` and `scheduled_for` (the intended time), so its retries, cap
//! and logs are a run's. `forbid` skips a fire while any run of the schedule has not ended
//! (checked under the engine lock against the active runs, which a new leader loads too);
//! `replace` stops those runs first.

use super::registries::runner_image_in;
use super::runs::new_run;
use super::{encode, new_id, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::overrides::RunOverrides;
use berth_core::schedule::{Fire, OverlapPolicy, Schedule, ScheduleInput};
use berth_core::store::{Expect, Store};
use berth_core::{keys, now_unix_millis, Run, Runner};
use std::collections::BTreeMap;

/// Schedules one runner may have.
pub const MAX_SCHEDULES_PER_RUNNER: usize = 100;
/// Runs one fire transaction creates at most (each is a few writes, a `replace` adds stops).
const MAX_FIRES_PER_TXN: usize = 16;

impl<S: Store> Scheduler<S> {
    pub(super) async fn load_schedules(
        store: &S,
    ) -> Result<BTreeMap<String, Schedule>, SchedulerError> {
        let mut out = BTreeMap::new();
        for kv in store.list_prefix(keys::SCHEDULES).await? {
            let s: Schedule = super::decode(&kv.key, &kv.value)?;
            out.insert(s.id.clone(), s);
        }
        Ok(out)
    }

    pub async fn create_schedule(
        &self,
        project: &str,
        runner_id: &str,
        input: ScheduleInput,
    ) -> Result<Schedule, SchedulerError> {
        self.get_runner(project, runner_id).await?;
        let schedule = Schedule::create(new_id(), runner_id, project, input, now_unix_millis())?;
        let mut st = self.state.lock().await;
        let count = st
            .schedules
            .values()
            .filter(|s| s.runner_id == runner_id)
            .count();
        if count >= MAX_SCHEDULES_PER_RUNNER {
            return Err(berth_core::validate::ValidationErrors::single(
                "cron",
                format!("a runner has at most {MAX_SCHEDULES_PER_RUNNER} schedules"),
            )
            .into());
        }
        st.write(
            keys::schedule(&schedule.id),
            encode(&schedule),
            Expect::Absent,
        );
        st.schedules.insert(schedule.id.clone(), schedule.clone());
        tracing::info!(schedule_id = %schedule.id, runner_id, cron = %schedule.cron, timezone = %schedule.timezone, "schedule created");
        self.settle(st, false).await?;
        Ok(schedule)
    }

    /// The schedule, if it is `runner_id`'s in `project`.
    pub async fn get_schedule(
        &self,
        project: &str,
        runner_id: &str,
        id: &str,
    ) -> Result<Schedule, SchedulerError> {
        let st = self.state.lock().await;
        owned(&st, project, runner_id, id).cloned()
    }

    pub async fn list_schedules(
        &self,
        project: &str,
        runner_id: &str,
    ) -> Result<Vec<Schedule>, SchedulerError> {
        self.get_runner(project, runner_id).await?;
        let st = self.state.lock().await;
        Ok(st
            .schedules
            .values()
            .filter(|s| s.runner_id == runner_id && s.project == project)
            .cloned()
            .collect())
    }

    pub async fn update_schedule(
        &self,
        project: &str,
        runner_id: &str,
        id: &str,
        input: ScheduleInput,
    ) -> Result<Schedule, SchedulerError> {
        let mut st = self.state.lock().await;
        let next = owned(&st, project, runner_id, id)?.apply(input, now_unix_millis())?;
        st.write(keys::schedule(id), encode(&next), Expect::Any);
        st.schedules.insert(id.to_owned(), next.clone());
        tracing::info!(schedule_id = id, paused = next.paused, "schedule updated");
        self.settle(st, false).await?;
        Ok(next)
    }

    pub async fn delete_schedule(
        &self,
        project: &str,
        runner_id: &str,
        id: &str,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        owned(&st, project, runner_id, id)?;
        st.schedules.remove(id);
        st.delete(keys::schedule(id));
        tracing::info!(schedule_id = id, "schedule deleted");
        self.settle(st, false).await
    }

    /// Fires every schedule that is due at `now` (called by a timer; cheap when none is).
    pub async fn fire_due_schedules(&self, now: i64) -> Result<(), SchedulerError> {
        let due: Vec<(String, String)> = {
            let st = self.state.lock().await;
            st.schedules
                .values()
                .filter(|s| s.due_at().is_some_and(|at| at <= now))
                .map(|s| (s.id.clone(), s.runner_id.clone()))
                .collect()
        };
        for (id, runner_id) in due {
            // The runner is read outside the lock (a store read); a schedule whose runner is
            // gone is deleted with it (`delete_runner`), so this only fails on a store error.
            let runner = match self.load_runner(&runner_id).await {
                Ok((runner, _)) => runner,
                Err(SchedulerError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            self.fire(&id, &runner, now).await?;
        }
        Ok(())
    }

    /// Fires schedule `id` as due at `now`: its runs, its skips and its next fire time, as one
    /// unit of writes.
    async fn fire(&self, id: &str, runner: &Runner, now: i64) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let Some(mut schedule) = st.schedules.get(id).cloned() else {
            return Ok(());
        };
        let Some(spec) = schedule.spec() else {
            return Ok(());
        };
        let (mut fires, mut next) = schedule.fires(&spec, now);
        if fires.is_empty() && next == schedule.next_fire_at {
            return Ok(());
        }
        // One transaction must stay within the store's limits (etcd: 128 operations): at most
        // MAX_FIRES_PER_TXN runs now; the rest are still due and fire on the next tick.
        let mut made = 0;
        if let Some(cut) = fires.iter().position(|f| {
            made += usize::from(matches!(f, Fire::Run(_)));
            made > MAX_FIRES_PER_TXN
        }) {
            fires.truncate(cut);
            if let Some(Fire::Run(last)) = fires.last() {
                next = spec.next_after(*last);
            }
        }
        let image = runner_image_in(&self.config, &st.registries, &runner.spec);
        // Every run a fire may create, made before anything is staged: an error here (the
        // runner's instance type left the catalog) leaves nothing half-staged.
        let overrides = RunOverrides::from_input(schedule.run.clone().unwrap_or_default())?;
        let mut runs = Vec::new();
        for fire in &fires {
            if let Fire::Run(_) = fire {
                runs.push(new_run(&self.config, runner, &image, overrides.clone())?);
            }
        }
        let mut runs = runs.into_iter();
        st.open_unit();
        for fire in fires {
            match fire {
                Fire::Missed(n) => {
                    schedule.skipped += n;
                    schedule.last_skip_reason = Some(format!(
                        "{n} fire(s) missed while the control plane was down (catch_up: {})",
                        catch_up_name(&schedule)
                    ));
                    tracing::warn!(schedule_id = id, missed = n, "schedule fires missed");
                }
                Fire::Run(at) => {
                    let active: Vec<Run> = st
                        .active
                        .values()
                        .filter(|r| r.schedule_id.as_deref() == Some(id))
                        .cloned()
                        .collect();
                    if !active.is_empty() && schedule.overlap == OverlapPolicy::Forbid {
                        schedule.skipped += 1;
                        schedule.last_skip_reason = Some(format!(
                            "overlap forbid: run {} has not ended",
                            active[0].id
                        ));
                        tracing::info!(schedule_id = id, fire_at = at, run_id = %active[0].id, "schedule fire skipped: an earlier run has not ended");
                        continue;
                    }
                    if schedule.overlap == OverlapPolicy::Replace {
                        for run in active {
                            // As a user's stop: canceled while it waits, stopped on its node.
                            tracing::info!(run_id = %run.id, "replaced by its schedule's next fire");
                            if let Err(e) = st.stop(run, now) {
                                tracing::error!(error = %e, "cannot stop a run to replace it");
                            }
                        }
                    }
                    let Some(mut run) = runs.next() else { continue };
                    run.schedule_id = Some(id.to_owned());
                    run.scheduled_for = Some(at);
                    run.trace_parent = None;
                    tracing::info!(schedule_id = id, fire_at = at, run_id = %run.id, "schedule fired");
                    schedule.fired += 1;
                    schedule.last_fire_at = Some(at);
                    schedule.last_run_id = Some(run.id.clone());
                    st.stage_new(run);
                }
            }
        }
        schedule.next_fire_at = next;
        st.write(keys::schedule(id), encode(&schedule), Expect::Any);
        st.schedules.insert(id.to_owned(), schedule);
        st.close_unit();
        self.settle(st, true).await
    }

    /// Deletes the schedules of a deleted runner (staged with its other effects).
    pub(super) fn drop_schedules_of(st: &mut State, runner_id: &str) {
        let ids: Vec<String> = st
            .schedules
            .values()
            .filter(|s| s.runner_id == runner_id)
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            st.schedules.remove(&id);
            st.delete(keys::schedule(&id));
        }
    }
}

fn catch_up_name(s: &Schedule) -> &'static str {
    match s.catch_up {
        berth_core::schedule::CatchUp::Skip => "skip",
        berth_core::schedule::CatchUp::RunOnce => "run_once",
    }
}

fn owned<'a>(
    st: &'a State,
    project: &str,
    runner_id: &str,
    id: &str,
) -> Result<&'a Schedule, SchedulerError> {
    st.schedules
        .get(id)
        .filter(|s| s.runner_id == runner_id && s.project == project)
        .ok_or_else(|| SchedulerError::NotFound {
            kind: "schedule",
            id: id.to_owned(),
        })
}
