//! Runners: their CRUD (runner records are written straight to the store, outside the staged
//! pipeline), and warmup requests, which pick a node and pin the runner's image there.

use super::{committed, decode, encode, new_id, Scheduler};
use crate::error::SchedulerError;
use crate::placement::Demand;
use berth_core::agent::{self, AgentCommand};
use berth_core::model::{Warmup, WarmupStatus};
use berth_core::store::{Expect, Store, Txn};
use berth_core::validate::validate_spec;
use berth_core::{keys, now_unix_millis, EnvVar, Runner, RunnerSpec};

impl<S: Store> Scheduler<S> {
    pub async fn create_runner(
        &self,
        project: &str,
        spec: RunnerSpec,
    ) -> Result<(Runner, u64), SchedulerError> {
        validate_spec(&spec, &self.config.catalog)?;
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
            .store
            .commit(Txn::new().put(keys::runner(&runner.id), encode(&runner), Expect::Absent))
            .await?;
        tracing::info!(runner_id = %runner.id, project, name = %runner.spec.name, "runner created");
        Ok((runner, rev))
    }

    /// The runner, if it exists in `project` (another project's runner is not found: its
    /// existence is not revealed).
    pub async fn get_runner(
        &self,
        project: &str,
        id: &str,
    ) -> Result<(Runner, u64), SchedulerError> {
        let not_found = || SchedulerError::NotFound {
            kind: "runner",
            id: id.to_owned(),
        };
        let key = keys::runner(id);
        let kv = self.store.get(&key).await?.ok_or_else(not_found)?;
        let runner: Runner = decode(&key, &kv.value)?;
        if runner.project != project {
            return Err(not_found());
        }
        Ok((runner, kv.mod_revision))
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
    pub(super) async fn load_runner(&self, id: &str) -> Result<(Runner, u64), SchedulerError> {
        let key = keys::runner(id);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| SchedulerError::NotFound {
                kind: "runner",
                id: id.to_owned(),
            })?;
        Ok((decode(&key, &kv.value)?, kv.mod_revision))
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
        runner.spec = spec;
        runner.updated_at = now_unix_millis();
        let rev = self
            .store
            .commit(Txn::new().put(
                keys::runner(id),
                encode(&runner),
                Expect::Revision(revision),
            ))
            .await?;
        Ok((runner, rev))
    }

    /// Deletes the runner; its runs stay in the store (and running ones finish).
    pub async fn delete_runner(&self, project: &str, id: &str) -> Result<(), SchedulerError> {
        let (_, rev) = self.get_runner(project, id).await?;
        self.store
            .commit(Txn::new().delete(keys::runner(id), Expect::Revision(rev)))
            .await?;
        tracing::info!(runner_id = %id, "runner deleted");
        let done = {
            let mut st = self.state.lock().await;
            self.set_warm_pin(&mut st, id, None);
            self.flush(&mut st)
        };
        committed(done).await
    }

    /// Chooses a node in the runner's region with room for its instance type and asks it to
    /// pull the image. Returns at once; [`Self::warmup_result`] records the outcome.
    pub async fn warmup_runner(
        &self,
        project: &str,
        id: &str,
    ) -> Result<(Runner, u64), SchedulerError> {
        let (mut runner, revision) = self.get_runner(project, id).await?;
        let memory_mib = self
            .config
            .catalog
            .instance_type(&runner.spec.instance_type)
            .map_or(0, |t| t.memory_mib);
        let image = self.runner_image(&runner.spec).await;
        let mut st = self.state.lock().await;
        let registry_auth = runner
            .spec
            .container_registry_id
            .as_ref()
            .and_then(|id| st.registries.get(id).map(|r| r.auth.clone()));
        let demand = Demand {
            run_id: String::new(),
            region: runner.spec.region.clone(),
            memory_mib,
            image: image.clone(),
            warm_pin: None,
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
            },
            Err(why) => Warmup {
                node_id: String::new(),
                image: image.clone(),
                status: WarmupStatus::Failed,
                error: Some(format!("no node to warm up on: {why}")),
            },
        });
        let rev = self
            .store
            .commit(Txn::new().put(
                keys::runner(id),
                encode(&runner),
                Expect::Revision(revision),
            ))
            .await?;
        if let Ok(node_id) = &chosen {
            tracing::info!(runner_id = id, node_id = %node_id, image = %image, "warmup requested");
            let command = AgentCommand::Warmup(agent::Warmup {
                runner_id: id.to_owned(),
                image: image.clone(),
                registry_auth,
            });
            st.send_to(node_id, command);
        }
        let pin = chosen.as_ref().ok().map(|n| (n.as_str(), image.as_str()));
        self.set_warm_pin(&mut st, id, pin);
        let done = self.flush(&mut st);
        drop(st);
        committed(done).await?;
        Ok((runner, rev))
    }
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
