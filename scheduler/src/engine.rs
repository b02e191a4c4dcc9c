//! The scheduler's core: the state it owns (the store, the connected nodes, the runs that have
//! not ended) and every operation on it. The gRPC services are thin adapters over this.
//!
//! Every mutation runs under one async lock, but never waits for the disk there: it changes
//! memory, *stages* its store writes and its messages to agents, and submits them
//! ([`Store::submit`] fixes the commit order at that moment), then releases the lock and waits
//! for durability. One dispatcher task awaits the commits in submission order and only then
//! sends the staged messages, so nothing reaches an agent or an API client before it is stored,
//! and messages keep their order. Concurrent operations share fsyncs (group commit in the
//! store). If a commit fails, memory may be ahead of the store: the scheduler stops
//! (fail-stop, [`Scheduler::store_failed`]) and a restart reloads the truth from the store.

use crate::error::SchedulerError;
use crate::placement::{Demand, FitPolicy, FleetIndex, NodeStatus, NodeView};
use berth_core::command::EffectiveCommand;
use berth_core::convert::files_to_spec_pb;
use berth_core::model::{Catalog, ContainerRegistry, LogEntry, LogStream, Warmup, WarmupStatus};
use berth_core::secrets::SecretKey;
use berth_core::store::{Expect, Store, StoreError, Txn};
use berth_core::validate::{validate_spec, RunInput};
use berth_core::validate::{RegistrySpec, ValidationErrors};
use berth_core::{keys, now_unix_millis, EnvVar, Run, RunStatus, Runner, RunnerSpec};
use berth_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

pub type AgentTx = mpsc::UnboundedSender<pb::SchedulerMessage>;

#[derive(Debug, Clone)]
pub struct Config {
    pub heartbeat_interval: Duration,
    /// Registry for image names that do not name one (e.g. `busybox`).
    pub default_registry: String,
    pub stop_grace_seconds: u32,
    /// How long a stop request waits for the agent to confirm the exit.
    pub stop_wait: Duration,
    pub fit_policy: FitPolicy,
    pub catalog: Arc<Catalog>,
    /// A node whose last heartbeat is older than `node_ttl + lost_grace` is declared lost.
    pub node_ttl: Duration,
    pub lost_grace: Duration,
    /// A run that has waited this long gets capacity reserved for it (see `schedule`).
    pub reserve_after: Duration,
    /// Seals registry passwords at rest; without it, private registries cannot be created.
    pub secrets: Option<Arc<SecretKey>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(2),
            default_registry: "docker.io".to_owned(),
            stop_grace_seconds: 2,
            stop_wait: Duration::from_secs(15),
            fit_policy: FitPolicy::BestFit,
            catalog: Arc::new(Catalog::default()),
            node_ttl: Duration::from_secs(6),
            lost_grace: Duration::from_secs(4),
            reserve_after: Duration::from_secs(60),
            secrets: None,
        }
    }
}

pub struct Scheduler<S> {
    store: S,
    config: Config,
    state: Mutex<State>,
    /// Bumped after every stored change to a run or its logs; log watchers wait on it.
    changes: watch::Sender<u64>,
    /// When each node was last heard from (any message). Kept outside `state` so recording it
    /// never waits for the engine: liveness must not depend on how busy the scheduler is.
    liveness: std::sync::Mutex<HashMap<String, Instant>>,
    /// Staged effects of each operation, in flush order (see `dispatch_loop`).
    dispatch: mpsc::UnboundedSender<Dispatch>,
    store_failed: watch::Sender<bool>,
    /// Live image-pull progress per run (memory only; see `images`).
    pulls: std::sync::Mutex<HashMap<String, images::PullEntry>>,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Node>,
    /// The placement view of `nodes`, kept in step: node flags by `sync_node`, leases by `save`.
    index: FleetIndex,
    /// Runs that have not ended, by id (UUIDv7: iteration order is submission order).
    active: BTreeMap<String, Run>,
    /// The ids of the runs waiting for placement (a subset of `active`, kept by `stage`), so
    /// scheduling and queue positions never scan the runs that are already placed.
    queue: BTreeSet<String>,
    /// Store writes staged by the current operation, submitted by `flush`.
    pending: Txn,
    /// Where each key's put sits in `pending`, so a key written twice is stored once.
    pending_at: HashMap<String, usize>,
    /// Messages to agents staged by the current operation, sent once `pending` is durable.
    outgoing: Vec<(AgentTx, pb::SchedulerMessage)>,
    next_connection: u64,
    /// Idempotency keys used since start, (runner id, key hash) → run id: a retry that races the
    /// first request finds it here even before the first one's write is durable.
    idempotency: HashMap<(String, String), String>,
    /// Every private registry with its password unsealed, by id (loaded at start).
    registries: HashMap<String, RegistryEntry>,
    /// Images each node must keep because a runner's warmup put them there.
    warm_pins: images::WarmPins,
}

/// A private registry as the engine keeps it in memory.
struct RegistryEntry {
    project: String,
    auth: pb::RegistryAuth,
}

struct Node {
    id: String,
    region: String,
    boot_id: String,
    total_memory_mib: u64,
    cpus: u32,
    max_runs: u32,
    connected: bool,
    /// Missed heartbeats past TTL + grace; its leases were revoked.
    lost: bool,
    /// An operator asked for no new leases (stored, survives restarts).
    draining: bool,
    /// The agent is shutting down (it refused a run with `node_draining`); cleared when it
    /// registers again.
    shutting_down: bool,
    connection: u64,
    tx: Option<AgentTx>,
    cached_images: Arc<BTreeSet<String>>,
}

impl Node {
    /// Known from the store or from a lease, not (yet) connected since this process started.
    fn placeholder(id: &str, region: &str, draining: bool) -> Node {
        Node {
            id: id.to_owned(),
            region: region.to_owned(),
            boot_id: String::new(),
            total_memory_mib: 0,
            cpus: 0,
            max_runs: 0,
            connected: false,
            lost: false,
            draining,
            shutting_down: false,
            connection: 0,
            tx: None,
            cached_images: Arc::default(),
        }
    }

    fn status(&self) -> NodeStatus {
        if self.lost {
            NodeStatus::Lost
        } else if !self.connected {
            NodeStatus::Disconnected
        } else if self.draining || self.shutting_down {
            NodeStatus::Draining
        } else {
            NodeStatus::Ready
        }
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.id.clone(),
            region: self.region.clone(),
            draining: self.draining,
        }
    }
}

/// What the store keeps about a node: what must survive a scheduler restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    id: String,
    region: String,
    draining: bool,
}

/// A node as `ListNodes` shows it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub view: NodeView,
    pub draining: bool,
    pub cpus: u32,
    pub running_run_ids: Vec<String>,
    pub last_heartbeat_age: Duration,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, SchedulerError> {
    serde_json::from_slice(bytes).map_err(|e| SchedulerError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
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
    /// Loads every run that has not ended; they wait for their nodes to re-register.
    pub async fn open(store: S, config: Config) -> Result<Arc<Self>, SchedulerError> {
        let mut state = State::default();
        for kv in store.list_prefix(keys::RUNS).await? {
            let mut run: Run = decode(&kv.key, &kv.value)?;
            if !run.status.is_terminal() {
                // The node that runs it needs the files' contents (stored beside the record).
                if !run.files.is_empty() {
                    let key = keys::run_files(&run.id);
                    let value = store.get(&key).await?.map(|kv| kv.value);
                    run.restore_file_contents(value.as_deref().unwrap_or_default())
                        .map_err(|e| SchedulerError::Corrupt {
                            key,
                            reason: e.to_string(),
                        })?;
                }
                state.active.insert(run.id.clone(), run);
            }
        }
        for kv in store.list_prefix(keys::REGISTRIES).await? {
            let reg: ContainerRegistry = decode(&kv.key, &kv.value)?;
            let key = config.secrets.as_ref().ok_or_else(|| {
                SchedulerError::Protocol(
                    "the store holds registry secrets but no secret key was given".to_owned(),
                )
            })?;
            let password = key.open(&reg.password_sealed)?;
            state.registries.insert(
                reg.id.clone(),
                RegistryEntry {
                    project: reg.project,
                    auth: pb::RegistryAuth {
                        host: reg.host,
                        username: reg.username,
                        password,
                    },
                },
            );
        }
        for kv in store.list_prefix(keys::NODES).await? {
            let rec: NodeRecord = decode(&kv.key, &kv.value)?;
            state.nodes.insert(
                rec.id.clone(),
                Node::placeholder(&rec.id, &rec.region, rec.draining),
            );
        }
        // Nodes holding leases must come back within TTL + grace, or they are declared lost.
        for c in state.active.values() {
            if let Some(node) = c.node_id.as_deref() {
                if !state.nodes.contains_key(node) {
                    let placeholder = Node::placeholder(node, &c.region, false);
                    state.nodes.insert(node.to_owned(), placeholder);
                }
            }
        }
        state.warm_pins = Self::load_warm_pins(&store).await?;
        state.queue = state
            .active
            .values()
            .filter(|r| is_queued(r))
            .map(|r| r.id.clone())
            .collect();
        let ids: Vec<String> = state.nodes.keys().cloned().collect();
        for id in &ids {
            state.sync_node(id);
        }
        let leases: Vec<(String, u64)> = state
            .active
            .values()
            .filter_map(|c| Some((c.node_id.clone()?, c.memory_mib)))
            .collect();
        for (node, memory_mib) in leases {
            state.index_lease(Some(&node), None, memory_mib);
        }
        tracing::info!(
            active_runs = state.active.len(),
            known_nodes = state.nodes.len(),
            "scheduler state loaded"
        );
        let (changes, _) = watch::channel(0);
        // Nodes known at start get a full TTL + grace to come back.
        let started = Instant::now();
        let liveness = state.nodes.keys().map(|id| (id.clone(), started)).collect();
        let (dispatch, queue) = mpsc::unbounded_channel();
        let (store_failed, _) = watch::channel(false);
        tokio::spawn(dispatch_loop(queue, store_failed.clone()));
        Ok(Arc::new(Scheduler {
            store,
            config,
            state: Mutex::new(state),
            changes,
            liveness: std::sync::Mutex::new(liveness),
            dispatch,
            store_failed,
            pulls: std::sync::Mutex::default(),
        }))
    }

    /// Records that `node_id` was heard from at `at`: every message renews all its leases.
    pub fn touch(&self, node_id: &str, at: Instant) {
        let mut live = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let seen = live.entry(node_id.to_owned()).or_insert(at);
        if at > *seen {
            *seen = at;
        }
    }

    fn last_seen(&self, node_id: &str) -> Option<Instant> {
        let live = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        live.get(node_id).copied()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    #[cfg(test)]
    async fn assert_index_consistent(&self) {
        self.state.lock().await.assert_index_consistent();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    // ---- runners -------------------------------------------------------------------------

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
    async fn load_runner(&self, id: &str) -> Result<(Runner, u64), SchedulerError> {
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

    async fn all_runners(&self) -> Result<Vec<(Runner, u64)>, SchedulerError> {
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

    // ---- runs ----------------------------------------------------------------------------

    pub async fn create_run(
        &self,
        project: &str,
        runner_id: &str,
        input: RunInput,
    ) -> Result<Run, SchedulerError> {
        Ok(self
            .create_run_with_key(project, runner_id, input, None)
            .await?
            .0)
    }

    /// Creates a run. With an idempotency key, a retry (same runner, same key) returns the run
    /// the first call created instead of a new one; the bool says whether it was such a replay.
    /// Keys are scoped per runner, and so per project: the runner is looked up in the caller's
    /// project before any key is, and a replayed run is read in that project too.
    pub async fn create_run_with_key(
        &self,
        project: &str,
        runner_id: &str,
        input: RunInput,
        idempotency_key: Option<&str>,
    ) -> Result<(Run, bool), SchedulerError> {
        let (runner, _) = self.get_runner(project, runner_id).await?;
        let hash = idempotency_key.map(|k| hex::encode(Sha256::digest(k.as_bytes())));
        if let Some(hash) = &hash {
            // Committed by an earlier process or request.
            if let Some(kv) = self.store.get(&keys::idempotency(runner_id, hash)).await? {
                let run_id = String::from_utf8_lossy(&kv.value).into_owned();
                return Ok((self.get_run(project, runner_id, &run_id).await?, true));
            }
        }
        let input = input.validate()?;
        let image = self.runner_image(&runner.spec).await;
        let run = self.new_run(&runner, &image, input)?;
        let (out, done) = {
            let mut st = self.state.lock().await;
            if let Some(hash) = &hash {
                let first = st
                    .idempotency
                    .get(&(runner_id.to_owned(), hash.clone()))
                    .cloned();
                if let Some(first) = first {
                    drop(st);
                    return Ok((self.get_run(project, runner_id, &first).await?, true));
                }
                st.idempotency
                    .insert((runner_id.to_owned(), hash.clone()), run.id.clone());
                st.write(
                    keys::idempotency(runner_id, hash),
                    run.id.clone().into_bytes(),
                    Expect::Absent,
                );
            }
            st.write(keys::run(&run.id), encode(&run), Expect::Absent);
            st.write_file_contents(&run);
            st.write(
                keys::runner_run(&runner.id, &run.id),
                vec![],
                Expect::Absent,
            );
            tracing::info!(run_id = %run.id, runner_id = %runner.id, region = %run.region, "run created");
            let id = run.id.clone();
            st.stage(run);
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
            Some(run) => Ok((run, false)),
            None => Err(SchedulerError::Protocol(
                "a new run ended at once".to_owned(),
            )),
        }
    }

    /// One run of `runner` with `input`'s overrides applied, ready to queue.
    fn new_run(
        &self,
        runner: &Runner,
        image: &str,
        input: RunInput,
    ) -> Result<Run, SchedulerError> {
        let itype = self
            .config
            .catalog
            .instance_type(&runner.spec.instance_type)
            .ok_or_else(|| {
                ValidationErrors::single(
                    "instance_type",
                    "the runner's instance type is no longer in the catalog",
                )
            })?;
        let files = input.decoded_files()?;
        let stop_grace_seconds = input
            .stop_grace_seconds
            .and_then(|g| u32::try_from(g).ok())
            .or(runner.spec.stop_grace_seconds)
            .unwrap_or(self.config.stop_grace_seconds);
        let effective = EffectiveCommand::resolve(&runner.spec, &input);
        let mut env: Vec<EnvVar> = runner.spec.env_variables.clone();
        for over in input.env_variables.unwrap_or_default() {
            env.retain(|e| e.env_key != over.env_key);
            env.push(over);
        }
        Ok(Run {
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
        })
    }

    /// Creates one run per input in a single operation: all are queued, placed in one pass and
    /// stored in one commit, so they start together. Any invalid input rejects the whole batch
    /// (its errors name `runs[i].field`).
    pub async fn create_runs(
        &self,
        project: &str,
        runner_id: &str,
        inputs: Vec<RunInput>,
    ) -> Result<Vec<Run>, SchedulerError> {
        let (runner, _) = self.get_runner(project, runner_id).await?;
        let checked = berth_core::validate::validate_batch(inputs)?;
        let image = self.runner_image(&runner.spec).await;
        let runs = checked
            .into_iter()
            .map(|input| self.new_run(&runner, &image, input))
            .collect::<Result<Vec<Run>, _>>()?;
        let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
        let (out, done) = {
            let mut st = self.state.lock().await;
            for run in runs {
                st.write(keys::run(&run.id), encode(&run), Expect::Absent);
                st.write_file_contents(&run);
                st.write(
                    keys::runner_run(&runner.id, &run.id),
                    vec![],
                    Expect::Absent,
                );
                st.stage(run);
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

    async fn load_run(&self, run_id: &str) -> Result<(Run, u64), SchedulerError> {
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
        if run.status == RunStatus::Pending {
            let run = self.state.lock().await.with_queue_position(run);
            return Ok(self.with_pull_progress(run));
        }
        Ok(run)
    }

    /// Up to `limit` of the runner's runs created after `after` (a run id; ids order by
    /// creation), oldest first, and the cursor of the next page when there are more. Only the
    /// index keys are read before the page is chosen, so a page costs its own runs.
    pub async fn list_runs(
        &self,
        project: &str,
        runner_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Run>, Option<String>), SchedulerError> {
        self.get_runner(project, runner_id).await?;
        let index = self
            .store
            .list_prefix(&keys::runner_runs_prefix(runner_id))
            .await?;
        let ids: Vec<&str> = index
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        let mut runs = Vec::with_capacity(ids.len().min(limit));
        let mut next = None;
        for run_id in ids {
            if runs.len() == limit {
                next = runs.last().map(|r: &Run| r.id.clone());
                break;
            }
            match self.get_run(project, runner_id, run_id).await {
                Ok(run) => runs.push(run),
                Err(SchedulerError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((runs, next))
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
            let Some(cached) = st.active.get(run_id) else {
                drop(st);
                return self.get_run(project, runner_id, run_id).await;
            };
            let mut run = cached.clone();
            let node = run.node_id.clone();
            let was_pending = run.status == RunStatus::Pending;
            if was_pending {
                run.cancel(None, now_unix_millis())?;
                tracing::info!(run_id, "pending run canceled");
            } else {
                run.stop_requested = true;
                tracing::info!(run_id, "stop requested");
            }
            st.stage(run);
            if let Some(node) = node {
                st.send_to(&node, stop_msg(run_id));
            }
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

    // ---- metering ------------------------------------------------------------------------

    /// Billed usage of `project`'s runs that ended in `[from, to)` (unix millis), grouped by
    /// `group`.
    pub async fn usage(
        &self,
        project: &str,
        from: i64,
        to: i64,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, SchedulerError> {
        let mut rows: BTreeMap<String, UsageRow> = BTreeMap::new();
        for kv in self.store.list_prefix(keys::RUNS).await? {
            let run: Run = decode(&kv.key, &kv.value)?;
            if run.project != project {
                continue;
            }
            let (Some(completed), Some(seconds), Some(cost)) = (
                run.completed_at,
                run.duration_seconds(),
                run.cost_nano_usd(),
            ) else {
                continue;
            };
            if completed < from || completed >= to {
                continue;
            }
            let key = match group {
                UsageGroup::Runner => run.runner_id.clone(),
                UsageGroup::InstanceType => run.instance_type.clone(),
                UsageGroup::Day => utc_day(completed),
            };
            let row = rows.entry(key.clone()).or_insert_with(|| UsageRow {
                key,
                ..UsageRow::default()
            });
            row.runs += 1;
            row.billed_seconds += seconds;
            row.cost_nano_usd += cost;
        }
        Ok(rows.into_values().collect())
    }

    // ---- container registries ----------------------------------------------------------

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
        let reg = ContainerRegistry {
            id: new_id(),
            project: project.to_owned(),
            name: spec.name,
            host: spec.host,
            username: spec.username,
            password_sealed: key.seal(&spec.password),
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
                auth: pb::RegistryAuth {
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
    async fn check_registry(&self, project: &str, spec: &RunnerSpec) -> Result<(), SchedulerError> {
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
    async fn runner_image(&self, spec: &RunnerSpec) -> String {
        let host = match &spec.container_registry_id {
            Some(id) => self
                .state
                .lock()
                .await
                .registries
                .get(id)
                .map(|r| r.auth.host.clone()),
            None => None,
        };
        let registry = host.as_deref().unwrap_or(&self.config.default_registry);
        image_reference(registry, &spec.image_name, &spec.image_tag)
    }

    // ---- logs ----------------------------------------------------------------------------

    /// Lines after `after_id`, oldest first, at most `limit`; and whether more follow. The run
    /// must be `runner_id`'s and in `project`.
    pub async fn list_logs(
        &self,
        project: &str,
        runner_id: &str,
        run_id: &str,
        after_id: u64,
        limit: usize,
    ) -> Result<(Vec<LogEntry>, bool), SchedulerError> {
        let (run, _) = self.load_run(run_id).await?;
        if run.runner_id != runner_id || run.project != project {
            return Err(SchedulerError::NotFound {
                kind: "run",
                id: run_id.to_owned(),
            });
        }
        let start = keys::log(run_id, after_id.saturating_add(1));
        let end = keys::prefix_end(&keys::logs_prefix(run_id));
        let mut kvs = self
            .store
            .range(&start, &end, limit.saturating_add(1))
            .await?;
        let has_more = kvs.len() > limit;
        kvs.truncate(limit);
        let logs = kvs
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect::<Result<Vec<LogEntry>, _>>()?;
        Ok((logs, has_more))
    }

    // ---- nodes ---------------------------------------------------------------------------

    pub async fn list_nodes(&self) -> Vec<NodeInfo> {
        let st = self.state.lock().await;
        let mut views: Vec<NodeView> = st.index.nodes().cloned().collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
            .into_iter()
            .filter_map(|view| {
                let node = st.nodes.get(&view.id)?;
                let running_run_ids = st
                    .active
                    .values()
                    .filter(|c| c.node_id.as_deref() == Some(node.id.as_str()))
                    .map(|c| c.id.clone())
                    .collect();
                Some(NodeInfo {
                    view,
                    draining: node.draining,
                    cpus: node.cpus,
                    running_run_ids,
                    last_heartbeat_age: self
                        .last_seen(&node.id)
                        .map(|t| t.elapsed())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    // ---- agents --------------------------------------------------------------------------

    /// A node (re-)registered on a new stream. Reconciles what it says it is running with what
    /// the scheduler has leased to it, answers `Registered`, and places waiting runs.
    pub async fn attach_node(&self, reg: pb::Register, tx: AgentTx) -> Result<u64, SchedulerError> {
        if reg.node_id.is_empty() || reg.region.is_empty() {
            return Err(SchedulerError::Protocol(
                "register needs node_id and region".to_owned(),
            ));
        }
        let mut st = self.state.lock().await;
        st.next_connection += 1;
        let connection = st.next_connection;
        let previous = st.nodes.remove(&reg.node_id);
        let restarted = previous
            .as_ref()
            .is_some_and(|n| !n.boot_id.is_empty() && n.boot_id != reg.boot_id);
        let draining = previous.as_ref().is_some_and(|n| n.draining);
        let node = Node {
            id: reg.node_id.clone(),
            region: reg.region.clone(),
            boot_id: reg.boot_id.clone(),
            total_memory_mib: reg.total_memory_mib,
            cpus: reg.cpus,
            max_runs: reg.max_concurrent_runs.max(1),
            connected: true,
            lost: false,
            draining,
            shutting_down: false,
            connection,
            tx: Some(tx.clone()),
            cached_images: Arc::new(reg.cached_images.iter().cloned().collect()),
        };
        if previous.as_ref().map(Node::record) != Some(node.record()) {
            let rec = node.record();
            st.write(keys::node(&rec.id), encode(&rec), Expect::Any);
        }
        st.nodes.insert(reg.node_id.clone(), node);
        st.sync_node(&reg.node_id);
        self.touch(&reg.node_id, Instant::now());
        tracing::info!(
            node_id = %reg.node_id, region = %reg.region, boot_id = %reg.boot_id,
            memory_mib = reg.total_memory_mib, active = reg.active_run_ids.len(), restarted,
            "node registered"
        );

        let reported: HashSet<&str> = reg.active_run_ids.iter().map(String::as_str).collect();
        let leased: Vec<(String, RunStatus)> = st
            .active
            .values()
            .filter(|c| c.node_id.as_deref() == Some(reg.node_id.as_str()))
            .map(|c| (c.id.clone(), c.status))
            .collect();
        let now = now_unix_millis();
        for (run_id, status) in &leased {
            if reported.contains(run_id.as_str()) {
                continue;
            }
            let Some(cached) = st.active.get(run_id) else {
                continue;
            };
            let mut run = cached.clone();
            if *status == RunStatus::Pending {
                run.requeue(&format!(
                    "node {} restarted before starting it",
                    reg.node_id
                ))?;
                tracing::warn!(run_id = %run_id, node_id = %reg.node_id, "re-queued: node does not know the run");
            } else {
                run.fail(
                    "node_restarted",
                    &format!(
                        "the agent on node {} restarted and lost the run",
                        reg.node_id
                    ),
                    now,
                )?;
                tracing::warn!(run_id = %run_id, node_id = %reg.node_id, "failed: node lost the run");
            }
            st.stage(run);
        }
        let leased_ids: HashSet<&str> = leased.iter().map(|(id, _)| id.as_str()).collect();
        let stale_run_ids: Vec<String> = reg
            .active_run_ids
            .iter()
            .filter(|id| !leased_ids.contains(id.as_str()))
            .cloned()
            .collect();
        let _ = tx.send(pb::SchedulerMessage {
            body: Some(pb::scheduler_message::Body::Registered(pb::Registered {
                heartbeat_interval_seconds: u32::try_from(self.config.heartbeat_interval.as_secs())
                    .unwrap_or(2)
                    .max(1),
                stale_run_ids,
            })),
        });
        let _ = tx.send(images::warm_pins_msg(&st, &reg.node_id));
        // Stops asked for while the node was away.
        for c in st.active.values() {
            if c.stop_requested && c.node_id.as_deref() == Some(reg.node_id.as_str()) {
                let _ = tx.send(stop_msg(&c.id));
            }
        }
        self.settle(st, true).await?;
        Ok(connection)
    }

    /// The node's stream ended. Its runs keep their leases until it comes back.
    pub async fn detach_node(&self, node_id: &str, connection: u64) {
        let mut st = self.state.lock().await;
        if let Some(node) = st.nodes.get_mut(node_id) {
            if node.connection == connection {
                node.connected = false;
                node.tx = None;
                tracing::warn!(node_id, "node disconnected");
                st.sync_node(node_id);
            }
        }
    }

    /// Renews every lease the node holds. Runs it reports running that are no longer leased to
    /// it (its leases were revoked while it was silent, or the run ended) are fenced: StopRun.
    pub async fn heartbeat(&self, node_id: &str, hb: pb::Heartbeat) {
        let mut st = self.state.lock().await;
        let Some(node) = st.nodes.get_mut(node_id) else {
            return;
        };
        self.touch(node_id, Instant::now());
        let was_lost = node.lost;
        if node.lost {
            node.lost = false;
            tracing::warn!(
                node_id,
                "lost node is heartbeating again; fencing its old runs"
            );
        }
        if node.cached_images.len() != hb.cached_images.len()
            || !hb
                .cached_images
                .iter()
                .all(|i| node.cached_images.contains(i))
        {
            node.cached_images = Arc::new(hb.cached_images.into_iter().collect());
        }
        st.sync_node(node_id);
        for run_id in &hb.running_run_ids {
            let leased = st
                .active
                .get(run_id)
                .is_some_and(|c| c.node_id.as_deref() == Some(node_id));
            if !leased {
                tracing::warn!(node_id, run_id = %run_id, "node runs a run it holds no lease for; stopping it");
                st.send_to(node_id, stop_msg(run_id));
            }
        }
        if was_lost {
            if let Err(e) = self.schedule(&mut st) {
                tracing::error!(error = %e, "scheduling after a node came back failed");
            }
        }
        let done = self.flush(&mut st);
        drop(st);
        if let Err(e) = committed(done).await {
            tracing::error!(node_id, error = %e, "heartbeat effects not stored");
        }
    }

    /// Declares lost every node silent for longer than TTL + grace, and takes its leases back:
    /// runs that had not started are queued again, runs that had started end `failed` with
    /// `node_lost`. Called periodically; `now` is a parameter so tests control the clock.
    pub async fn expire_nodes(&self, now: Instant) -> Result<(), SchedulerError> {
        let limit = self.config.node_ttl + self.config.lost_grace;
        let mut st = self.state.lock().await;
        let expired: Vec<String> = st
            .nodes
            .values()
            .filter(|n| {
                let seen = self.last_seen(&n.id).unwrap_or(now);
                !n.lost && now.saturating_duration_since(seen) > limit
            })
            .map(|n| n.id.clone())
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        let at = now_unix_millis();
        for node_id in &expired {
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.lost = true;
            }
            st.sync_node(node_id);
            tracing::warn!(node_id = %node_id, silent_for = ?limit, "node lost");
            let leased: Vec<Run> = st
                .active
                .values()
                .filter(|c| c.node_id.as_deref() == Some(node_id.as_str()))
                .cloned()
                .collect();
            for mut run in leased {
                if run.status == RunStatus::Pending {
                    run.requeue(&format!(
                        "node {node_id} was lost before it started the run"
                    ))?;
                } else {
                    run.fail(
                        "node_lost",
                        &format!(
                            "node {node_id} stopped sending heartbeats while the run was running"
                        ),
                        at,
                    )?;
                }
                tracing::warn!(run_id = %run.id, node_id = %node_id, status = %run.status, "lease revoked");
                st.stage(run);
            }
        }
        self.settle(st, true).await
    }

    /// Drain (no new leases; running runs finish) or resume a node.
    pub async fn set_draining(
        &self,
        node_id: &str,
        draining: bool,
    ) -> Result<NodeInfo, SchedulerError> {
        let done = {
            let mut st = self.state.lock().await;
            let node = st
                .nodes
                .get_mut(node_id)
                .ok_or_else(|| SchedulerError::NotFound {
                    kind: "node",
                    id: node_id.to_owned(),
                })?;
            node.draining = draining;
            let rec = node.record();
            st.sync_node(node_id);
            st.write(keys::node(node_id), encode(&rec), Expect::Any);
            tracing::info!(node_id, draining, "node admin state changed");
            if !draining {
                self.schedule(&mut st)?;
            }
            self.flush(&mut st)
        };
        committed(done).await?;
        self.notify();
        self.list_nodes()
            .await
            .into_iter()
            .find(|n| n.view.id == node_id)
            .ok_or_else(|| SchedulerError::NotFound {
                kind: "node",
                id: node_id.to_owned(),
            })
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
            let msg = pb::SchedulerMessage {
                body: Some(pb::scheduler_message::Body::Warmup(pb::Warmup {
                    runner_id: id.to_owned(),
                    image: image.clone(),
                    registry_auth,
                })),
            };
            st.send_to(node_id, msg);
        }
        let pin = chosen.as_ref().ok().map(|n| (n.as_str(), image.as_str()));
        self.set_warm_pin(&mut st, id, pin);
        let done = self.flush(&mut st);
        drop(st);
        committed(done).await?;
        Ok((runner, rev))
    }

    /// A node finished (or failed) pulling a runner's image.
    pub async fn warmup_result(
        &self,
        node_id: &str,
        msg: pb::WarmupResult,
    ) -> Result<(), SchedulerError> {
        for _ in 0..5 {
            let (mut runner, revision) = match self.load_runner(&msg.runner_id).await {
                Ok(found) => found,
                Err(SchedulerError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            let Some(w) = runner
                .warmup
                .as_mut()
                .filter(|w| w.node_id == node_id && w.image == msg.image)
            else {
                return Ok(()); // a newer warmup replaced this one
            };
            if msg.ok {
                w.status = WarmupStatus::Ready;
                w.error = None;
                runner.warmed_at = Some(now_unix_millis());
            } else {
                w.status = WarmupStatus::Failed;
                w.error = Some(format!("image_pull_failed: {}", msg.error_message));
            }
            let put = Txn::new().put(
                keys::runner(&runner.id),
                encode(&runner),
                Expect::Revision(revision),
            );
            match self.store.commit(put).await {
                Ok(_) => {
                    tracing::info!(runner_id = %runner.id, node_id, ok = msg.ok, "warmup finished");
                    return Ok(());
                }
                Err(berth_core::store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SchedulerError::Stale(format!("runner {}", msg.runner_id)))
    }

    pub async fn run_started(
        &self,
        node_id: &str,
        msg: pb::RunStarted,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let current = st.leased(&msg.run_id, node_id, msg.lease_epoch);
        let Some(mut run) = current else {
            // Ended, canceled or re-placed meanwhile: fence the stale lease.
            tracing::warn!(run_id = %msg.run_id, node_id, lease_epoch = msg.lease_epoch, "stale start report; stopping it");
            st.send_to(node_id, stop_msg(&msg.run_id));
            let done = self.flush(&mut st);
            drop(st);
            return committed(done).await;
        };
        if run.status != RunStatus::Pending {
            return Ok(()); // a re-sent report
        }
        self.take_pull_for_start(&mut run);
        let at = nanos_to_millis(msg.started_at_unix_nanos);
        let digest = (!msg.image_digest.is_empty()).then_some(msg.image_digest);
        run.start(at, digest)?;
        tracing::info!(run_id = %run.id, node_id, "run started");
        st.stage(run);
        self.settle(st, false).await
    }

    pub async fn run_exited(
        &self,
        node_id: &str,
        msg: pb::RunExited,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let current = st.leased(&msg.run_id, node_id, msg.lease_epoch);
        let Some(mut run) = current else {
            tracing::debug!(run_id = %msg.run_id, node_id, "exit report for a run that already ended");
            return Ok(());
        };
        self.forget_pull(&run.id);
        let at = if msg.exited_at_unix_nanos > 0 {
            nanos_to_millis(msg.exited_at_unix_nanos)
        } else {
            now_unix_millis()
        };
        let reason = pb::ExitReason::try_from(msg.reason).unwrap_or(pb::ExitReason::Unspecified);
        if reason == pb::ExitReason::StartFailed
            && msg.error_code == NODE_DRAINING
            && !run.stop_requested
        {
            // The agent is shutting down and refused the run: place it elsewhere.
            run.requeue(&format!("node {node_id} is shutting down"))?;
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.shutting_down = true;
            }
            st.sync_node(node_id);
            tracing::info!(run_id = %run.id, node_id, "re-queued: the node is shutting down");
            st.stage(run);
            return self.settle(st, true).await;
        }
        let code = (msg.exit_code >= 0).then_some(msg.exit_code);
        if run.status == RunStatus::Pending && reason != pb::ExitReason::StartFailed {
            run.start(at, None)?;
        }
        match reason {
            pb::ExitReason::StartFailed if run.stop_requested => run.cancel(None, at)?,
            pb::ExitReason::StartFailed | pb::ExitReason::Unspecified => {
                let code_name = if msg.error_code.is_empty() {
                    "start_failed"
                } else {
                    &msg.error_code
                };
                run.fail(code_name, &msg.error_message, at)?
            }
            pb::ExitReason::Stopped => run.cancel(code, at)?,
            pb::ExitReason::Timeout => {
                run.exit(124, at)?;
                run.error_code = Some("timeout".to_owned());
                run.error_message = Some(format!(
                    "the run exceeded its timeout of {} seconds",
                    run.timeout_seconds
                ));
            }
            pb::ExitReason::Exited => run.exit(msg.exit_code, at)?,
        }
        if msg.oom_killed {
            run.oom_killed = true;
            run.error_code = Some("oom_killed".to_owned());
            run.error_message = Some(format!(
                "the run exceeded its memory limit of {} MiB and was killed",
                run.memory_mib
            ));
        }
        tracing::info!(run_id = %run.id, node_id, status = %run.status, exit_code = ?run.exit_code, "run ended");
        st.stage(run);
        self.settle(st, true).await
    }

    pub async fn append_logs(
        &self,
        node_id: &str,
        batch: pb::LogBatch,
    ) -> Result<(), SchedulerError> {
        if batch.lines.is_empty() {
            return Ok(());
        }
        let owned = {
            let st = self.state.lock().await;
            st.active
                .get(&batch.run_id)
                .map(|c| c.node_id.as_deref() == Some(node_id))
        };
        let owned = match owned {
            Some(owned) => owned,
            // Ended already: accept late re-sends from the node that ran it.
            None => match self.load_run(&batch.run_id).await {
                Ok((run, _)) => run.node_id.as_deref() == Some(node_id),
                Err(SchedulerError::NotFound { .. }) => false,
                Err(e) => return Err(e),
            },
        };
        if !owned {
            tracing::warn!(run_id = %batch.run_id, node_id, "dropping logs for a run this node does not hold");
            return Ok(());
        }
        let secrets = self.secret_values(&batch.run_id).await;
        let mut txn = Txn::new();
        for mut line in batch.lines {
            if line.seq == 0 {
                continue;
            }
            for secret in &secrets {
                if line.msg.contains(secret.as_str()) {
                    line.msg = line.msg.replace(secret.as_str(), REDACTED);
                }
            }
            let stream = match pb::LogStream::try_from(line.stream) {
                Ok(pb::LogStream::Stderr) => LogStream::Stderr,
                _ => LogStream::Stdout,
            };
            let entry = LogEntry {
                id: line.seq,
                stream,
                msg: line.msg,
                ts_unix_nanos: line.ts_unix_nanos,
            };
            // Keyed by sequence number: a re-sent line overwrites itself.
            txn = txn.put(
                keys::log(&batch.run_id, line.seq),
                encode(&entry),
                Expect::Any,
            );
        }
        self.store.commit(txn).await?;
        self.notify();
        Ok(())
    }

    /// The values of the run's secret variables worth redacting (see `REDACT_MIN_LEN`).
    async fn secret_values(&self, run_id: &str) -> Vec<String> {
        let st = self.state.lock().await;
        let Some(run) = st.active.get(run_id) else {
            return Vec::new();
        };
        let mut values: Vec<String> = run
            .env
            .iter()
            .filter(|e| e.secret && e.env_val.chars().count() >= REDACT_MIN_LEN)
            .map(|e| e.env_val.clone())
            .collect();
        // Longest first, so a secret containing another is redacted whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values
    }

    // ---- internals -----------------------------------------------------------------------

    /// Ends an operation: places waiting runs (if `schedule`), submits what it staged, releases
    /// the lock, waits until it is durable and its messages are sent, and wakes watchers.
    async fn settle(
        &self,
        mut st: tokio::sync::MutexGuard<'_, State>,
        schedule: bool,
    ) -> Result<(), SchedulerError> {
        if schedule {
            self.schedule(&mut st)?;
        }
        let done = self.flush(&mut st);
        drop(st);
        committed(done).await?;
        self.notify();
        Ok(())
    }

    /// Submits what the current operation staged. The write's place in the commit order, and
    /// its messages' place in the send order, are fixed now (under the state lock); the
    /// returned receiver resolves once the write is durable and the messages are sent.
    fn flush(&self, st: &mut State) -> oneshot::Receiver<Result<(), SchedulerError>> {
        let txn = std::mem::take(&mut st.pending);
        st.pending_at.clear();
        let messages = std::mem::take(&mut st.outgoing);
        let commit = (!txn.is_empty()).then(|| Box::pin(self.store.submit(txn)) as CommitFuture);
        let (done, receiver) = oneshot::channel();
        if self
            .dispatch
            .send(Dispatch {
                commit,
                messages,
                done,
            })
            .is_err()
        {
            tracing::error!("the dispatcher has stopped");
        }
        receiver
    }

    /// Resolves once the store has failed: the process must stop (fail-stop) and restart from
    /// the store, since memory may be ahead of it.
    pub async fn store_failed(&self) {
        let mut failed = self.store_failed.subscribe();
        let _ = failed.wait_for(|f| *f).await;
    }

    /// Places every waiting run that fits, in submission order; a run that does not fit does
    /// not block later, smaller ones (backfill). Runs that stay say why.
    ///
    /// Starvation guard: when the oldest waiting run of a region that does not fit has waited
    /// `reserve_after`, the ready node in its region closest to fitting it (large enough in
    /// total, most free memory) is reserved for it for this pass: younger runs may not take that
    /// node, so its capacity drains towards the old run while the rest of the region keeps
    /// serving small runs. The choice is made again on every pass.
    fn schedule(&self, st: &mut State) -> Result<(), SchedulerError> {
        let waiting: Vec<String> = st.queue.iter().cloned().collect();
        if waiting.is_empty() {
            return Ok(());
        }
        // Reservations live for this pass only; clear them whatever happens.
        let mut held: Vec<String> = Vec::new();
        let placed = self.place_waiting(st, waiting, &mut held);
        for node in held {
            let _ = st.index.set_reserved_for(&node, None);
        }
        placed
    }

    fn place_waiting(
        &self,
        st: &mut State,
        waiting: Vec<String>,
        held: &mut Vec<String>,
    ) -> Result<(), SchedulerError> {
        let now = now_unix_millis();
        let reserve_after =
            i64::try_from(self.config.reserve_after.as_millis()).unwrap_or(i64::MAX);
        let mut regions_checked: HashSet<String> = HashSet::new();
        for run_id in waiting {
            let Some(cached) = st.active.get(&run_id) else {
                continue;
            };
            let mut run = cached.clone();
            let demand = Demand {
                run_id: run.id.clone(),
                region: run.region.clone(),
                memory_mib: run.memory_mib,
                image: run.image.clone(),
                warm_pin: run.warm_pin.clone(),
            };
            let chosen = st
                .index
                .place(&demand, self.config.fit_policy)
                .map(|n| n.id.clone());
            match chosen {
                Ok(node_id) => {
                    let epoch = run.assign(&node_id)?;
                    let spec = self.run_spec(st, &run);
                    // `save` records the lease in the index.
                    st.stage(run);
                    tracing::info!(run_id = %run_id, node_id = %node_id, lease_epoch = epoch, "run assigned");
                    st.send_to(
                        &node_id,
                        pb::SchedulerMessage {
                            body: Some(pb::scheduler_message::Body::AssignRun(pb::AssignRun {
                                run_id: run_id.clone(),
                                lease_epoch: epoch,
                                spec: Some(spec),
                            })),
                        },
                    );
                }
                Err(why) => {
                    let mut reason = why.to_string();
                    let oldest_in_region = regions_checked.insert(run.region.clone());
                    if oldest_in_region && now.saturating_sub(run.created_at) >= reserve_after {
                        if let Some(node) = reserve_for(&mut st.index, &demand) {
                            reason.push_str(&format!("; node {node} is reserved for this run"));
                            held.push(node);
                        }
                    }
                    if run.pending_reason.as_deref() != Some(reason.as_str()) {
                        tracing::info!(run_id = %run_id, reason = %reason, "run waits");
                        run.pending_reason = Some(reason);
                        st.stage(run);
                    }
                }
            }
        }
        Ok(())
    }

    fn run_spec(&self, st: &State, run: &Run) -> pb::RunSpec {
        let effective = EffectiveCommand {
            command: run.command.clone(),
            argv: run.argv.clone(),
            entrypoint: run.entrypoint.clone(),
        };
        let entrypoint = effective.entrypoint_words();
        let cmd = effective.cmd();
        pb::RunSpec {
            image: run.image.clone(),
            entrypoint_set: entrypoint.is_some(),
            entrypoint: entrypoint.unwrap_or_default(),
            cmd_set: cmd.is_some(),
            cmd: cmd.unwrap_or_default(),
            env: run
                .env
                .iter()
                .map(|e| (e.env_key.clone(), e.env_val.clone()))
                .collect::<HashMap<_, _>>(),
            timeout_seconds: run.timeout_seconds,
            memory_mib: run.memory_mib,
            cpu_millis: run.cpu_millis,
            stop_grace_seconds: run
                .stop_grace_seconds
                .unwrap_or(self.config.stop_grace_seconds),
            registry_auth: run
                .container_registry_id
                .as_ref()
                .and_then(|id| st.registries.get(id).map(|r| r.auth.clone())),
            files: files_to_spec_pb(&run.files),
        }
    }
}

/// Reserves the ready node of `demand`'s region that is closest to fitting it; returns its id.
fn reserve_for(index: &mut FleetIndex, demand: &Demand) -> Option<String> {
    let node = index
        .nodes()
        .filter(|v| {
            v.region == demand.region
                && v.status == NodeStatus::Ready
                && v.reserved_for.is_none()
                && v.total_memory_mib >= demand.memory_mib
                && v.max_runs > 0
        })
        .max_by(|a, b| {
            a.free_memory_mib()
                .cmp(&b.free_memory_mib())
                .then_with(|| b.id.cmp(&a.id))
        })?
        .id
        .clone();
    index
        .set_reserved_for(&node, Some(demand.run_id.clone()))
        .ok()?;
    Some(node)
}

impl State {
    /// Fills in `queue_position` for a run waiting to be placed: its 1-based place among the
    /// waiting runs of its region, oldest first.
    fn with_queue_position(&self, mut run: Run) -> Run {
        run.queue_position = None;
        if is_queued(&run) {
            let ahead = self
                .queue
                .range::<String, _>(..run.id.clone())
                .filter(|id| self.active.get(*id).is_some_and(|r| r.region == run.region))
                .count();
            run.queue_position = u32::try_from(ahead + 1).ok();
        }
        run
    }

    /// The run if it is still leased to `node_id` under `lease_epoch`.
    fn leased(&self, run_id: &str, node_id: &str, lease_epoch: u64) -> Option<Run> {
        self.active
            .get(run_id)
            .filter(|c| c.node_id.as_deref() == Some(node_id) && c.lease_epoch == lease_epoch)
            .cloned()
    }

    /// Stages `run`'s new state: memory (the run cache and the index's leases) now, the store
    /// write with the operation's flush.
    fn stage(&mut self, run: Run) {
        let before = self.active.get(&run.id).and_then(|r| r.node_id.clone());
        let after = (!run.status.is_terminal())
            .then(|| run.node_id.clone())
            .flatten();
        if before != after {
            self.index_lease(after.as_deref(), before.as_deref(), run.memory_mib);
        }
        // The engine is the only writer of run records: no precondition needed.
        self.write(keys::run(&run.id), encode(&run), Expect::Any);
        if run.status.is_terminal() && !run.files.is_empty() {
            // No node needs the files any more: their contents go, their digests stay in the
            // record. (Deleting an absent key is no error, so a run staged twice is fine.)
            self.delete(keys::run_files(&run.id));
        }
        if is_queued(&run) {
            self.queue.insert(run.id.clone());
        } else {
            self.queue.remove(&run.id);
        }
        if run.status.is_terminal() {
            self.active.remove(&run.id);
        } else {
            self.active.insert(run.id.clone(), run);
        }
    }

    /// Stages the contents of a new run's files, stored once beside its record.
    fn write_file_contents(&mut self, run: &Run) {
        if let Some(value) = run.file_contents_value() {
            self.write(keys::run_files(&run.id), value, Expect::Absent);
        }
    }

    /// Stages the removal of `key` with the operation's flush, after any write of it staged
    /// earlier in the same operation.
    fn delete(&mut self, key: String) {
        self.pending_at.remove(&key);
        self.pending = std::mem::take(&mut self.pending).delete(key, Expect::Any);
    }

    /// Stages a store write for the operation's flush.
    /// A key staged again replaces its earlier put's value (one write per key and
    /// operation) and keeps that put's precondition: the store checks every precondition
    /// against the state before the transaction, so the first one is the one that matters.
    fn write(&mut self, key: String, value: Vec<u8>, expect: Expect) {
        if let Some(&at) = self.pending_at.get(&key) {
            if let Some(berth_core::store::Op::Put { value: v, .. }) = self.pending.ops.get_mut(at)
            {
                *v = value;
                return;
            }
        }
        self.pending_at.insert(key.clone(), self.pending.ops.len());
        self.pending = std::mem::take(&mut self.pending).put(key, value, expect);
    }

    /// Stages a message to a connected node, sent once the operation's writes are durable. A
    /// disconnected node learns what it must on re-register instead.
    fn send_to(&mut self, node_id: &str, msg: pb::SchedulerMessage) {
        if let Some(tx) = self.nodes.get(node_id).and_then(|n| n.tx.clone()) {
            self.outgoing.push((tx, msg));
        }
    }

    /// The index's lease totals equal what the active runs add up to (test invariant).
    #[cfg(test)]
    fn assert_index_consistent(&self) {
        let mut held: HashMap<&str, (u64, u32)> = HashMap::new();
        for c in self.active.values() {
            if let Some(node) = c.node_id.as_deref() {
                let e = held.entry(node).or_default();
                e.0 += c.memory_mib;
                e.1 += 1;
            }
        }
        let queued: BTreeSet<String> = self
            .active
            .values()
            .filter(|r| is_queued(r))
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(
            self.queue, queued,
            "the queue holds exactly the waiting runs"
        );
        for n in self.nodes.values() {
            let v = self.index.get(&n.id).expect("every node is indexed");
            let want = held.get(n.id.as_str()).copied().unwrap_or_default();
            assert_eq!(
                (v.reserved_memory_mib, v.runs),
                want,
                "index leases of {}",
                n.id
            );
            assert_eq!(v.status, n.status(), "index status of {}", n.id);
        }
    }

    /// Brings the index's view of `node_id` in line with its flags and report, keeping the
    /// memory and slots its leases hold.
    fn sync_node(&mut self, node_id: &str) {
        let Some(n) = self.nodes.get(node_id) else {
            return;
        };
        let (reserved_memory_mib, runs) = self
            .index
            .get(node_id)
            .map_or((0, 0), |v| (v.reserved_memory_mib, v.runs));
        self.index.upsert(NodeView {
            id: n.id.clone(),
            region: n.region.clone(),
            status: n.status(),
            total_memory_mib: n.total_memory_mib,
            reserved_memory_mib,
            max_runs: n.max_runs,
            runs,
            cached_images: n.cached_images.clone(),
            reserved_for: None,
        });
    }

    /// Moves one run's lease (its memory and slot) from node `from` to node `to` in the index.
    fn index_lease(&mut self, to: Option<&str>, from: Option<&str>, memory_mib: u64) {
        if let Some(from) = from {
            if let Err(e) = self.index.release(from, memory_mib) {
                tracing::error!(error = %e, "lease released on a node the index does not know");
            }
        }
        if let Some(to) = to {
            if let Err(e) = self.index.reserve(to, memory_mib) {
                tracing::error!(error = %e, "lease taken on a node the index does not know");
            }
        }
    }
}

fn stop_msg(run_id: &str) -> pb::SchedulerMessage {
    pb::SchedulerMessage {
        body: Some(pb::scheduler_message::Body::StopRun(pb::StopRun {
            run_id: run_id.to_owned(),
        })),
    }
}

type CommitFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, StoreError>> + Send>>;

/// One operation's staged effects, in flush order.
struct Dispatch {
    commit: Option<CommitFuture>,
    messages: Vec<(AgentTx, pb::SchedulerMessage)>,
    done: oneshot::Sender<Result<(), SchedulerError>>,
}

/// Awaits each operation's commit in flush order, then sends its messages. Commits complete in
/// submission order anyway, so waiting in order costs nothing and keeps messages in order.
async fn dispatch_loop(mut queue: mpsc::UnboundedReceiver<Dispatch>, failed: watch::Sender<bool>) {
    while let Some(d) = queue.recv().await {
        if *failed.borrow() {
            let _ = d.done.send(Err(store_down()));
            continue;
        }
        if let Some(commit) = d.commit {
            if let Err(e) = commit.await {
                tracing::error!(error = %e, "store commit failed; the scheduler must restart");
                failed.send_replace(true);
                let _ = d.done.send(Err(SchedulerError::Store(e)));
                continue;
            }
        }
        for (tx, msg) in d.messages {
            // A closed stream: the node learns what it must on re-register.
            let _ = tx.send(msg);
        }
        let _ = d.done.send(Ok(()));
    }
}

/// Waiting for placement: pending, on no node, and not being stopped.
fn is_queued(run: &Run) -> bool {
    run.status == RunStatus::Pending && run.node_id.is_none() && !run.stop_requested
}

fn store_down() -> SchedulerError {
    SchedulerError::Store(StoreError::Backend(
        "an earlier store write failed; the scheduler is stopping".to_owned(),
    ))
}

/// Waits for a flushed operation to be durable.
async fn committed(
    done: oneshot::Receiver<Result<(), SchedulerError>>,
) -> Result<(), SchedulerError> {
    done.await.unwrap_or_else(|_| Err(store_down()))
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Runner,
    InstanceType,
    Day,
}

impl UsageGroup {
    pub fn parse(s: &str) -> Option<UsageGroup> {
        match s {
            "runner" => Some(UsageGroup::Runner),
            "instance_type" => Some(UsageGroup::InstanceType),
            "day" => Some(UsageGroup::Day),
            _ => None,
        }
    }
}

/// One group of billed usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub key: String,
    pub runs: u64,
    pub billed_seconds: u64,
    pub cost_nano_usd: u64,
}

/// `YYYY-MM-DD` (UTC) of a unix-millis instant (civil-from-days, proleptic Gregorian).
fn utc_day(millis: i64) -> String {
    let days = millis.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The error code an agent that is shutting down gives a run it refuses.
pub const NODE_DRAINING: &str = "node_draining";

/// What a secret value is replaced with in stored log lines.
pub const REDACTED: &str = "[redacted]";
/// Shorter secret values are not redacted (redacting every `a` would garble the logs and still
/// leak nothing a 3-character secret protects).
pub const REDACT_MIN_LEN: usize = 4;

/// A PATCH sends the runner's variables back; secret values come back blank (the API never
/// shows them), which means "keep the stored value".
fn keep_secret_values(next: &mut [EnvVar], current: &[EnvVar]) {
    for var in next.iter_mut().filter(|v| v.secret && v.env_val.is_empty()) {
        if let Some(old) = current
            .iter()
            .find(|c| c.secret && c.env_key == var.env_key)
        {
            var.env_val = old.env_val.clone();
        }
    }
}

fn nanos_to_millis(n: i64) -> i64 {
    if n > 0 {
        n / 1_000_000
    } else {
        now_unix_millis()
    }
}

mod api_keys;
mod images;
#[cfg(test)]
mod tests;
