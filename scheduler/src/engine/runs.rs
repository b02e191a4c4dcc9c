//! Runs as the API sees them: creation (one, idempotent, or a batch placed in one pass), reads
//! with their queue position and pull progress, paged listing, and stopping.

use super::{committed, decode, idempotency, new_id, stop, Config, Scheduler};
use crate::error::SchedulerError;
use berth_core::command::EffectiveCommand;
use berth_core::model::{Ephemeral, Timeline};
use berth_core::overrides::{check_batch, RunOverrides};
use berth_core::store::Store;
use berth_core::validate::ValidationErrors;
use berth_core::{keys, now_unix_millis, EnvVar, Run, RunStatus, Runner};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

impl<S: Store> Scheduler<S> {
    pub async fn create_run(
        &self,
        project: &str,
        runner_id: &str,
        overrides: RunOverrides,
    ) -> Result<Run, SchedulerError> {
        Ok(self
            .create_run_with_key(project, runner_id, overrides, None)
            .await?
            .0)
    }

    /// Creates a run. With an idempotency key, a retry (same runner, same key) returns the run
    /// the first call created instead of a new one; the bool says whether it was such a replay.
    /// Keys are scoped per runner, and so per project: the runner is looked up in the caller's
    /// project before any key is, and a replayed run is read in that project too. A key
    /// expires `idempotency_ttl` after its run was created: then it creates a new run.
    pub async fn create_run_with_key(
        &self,
        project: &str,
        runner_id: &str,
        overrides: RunOverrides,
        idempotency_key: Option<&str>,
    ) -> Result<(Run, bool), SchedulerError> {
        self.create_run_with_key_at(
            project,
            runner_id,
            overrides,
            idempotency_key,
            now_unix_millis(),
        )
        .await
    }

    /// [`Scheduler::create_run_with_key`] with key expiry judged at `now` (unix millis).
    pub(super) async fn create_run_with_key_at(
        &self,
        project: &str,
        runner_id: &str,
        overrides: RunOverrides,
        idempotency_key: Option<&str>,
        now: i64,
    ) -> Result<(Run, bool), SchedulerError> {
        let ttl = self.config.idempotency_ttl;
        let (runner, _) = self.get_runner(project, runner_id).await?;
        let hash = idempotency_key.map(|k| hex::encode(Sha256::digest(k.as_bytes())));
        // Whether a stored key is there but expired: the new run's key overwrites it.
        let mut replaces = false;
        if let Some(hash) = &hash {
            // Committed by an earlier process or request.
            if let Some(kv) = self.store.get(&keys::idempotency(runner_id, hash)).await? {
                let run_id = String::from_utf8_lossy(&kv.value).into_owned();
                if !idempotency::expired(&run_id, now, ttl) {
                    return Ok((self.get_run(project, runner_id, &run_id).await?, true));
                }
                replaces = true;
            }
        }
        let overrides = overrides.validate()?;
        let claim;
        let (out, done) = {
            // One lock for the whole creation: the image reference needs the registries.
            let mut st = self.state.lock().await;
            let image =
                super::registries::runner_image_in(&self.config, &st.registries, &runner.spec);
            let mut run = self.new_run(&runner, &image, overrides)?;
            // The claim leaves only in this answer: never in memory's or the store's record.
            claim = run.ephemeral.as_mut().and_then(|pin| pin.claim.take());
            // The run's record, its files, its index entries and its idempotency key apply
            // together, however the operation's writes are split.
            st.open_unit();
            if let Some(hash) = &hash {
                if let Some(first) = st.idempotent_run(runner_id, hash, now, ttl) {
                    st.close_unit();
                    // The first request's run may still be on its way to the store: flushing
                    // nothing waits for everything flushed before (operations commit in order),
                    // so the run is read once it is durable, not answered "not found".
                    let earlier = self.flush(&mut st);
                    drop(st);
                    committed(earlier).await?;
                    return Ok((self.get_run(project, runner_id, &first).await?, true));
                }
                st.stage_idempotency_key(runner_id, hash, &run.id, replaces);
                st.prune_idempotency(now, ttl);
            }
            tracing::info!(run_id = %run.id, runner_id = %runner.id, region = %run.region, "run created");
            let id = run.id.clone();
            st.stage_new(run);
            st.close_unit();
            self.schedule(&mut st)?;
            let out = st
                .active
                .get(&id)
                .map(|r| st.with_queue_position(r.clone()));
            (out, self.flush(&mut st))
        };
        committed(done).await?;
        self.notify();
        match out {
            Some(mut run) => {
                if let Some(pin) = run.ephemeral.as_mut() {
                    pin.claim = claim;
                }
                Ok((run, false))
            }
            None => Err(SchedulerError::Protocol(
                "a new run ended at once".to_owned(),
            )),
        }
    }

    /// One run of `runner` with its (checked) `overrides` applied, ready to queue.
    pub(super) fn new_run(
        &self,
        runner: &Runner,
        image: &str,
        overrides: RunOverrides,
    ) -> Result<Run, SchedulerError> {
        new_run(&self.config, runner, image, overrides)
    }

    /// Creates one run per input in a single operation: all are queued, placed in one pass and
    /// stored in one commit, so they start together. Any invalid input rejects the whole batch
    /// (its errors name `runs[i].field`).
    pub async fn create_runs(
        &self,
        project: &str,
        runner_id: &str,
        items: Vec<RunOverrides>,
    ) -> Result<Vec<Run>, SchedulerError> {
        let (runner, _) = self.get_runner(project, runner_id).await?;
        let checked = check_batch(items, RunOverrides::validate)?;
        let image = self.runner_image(&runner.spec).await;
        let runs = checked
            .into_iter()
            .map(|overrides| self.new_run(&runner, &image, overrides))
            .collect::<Result<Vec<Run>, _>>()?;
        let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
        let (out, done) = {
            let mut st = self.state.lock().await;
            for run in runs {
                st.open_unit();
                st.stage_new(run);
                st.close_unit();
            }
            tracing::info!(runner_id = %runner.id, runs = ids.len(), "batch of runs created");
            self.schedule(&mut st)?;
            let out: Vec<Run> = ids
                .iter()
                .filter_map(|id| st.active.get(id).map(|r| st.with_queue_position(r.clone())))
                .collect();
            (out, self.flush(&mut st))
        };
        committed(done).await?;
        self.notify();
        Ok(out)
    }

    pub(super) async fn load_run(&self, run_id: &str) -> Result<(Run, u64), SchedulerError> {
        let key = keys::run(run_id);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| SchedulerError::NotFound {
                kind: "run",
                id: run_id.to_owned(),
            })?;
        Ok((decode(&key, &kv.value)?, kv.mod_revision))
    }

    /// The run, checked to belong to `runner_id` and `project`, with its queue position while
    /// it waits.
    pub async fn get_run(
        &self,
        project: &str,
        runner_id: &str,
        run_id: &str,
    ) -> Result<Run, SchedulerError> {
        let (run, _) = self.load_run(run_id).await?;
        if run.runner_id != runner_id || run.project != project {
            return Err(SchedulerError::NotFound {
                kind: "run",
                id: run_id.to_owned(),
            });
        }
        let mut run = run;
        if run.next_attempt_id.is_some() {
            run.final_attempt = self.final_attempt(&run).await?.map(Box::new);
        }
        if run.status.is_terminal() {
            run.notification = self.webhook_of(&run.id).await?.map(Box::new);
        }
        if run.status == RunStatus::Pending {
            let run = self.state.lock().await.with_queue_position(run);
            return Ok(self.with_pull_progress(run));
        }
        Ok(run)
    }

    /// Up to `limit` of the runs that have not ended (pending and running, or only those of
    /// `status`), across the runners of `project` (of every project for `None`: an admin), in
    /// `region` if given, created after `after`, oldest first, with their queue positions and
    /// live pending reasons; and the cursor of the next page when there are more. Read from
    /// the active index in memory: it costs the active runs, never the history.
    pub async fn list_active_runs(
        &self,
        project: Option<&str>,
        status: Option<RunStatus>,
        region: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Run>, Option<String>), SchedulerError> {
        let st = self.state.lock().await;
        let mut runs: Vec<Run> = Vec::new();
        let mut next = None;
        // Per region, the last waiting run on the page and its position: the next one's is
        // counted on from there.
        let mut last: HashMap<String, (String, usize)> = HashMap::new();
        let from = after.map_or(std::ops::Bound::Unbounded, |a| {
            std::ops::Bound::Excluded(a.to_owned())
        });
        for run in st
            .active
            .range((from, std::ops::Bound::Unbounded))
            .map(|(_, run)| run)
            .filter(|r| project.is_none_or(|p| r.project == p))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .filter(|r| region.is_none_or(|g| r.region == g))
        {
            if runs.len() == limit {
                next = runs.last().map(|r: &Run| r.id.clone());
                break;
            }
            let from = last.get(&run.region).map(|(id, at)| (id.as_str(), *at));
            let run = st.with_queue_position_from(run.clone(), from);
            if let Some(at) = run.queue_position {
                last.insert(run.region.clone(), (run.id.clone(), at as usize));
            }
            runs.push(run);
        }
        drop(st);
        Ok((
            runs.into_iter()
                .map(|r| self.with_pull_progress(r))
                .collect(),
            next,
        ))
    }

    /// `runs` (one page, in either order) with what [`Scheduler::get_run`] adds to a pending
    /// run — its queue position and live reason, its image pull — under one lock, the
    /// positions counted in one walk per region (`WaitQueue::position_from`).
    async fn waiting_positions(&self, mut runs: Vec<Run>) -> Vec<Run> {
        let mut pending: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].status == RunStatus::Pending)
            .collect();
        if pending.is_empty() {
            return runs;
        }
        pending.sort_by(|&a, &b| runs[a].id.cmp(&runs[b].id));
        let st = self.state.lock().await;
        let mut last: HashMap<String, (String, usize)> = HashMap::new();
        for i in pending {
            let run = runs[i].clone();
            let from = last.get(&run.region).map(|(id, at)| (id.as_str(), *at));
            let run = st.with_queue_position_from(run, from);
            if let Some(at) = run.queue_position {
                last.insert(run.region.clone(), (run.id.clone(), at as usize));
            }
            runs[i] = run;
        }
        drop(st);
        runs.into_iter()
            .map(|r| {
                if r.status == RunStatus::Pending {
                    self.with_pull_progress(r)
                } else {
                    r
                }
            })
            .collect()
    }

    /// Up to `limit` of the runner's runs after `after` (a run id; ids order by creation) in
    /// the listing's order (oldest first, or newest first), and the cursor of the next page
    /// when there are more. It reads one page of the runner's index (a range, forwards or
    /// backwards) and then that page's runs: a page costs its own runs, however many the runner
    /// has.
    pub async fn list_runs(
        &self,
        project: &str,
        runner_id: &str,
        after: Option<&str>,
        limit: usize,
        newest_first: bool,
    ) -> Result<(Vec<Run>, Option<String>), SchedulerError> {
        self.get_runner(project, runner_id).await?;
        // One more than the page: whether there is a next one.
        let want = limit.saturating_add(1);
        let prefix = keys::runner_runs_prefix(runner_id);
        let index = match (after, newest_first) {
            (None, false) => {
                self.store
                    .range(&prefix, &keys::prefix_end(&prefix), want)
                    .await?
            }
            // Just past `after`: the smallest key above it.
            (Some(a), false) => {
                let start = format!("{prefix}{a}\u{0}");
                self.store
                    .range(&start, &keys::prefix_end(&prefix), want)
                    .await?
            }
            (None, true) => {
                self.store
                    .range_rev(&prefix, &keys::prefix_end(&prefix), want)
                    .await?
            }
            (Some(a), true) => {
                self.store
                    .range_rev(&prefix, &format!("{prefix}{a}"), want)
                    .await?
            }
        };
        let ids: Vec<&str> = index
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .collect();
        let more = index.len() == want;
        let mut runs = Vec::with_capacity(ids.len().min(limit));
        let mut last_seen: Option<&str> = None;
        for run_id in ids {
            if runs.len() == limit {
                break;
            }
            last_seen = Some(run_id);
            match self.load_run(run_id).await {
                Ok((run, _)) if run.runner_id == runner_id && run.project == project => {
                    runs.push(run);
                }
                // An index entry whose run is gone is passed over (the page is one shorter).
                Ok(_) | Err(SchedulerError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let runs = self.waiting_positions(runs).await;
        Ok((runs, last_seen.filter(|_| more).map(str::to_owned)))
    }

    /// Pending → canceled at once. Running → asks its agent to stop and waits (bounded by
    /// `stop_wait`) for the exit. A finished run is returned unchanged.
    pub async fn stop_run(
        &self,
        project: &str,
        runner_id: &str,
        run_id: &str,
    ) -> Result<Run, SchedulerError> {
        let current = self.get_run(project, runner_id, run_id).await?;
        if current.status.is_terminal() {
            return Ok(current);
        }
        let mut changes = self.subscribe();
        let (was_pending, done) = {
            let mut st = self.state.lock().await;
            let Some(cached) = st.active.get(run_id).cloned() else {
                drop(st);
                return self.get_run(project, runner_id, run_id).await;
            };
            let was_pending = st.stop(cached, now_unix_millis())?;
            if was_pending {
                self.schedule(&mut st)?;
            }
            (was_pending, self.flush(&mut st))
        };
        committed(done).await?;
        self.notify();
        if was_pending {
            return self.get_run(project, runner_id, run_id).await;
        }
        // A run with a longer grace than the scheduler's default gets that much longer.
        let extra_grace = current
            .stop_grace_seconds
            .unwrap_or(self.config.stop_grace_seconds)
            .saturating_sub(self.config.stop_grace_seconds);
        let deadline = tokio::time::Instant::now()
            + self.config.stop_wait
            + Duration::from_secs(u64::from(extra_grace));
        loop {
            let run = self.get_run(project, runner_id, run_id).await?;
            if run.status.is_terminal() {
                return Ok(run);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.get_run(project, runner_id, run_id).await,
            }
        }
    }
}

/// One run of `runner` with its (checked) `overrides` applied, ready to queue (also the
/// template of a warm sandbox: a run with no overrides).
pub(super) fn new_run(
    config: &Config,
    runner: &Runner,
    image: &str,
    overrides: RunOverrides,
) -> Result<Run, SchedulerError> {
    let itype = config
        .catalog
        .instance_type(&runner.spec.instance_type)
        .ok_or_else(|| {
            ValidationErrors::single(
                "instance_type",
                "the runner's instance type is no longer in the catalog",
            )
        })?;
    let (input, files) = overrides.into_parts();
    let ephemeral = input.ephemeral == Some(true);
    let stop_grace_seconds = input
        .stop_grace_seconds
        .and_then(|g| u32::try_from(g).ok())
        .or(runner.spec.stop_grace_seconds)
        .unwrap_or(config.stop_grace_seconds);
    let effective = EffectiveCommand::resolve(&runner.spec, &input);
    // The run's own policy replaces its runner's whole (`max_attempts: 1`: never retry).
    let retry_policy = input
        .retry_policy
        .clone()
        .or_else(|| runner.spec.retry_policy.clone())
        .filter(|p| p.max_attempts > 1);
    let mut env: Vec<EnvVar> = runner.spec.env_variables.clone();
    for over in input.env_variables.unwrap_or_default() {
        env.retain(|e| e.env_key != over.env_key);
        env.push(over);
    }
    let mut run = Run {
        id: new_id(),
        runner_id: runner.id.clone(),
        project: runner.project.clone(),
        status: RunStatus::Pending,
        exit_code: None,
        command: effective.command,
        argv: effective.argv,
        entrypoint: effective.entrypoint,
        env,
        image: image.to_owned(),
        image_digest: None,
        image_pull: None,
        region: runner.spec.region.clone(),
        instance_type: itype.slug.clone(),
        memory_mib: itype.memory_mib,
        cpu_millis: itype.cpu_millis,
        timeout_seconds: runner.spec.timeout_seconds,
        node_id: None,
        lease_epoch: 0,
        created_at: now_unix_millis(),
        started_at: None,
        completed_at: None,
        error_code: None,
        error_message: None,
        pending_reason: Some("waiting for placement".to_owned()),
        stop_requested: false,
        warm_pin: runner.warm_pin().map(str::to_owned),
        container_registry_id: runner.spec.container_registry_id.clone(),
        oom_killed: false,
        price_nano_usd_per_second: itype.price_nano_usd_per_second(),
        queue_position: None,
        files,
        stop_grace_seconds: Some(stop_grace_seconds),
        timeline: Timeline {
            created: berth_core::now_unix_micros(),
            ..Timeline::default()
        },
        // The calling RPC's span (an API request's trace, when traces are exported).
        trace_parent: berth_core::telemetry::traceparent(),
        attempt: 1,
        first_attempt_id: None,
        previous_attempt_id: None,
        next_attempt_id: None,
        retry_policy,
        not_before: None,
        retry_cause: None,
        schedule_id: None,
        scheduled_for: None,
        final_attempt: None,
        ephemeral: None,
        notification: None,
        isolation: itype.isolation_for(runner.spec.isolation),
        runtime: None,
    };
    if ephemeral {
        pin_to_ephemeral_node(&mut run, config);
    }
    Ok(run)
}

/// Pins a new run to its ephemeral node (see `ephemeral`), with a fresh claim.
fn pin_to_ephemeral_node(run: &mut Run, config: &Config) {
    let (claim, claim_sha256) = berth_core::auth::generate_ephemeral_claim();
    let timeout = i64::try_from(config.ephemeral_connect_timeout.as_millis()).unwrap_or(i64::MAX);
    run.ephemeral = Some(Box::new(Ephemeral {
        node_id: Ephemeral::node_id_for(&run.id),
        claim_sha256,
        connect_by: run.created_at.saturating_add(timeout),
        claim: Some(claim),
    }));
    // No other node may take it, so no retry could run anywhere else either.
    run.retry_policy = None;
    run.warm_pin = None;
    run.pending_reason = Some(super::ephemeral::waiting_reason(run));
}

impl super::State {
    /// Stops `run` (not ended): cancels it at once while it is pending, asks its node to stop it
    /// otherwise (its exit report ends it). Answers whether it was pending.
    pub(super) fn stop(&mut self, mut run: Run, now: i64) -> Result<bool, SchedulerError> {
        let node = run.node_id.clone();
        let was_pending = run.status == RunStatus::Pending;
        if was_pending {
            run.cancel(None, now)?;
            tracing::info!(run_id = %run.id, "pending run canceled");
        } else {
            run.stop_requested = true;
            tracing::info!(run_id = %run.id, "stop requested");
        }
        let run_id = run.id.clone();
        self.stage(run);
        if let Some(node) = node {
            self.send_to(&node, stop(&run_id));
        }
        Ok(was_pending)
    }
}
