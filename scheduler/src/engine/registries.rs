//! Private container registries: created with a sealed password, kept unsealed in memory for
//! the nodes that pull from them, and the image references runners resolve against them.

use super::{decode, encode, new_id, Scheduler};
use crate::error::SchedulerError;
use berth_core::agent::RegistryAuth;
use berth_core::model::ContainerRegistry;
use berth_core::store::{Expect, Store, Txn};
use berth_core::validate::{RegistrySpec, ValidationErrors};
use berth_core::{keys, now_unix_millis, RunnerSpec};

/// A private registry as the engine keeps it in memory.
pub(super) struct RegistryEntry {
    pub(super) project: String,
    pub(super) auth: RegistryAuth,
}

/// `busybox` + `latest` → `<default registry>/busybox:latest`; names with a host stay as they are.
pub fn image_reference(default_registry: &str, name: &str, tag: &str) -> String {
    let has_host = name.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    });
    let repo = if has_host {
        name.to_owned()
    } else if default_registry == "docker.io" && !name.contains('/') {
        format!("docker.io/library/{name}")
    } else {
        format!("{default_registry}/{name}")
    };
    if tag.starts_with("sha256:") {
        format!("{repo}@{tag}")
    } else {
        format!("{repo}:{tag}")
    }
}

impl<S: Store> Scheduler<S> {
    pub async fn create_registry(
        &self,
        project: &str,
        spec: RegistrySpec,
    ) -> Result<ContainerRegistry, SchedulerError> {
        let key = self.config.secrets.as_ref().ok_or_else(|| {
            ValidationErrors::single(
                "password",
                "this scheduler has no secret key to seal passwords with",
            )
        })?;
        let id = new_id();
        let reg = ContainerRegistry {
            // Bound to its record: a sealed password copied into another registry won't open.
            password_sealed: key.seal(&keys::registry(&id), spec.password.as_bytes())?,
            id,
            project: project.to_owned(),
            name: spec.name,
            host: spec.host,
            username: spec.username,
            created_at: now_unix_millis(),
        };
        let mut st = self.state.lock().await;
        self.store
            .commit(Txn::new().put(keys::registry(&reg.id), encode(&reg), Expect::Absent))
            .await?;
        st.registries.insert(
            reg.id.clone(),
            RegistryEntry {
                project: reg.project.clone(),
                auth: RegistryAuth {
                    host: reg.host.clone(),
                    username: reg.username.clone(),
                    password: spec.password,
                },
            },
        );
        tracing::info!(registry_id = %reg.id, host = %reg.host, "container registry created");
        Ok(reg)
    }

    pub async fn list_registries(
        &self,
        project: &str,
    ) -> Result<Vec<ContainerRegistry>, SchedulerError> {
        let kvs = self.store.list_prefix(keys::REGISTRIES).await?;
        let all = kvs
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect::<Result<Vec<ContainerRegistry>, _>>()?;
        Ok(all.into_iter().filter(|r| r.project == project).collect())
    }

    pub async fn get_registry(
        &self,
        project: &str,
        id: &str,
    ) -> Result<ContainerRegistry, SchedulerError> {
        let not_found = || SchedulerError::NotFound {
            kind: "container registry",
            id: id.to_owned(),
        };
        let key = keys::registry(id);
        let kv = self.store.get(&key).await?.ok_or_else(not_found)?;
        let reg: ContainerRegistry = decode(&key, &kv.value)?;
        if reg.project != project {
            return Err(not_found());
        }
        Ok(reg)
    }

    /// Deletes a registry no runner names.
    pub async fn delete_registry(&self, project: &str, id: &str) -> Result<(), SchedulerError> {
        self.get_registry(project, id).await?;
        let users: Vec<String> = self
            .all_runners()
            .await?
            .into_iter()
            .filter(|(r, _)| r.spec.container_registry_id.as_deref() == Some(id))
            .map(|(r, _)| r.id)
            .collect();
        if !users.is_empty() {
            return Err(SchedulerError::InUse(format!(
                "container registry {id} is used by runners {}",
                users.join(", ")
            )));
        }
        let mut st = self.state.lock().await;
        self.store
            .commit(Txn::new().delete(keys::registry(id), Expect::Any))
            .await?;
        st.registries.remove(id);
        tracing::info!(registry_id = id, "container registry deleted");
        Ok(())
    }

    /// A runner may name only a registry of its own project.
    pub(super) async fn check_registry(
        &self,
        project: &str,
        spec: &RunnerSpec,
    ) -> Result<(), SchedulerError> {
        if let Some(id) = &spec.container_registry_id {
            let st = self.state.lock().await;
            if st.registries.get(id).is_none_or(|r| r.project != project) {
                return Err(ValidationErrors::single(
                    "container_registry_id",
                    "no such container registry",
                )
                .into());
            }
        }
        Ok(())
    }

    /// The full image reference of a runner: its registry's host when it names one.
    pub(super) async fn runner_image(&self, spec: &RunnerSpec) -> String {
        let st = self.state.lock().await;
        runner_image_in(&self.config, &st.registries, spec)
    }
}

/// The full image reference of `spec`'s runs: its registry's host (from `registries`) or the
/// default registry, its image name and tag.
pub(super) fn runner_image_in(
    config: &super::Config,
    registries: &std::collections::HashMap<String, RegistryEntry>,
    spec: &RunnerSpec,
) -> String {
    let host = spec
        .container_registry_id
        .as_ref()
        .and_then(|id| registries.get(id))
        .map(|r| r.auth.host.as_str());
    let registry = host.unwrap_or(&config.default_registry);
    image_reference(registry, &spec.image_name, &spec.image_tag)
}
