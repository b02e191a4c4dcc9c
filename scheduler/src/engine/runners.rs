//! Runners: their CRUD (runner records are written straight to the store, outside the staged
//! pipeline), and warmup requests, which pick a node and pin the runner's image there.

use super::images::{restore_pin, take_pin, Pin};
use super::runner_cache::Cached;
use super::{committed, decode, encode, new_id, Scheduler, State};
use crate::error::SchedulerError;
use crate::placement::Demand;
use berth_core::agent::{self, AgentCommand};
use berth_core::model::{Warmup, WarmupStatus};
use berth_core::store::{Expect, Store, Txn};
use berth_core::validate::{validate_spec, ValidationErrors};
use berth_core::{keys, now_unix_millis, EnvVar, Isolation, Runner, RunnerSpec};

/// Most ready sandboxes one warmup may ask a node to keep for a runner.
pub const MAX_WARM_SANDBOXES: u32 = 16;

impl<S: Store> Scheduler<S> {
    /// How the runs of a runner with `spec` are isolated: its choice, or the sandbox when its
    /// instance type forces it.
    pub(super) fn isolation_of(&self, spec: &RunnerSpec) -> Isolation {
        self.config
            .catalog
            .instance_type(&spec.instance_type)
            .map_or(spec.isolation, |t| t.isolation_for(spec.isolation))
    }

    pub async fn create_runner(
        &self,
        project: &str,
        spec: RunnerSpec,
    ) -> Result<(Runner, u64), SchedulerError> {
        validate_spec(&spec, &self.config.catalog)?;
        if spec.notify.as_ref().is_some_and(|n| n.secret.is_empty()) {
            return Err(
                ValidationErrors::single("notify_secret", "is required with notify_url").into(),
            );
        }
        self.check_registry(project, &spec).await?;
        let now = now_unix_millis();
        let runner = Runner {
            id: new_id(),
            project: project.to_owned(),
            spec,
            warmed_at: None,
            created_at: now,
            updated_at: now,
            warmup: None,
        };
        let rev = self
            .commit_runner(
                &runner.id,
                Some(&runner),
                Txn::new().put(keys::runner(&runner.id), encode(&runner), Expect::Absent),
            )
            .await?;
        tracing::info!(runner_id = %runner.id, project, name = %runner.spec.name, "runner created");
        let mut st = self.state.lock().await;
        if let Some(cap) = runner.spec.max_concurrent_runs {
            st.set_cap(&runner.id, Some(cap), rev);
        }
        st.set_notify(&runner.id, runner.spec.notify.clone(), rev);
        drop(st);
        Ok((runner, rev))
    }

    /// The runner, if it exists in `project` (another project's runner is not found: its
    /// existence is not revealed).
    pub async fn get_runner(
        &self,
        project: &str,
        id: &str,
    ) -> Result<(Runner, u64), SchedulerError> {
        let (runner, revision) = self.load_runner(id).await?;
        if runner.project != project {
            return Err(SchedulerError::NotFound {
                kind: "runner",
                id: id.to_owned(),
            });
        }
        Ok((runner, revision))
    }

    pub async fn list_runners(&self, project: &str) -> Result<Vec<(Runner, u64)>, SchedulerError> {
        Ok(self
            .all_runners()
            .await?
            .into_iter()
            .filter(|(r, _)| r.project == project)
            .collect())
    }

    /// A runner whatever its project (for agents' reports, which name runners by id).
    /// From this term's cache when it knows the runner (see `runner_cache`), else the store.
    pub(super) async fn load_runner(&self, id: &str) -> Result<(Runner, u64), SchedulerError> {
        let not_found = || SchedulerError::NotFound {
            kind: "runner",
            id: id.to_owned(),
        };
        match self.runners.get(id) {
            Cached::Found(runner, revision) => return Ok((Runner::clone(&runner), revision)),
            Cached::Deleted => return Err(not_found()),
            Cached::Unknown => {}
        }
        let generation = self.runners.generation();
        let key = keys::runner(id);
        let kv = self.store.get(&key).await?.ok_or_else(not_found)?;
        let runner: Runner = decode(&key, &kv.value)?;
        self.runners.fill(generation, &runner, kv.mod_revision);
        Ok((runner, kv.mod_revision))
    }

    /// Commits `txn`, a write of runner `id` (`runner`: its new record, None: its deletion),
    /// and tells the cache: what was committed, or, when the write failed, that what it holds
    /// of the runner may be stale (a conflict means the store has another version).
    async fn commit_runner(
        &self,
        id: &str,
        runner: Option<&Runner>,
        txn: Txn,
    ) -> Result<u64, berth_core::store::StoreError> {
        let committed = self.store.commit(txn).await;
        match &committed {
            Ok(revision) => self.runners.wrote(id, runner, *revision),
            Err(_) => self.runners.forget(id),
        }
        committed
    }

    /// Applies `change` to runner `id` and stores it, revision-checked: a runner changed
    /// meanwhile is read again and `change` applied anew, at most 5 times (then `Stale`).
    /// `change` answers whether there is anything to write. Ok(false): nothing written (no
    /// such runner, or `change` declined).
    pub(super) async fn change_runner(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Runner) -> bool,
    ) -> Result<bool, SchedulerError> {
        for _ in 0..5 {
            let (mut runner, revision) = match self.load_runner(id).await {
                Ok(found) => found,
                Err(SchedulerError::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            if !change(&mut runner) {
                return Ok(false);
            }
            let put = Txn::new().put(
                keys::runner(id),
                encode(&runner),
                Expect::Revision(revision),
            );
            match self.commit_runner(id, Some(&runner), put).await {
                Ok(_) => return Ok(true),
                Err(berth_core::store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SchedulerError::Stale(format!("runner {id}")))
    }

    pub(super) async fn all_runners(&self) -> Result<Vec<(Runner, u64)>, SchedulerError> {
        let kvs = self.store.list_prefix(keys::RUNNERS).await?;
        kvs.into_iter()
            .map(|kv| Ok((decode(&kv.key, &kv.value)?, kv.mod_revision)))
            .collect()
    }

    pub async fn update_runner(
        &self,
        project: &str,
        id: &str,
        spec: RunnerSpec,
        revision: u64,
    ) -> Result<(Runner, u64), SchedulerError> {
        let (mut runner, _) = self.get_runner(project, id).await?;
        validate_spec(&spec, &self.config.catalog)?;
        self.check_registry(project, &spec).await?;
        let mut spec = spec;
        keep_secret_values(&mut spec.env_variables, &runner.spec.env_variables);
        if let Some(n) = spec.notify.as_mut().filter(|n| n.secret.is_empty()) {
            // Write-only: an update that did not give it keeps the stored one.
            match &runner.spec.notify {
                Some(stored) => n.secret.clone_from(&stored.secret),
                None => {
                    return Err(ValidationErrors::single(
                        "notify_secret",
                        "is required with notify_url",
                    )
                    .into())
                }
            }
        }
        runner.spec = spec;
        runner.updated_at = now_unix_millis();
        let memory_mib = self
            .config
            .catalog
            .instance_type(&runner.spec.instance_type)
            .map_or(0, |t| t.memory_mib);
        let sandboxed = self.isolation_of(&runner.spec) == Isolation::Sandbox;
        if let Some(w) = runner.warmup.as_mut().filter(|w| w.sandboxes > 0) {
            let st = self.state.lock().await;
            // A runner that became sandboxed keeps no ready containers on a node without gVisor.
            let can_run = !sandboxed || st.index.get(&w.node_id).is_some_and(|n| n.sandbox);
            let kept = if can_run {
                sandboxes_that_fit(&st, &w.node_id, id, memory_mib, w.sandboxes)
            } else {
                0
            };
            if kept < w.sandboxes {
                tracing::warn!(
                    runner_id = id,
                    node_id = %w.node_id,
                    asked = w.sandboxes,
                    kept,
                    memory_mib,
                    "the runner's sandboxes no longer fit its warm node; keeping fewer"
                );
                w.sandboxes = kept;
            }
        }
        let rev = self
            .commit_runner(
                id,
                Some(&runner),
                Txn::new().put(
                    keys::runner(id),
                    encode(&runner),
                    Expect::Revision(revision),
                ),
            )
            .await?;
        let mut st = self.state.lock().await;
        st.set_notify(id, runner.spec.notify.clone(), rev);
        if st.set_cap(id, runner.spec.max_concurrent_runs, rev) {
            // A raised or removed cap lets waiting runs of the runner out now.
            self.settle(st, true).await?;
        } else {
            drop(st);
        }
        self.refresh_sandboxes(&runner).await?;
        Ok((runner, rev))
    }

    /// A changed runner's ready sandboxes follow it: the node gets the new spec, replaces the
    /// sandboxes made for the old one (a run never starts in one whose spec differs from its
    /// own, see the agent's `run/sandboxes.rs`), and the memory held follows the instance type.
    async fn refresh_sandboxes(&self, runner: &Runner) -> Result<(), SchedulerError> {
        let image = self.runner_image(&runner.spec).await;
        let done = {
            let mut st = self.state.lock().await;
            let node = st
                .warm_pins
                .iter()
                .find(|(_, pins)| pins.get(&runner.id).is_some_and(|p| p.sandboxes.is_some()))
                .map(|(node, _)| node.clone());
            let (Some(node), Some(w)) = (node, runner.warmup.as_ref()) else {
                return Ok(());
            };
            let pin = Pin::of(&self.config, runner, w, &image);
            self.set_warm_pin(&mut st, &runner.id, Some((&node, pin)));
            self.flush(&mut st)
        };
        committed(done).await
    }

    /// Deletes the runner; its runs stay in the store (and running ones finish).
    pub async fn delete_runner(&self, project: &str, id: &str) -> Result<(), SchedulerError> {
        let (_, rev) = self.get_runner(project, id).await?;
        self.commit_runner(
            id,
            None,
            Txn::new().delete(keys::runner(id), Expect::Revision(rev)),
        )
        .await?;
        tracing::info!(runner_id = %id, "runner deleted");
        let mut st = self.state.lock().await;
        self.set_warm_pin(&mut st, id, None);
        // Its waiting runs are no longer held back by its cap; its schedules go with it.
        st.forget_cap(id);
        st.set_notify(id, None, u64::MAX);
        Self::drop_schedules_of(&mut st, id);
        self.settle(st, true).await
    }

    /// Chooses a node in the runner's region with room for its instance type and asks it to
    /// pull the image. Returns at once; [`Self::warmup_result`] records the outcome.
    pub async fn warmup_runner(
        &self,
        project: &str,
        id: &str,
        sandboxes: u32,
    ) -> Result<(Runner, u64), SchedulerError> {
        if sandboxes > MAX_WARM_SANDBOXES {
            return Err(ValidationErrors::single(
                "sandboxes",
                format!("at most {MAX_WARM_SANDBOXES} ready sandboxes per runner"),
            )
            .into());
        }
        let (mut runner, revision) = self.get_runner(project, id).await?;
        let memory_mib = self
            .config
            .catalog
            .instance_type(&runner.spec.instance_type)
            .map_or(0, |t| t.memory_mib);
        let isolation = self.isolation_of(&runner.spec);
        let image = self.runner_image(&runner.spec).await;
        let mut st = self.state.lock().await;
        // The node is chosen without the runner's current pin: its sandboxes' memory is not
        // needed twice (it comes back if the warmup cannot be stored). The node hears only the
        // final set, so sandboxes that stay are not torn down and made again.
        let previous = take_pin(&mut st, id);
        let registry_auth = runner
            .spec
            .container_registry_id
            .as_ref()
            .and_then(|id| st.registries.get(id).map(|r| r.auth.clone()));
        let demand = Demand {
            run_id: String::new(),
            region: runner.spec.region.clone(),
            // Room for every sandbox asked for and one run beside them: sandboxes that left no
            // room for the runner's own runs there would defeat themselves.
            memory_mib: memory_mib.saturating_mul(u64::from(sandboxes) + 1),
            image: image.clone(),
            warm_pin: None,
            sandbox: isolation == Isolation::Sandbox,
        };
        let chosen = st
            .index
            .place(&demand, self.config.fit_policy)
            .map(|n| n.id.clone());
        runner.warmup = Some(match &chosen {
            Ok(node_id) => Warmup {
                node_id: node_id.clone(),
                image: image.clone(),
                status: WarmupStatus::Pending,
                error: None,
                sandboxes,
            },
            Err(why) => Warmup {
                node_id: String::new(),
                image: image.clone(),
                status: WarmupStatus::Failed,
                error: Some(format!("no node to warm up on: {why}")),
                sandboxes: 0,
            },
        });
        let stored = self
            .commit_runner(
                id,
                Some(&runner),
                Txn::new().put(
                    keys::runner(id),
                    encode(&runner),
                    Expect::Revision(revision),
                ),
            )
            .await;
        let rev = match stored {
            Ok(rev) => rev,
            Err(e) => {
                if let Some((node, pin)) = previous {
                    restore_pin(&mut st, id, node, pin);
                }
                return Err(e.into());
            }
        };
        if let Ok(node_id) = &chosen {
            tracing::info!(runner_id = id, node_id = %node_id, image = %image, "warmup requested");
            let command = AgentCommand::Warmup(agent::Warmup {
                runner_id: id.to_owned(),
                image: image.clone(),
                registry_auth,
            });
            st.send_to(node_id, command);
        }
        let pin = match (&chosen, &runner.warmup) {
            (Ok(node), Some(w)) => Some((node.as_str(), Pin::of(&self.config, &runner, w, &image))),
            _ => None,
        };
        let old_node = previous.map(|(node, _)| node);
        self.set_warm_pin_telling(&mut st, id, pin, old_node.as_deref());
        let done = self.flush(&mut st);
        drop(st);
        committed(done).await?;
        Ok((runner, rev))
    }
}

/// A PATCH may give the runner a larger instance type: its sandboxes would then hold more
/// memory on their node than the warmup found room for. How many of `asked` the node can keep
/// beside its other pins' sandboxes and one run of the runner (the warmup's rule, against the
/// node's total memory: runs come and go, and a PATCH must not drop sandboxes because of a
/// passing burst). The runner's record keeps that count, so a restart holds the same.
fn sandboxes_that_fit(
    st: &State,
    node_id: &str,
    runner_id: &str,
    memory_mib: u64,
    asked: u32,
) -> u32 {
    let Some(view) = st.index.get(node_id) else {
        return asked;
    };
    let others: u64 = st.warm_pins.get(node_id).map_or(0, |pins| {
        pins.iter()
            .filter(|(id, _)| id.as_str() != runner_id)
            .map(|(_, p)| p.sandbox_memory_mib())
            .sum()
    });
    let room = view.total_memory_mib.saturating_sub(others) / memory_mib.max(1);
    u32::try_from(room.saturating_sub(1)).map_or(asked, |fit| fit.min(asked))
}

/// A PATCH sends the runner's variables back; secret values come back blank (the API never
/// shows them), which means "keep the stored value".
pub(super) fn keep_secret_values(next: &mut [EnvVar], current: &[EnvVar]) {
    for var in next.iter_mut().filter(|v| v.secret && v.env_val.is_empty()) {
        if let Some(old) = current
            .iter()
            .find(|c| c.secret && c.env_key == var.env_key)
        {
            var.env_val = old.env_val.clone();
        }
    }
}
