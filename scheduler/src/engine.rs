//! The scheduler's core: the state it owns (the store, the connected nodes, the runs that have
//! not ended) and every operation on it. The gRPC services are thin adapters over this; the
//! engine itself speaks only domain types (agents' reports and commands are
//! [`berth_core::agent`] types, agents are reached through an [`AgentLink`]).
//!
//! # Layout
//! This file is the core: [`Config`], [`Scheduler`] and its `State`, loading the state from the
//! store ([`Scheduler::open`]), and the staging pipeline every operation ends with (`stage`,
//! `write`, `send_to`, then `flush`/`settle` and the dispatcher, below). Each concern adds its
//! operations in a child module, as further `impl Scheduler` blocks:
//! - `active`: the store's index of runs that have not ended, kept by `stage` and read by
//!   `open` (which builds it once for a store that predates it).
//! - `idempotency`: when an idempotency key expires, and the sweep that deletes expired ones.
//! - `runners`: runner CRUD and warmup requests; `runner_cache`: the runners this term read or
//!   wrote, so creating a run does not read its runner from the store.
//! - `runs`: creating (idempotent, batched), reading, listing and stopping runs.
//! - `logs`: storing reported log lines (redacted, once each, in expiring compressed chunks)
//!   and reading them back a page at a time.
//! - `queue`: placing waiting runs (backfill, starvation guard), the spec a node receives,
//!   queue positions.
//! - `nodes`: registration and its lease reconciliation, liveness and expiry, draining, the
//!   node list.
//! - `delivery`: the error that ended a node's last agent session, for its view, and since when
//!   its sessions keep failing (a node that cannot deliver is declared lost).
//! - `reports`: what agents report once registered: heartbeats, run starts and exits, logs,
//!   warmup results.
//! - `images`: pull progress (memory only) and warm pins.
//! - `registries`: private container registries and image references.
//! - `usage`: billed usage.
//! - `api_keys`: API keys.
//! - `caps`: per-runner concurrency caps (`max_concurrent_runs`): the runs holding each
//!   runner's slots, kept by `stage`.
//! - `retries`: retry policies: the next attempt staged with the end of the one before,
//!   backoffs and the timer that places due ones.
//! - `schedules`: schedules' CRUD and their fires (one transaction per fire).
//! - `ephemeral`: runs pinned to a one-shot node (`berthctl run --here`): the node's claim,
//!   their placement on it alone, their end when it never comes or is lost, its removal.
//! - `identity`: registration tokens, node credentials, revoking a node.
//! - `removal`: removing a node from the fleet, by an operator or by the node itself (`Leave`).
//! - `webhooks`: run-ended notifications: staged with the end, the pending ones, attempts.
//!
//! # Staging
//! Every mutation runs under one async lock, but never waits for the disk there: it changes
//! memory, *stages* its store writes and its commands to agents, and submits them
//! ([`Store::submit`] fixes the commit order at that moment), then releases the lock and waits
//! for durability. One dispatcher task awaits the commits in submission order and only then
//! sends the staged commands, so nothing reaches an agent or an API client before it is stored,
//! and commands keep their order. Concurrent operations share fsyncs (group commit in the
//! store). If a commit fails, memory may be ahead of the store: the scheduler stops
//! (fail-stop, [`Scheduler::store_failed`]) and a restart reloads the truth from the store.

use crate::error::SchedulerError;
use crate::placement::{FitPolicy, FleetIndex};
use berth_core::agent::{AgentCommand, AgentLink, RegistryAuth};
use berth_core::model::{Catalog, ContainerRegistry};
use berth_core::secrets::SecretKey;
use berth_core::store::{Expect, Store, StoreError, Txn};
use berth_core::{keys, Run, RunStatus};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

/// A connected agent, as the engine reaches it.
pub type Link = Arc<dyn AgentLink>;

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
    /// How long a run's log lines are kept after they are stored; `None`: for ever.
    pub log_retention: Option<Duration>,
    /// How long after its run was created an idempotency key still replays it (see
    /// `idempotency`).
    pub idempotency_ttl: Duration,
    /// How long an ephemeral run waits for its node to connect (see `ephemeral`).
    pub ephemeral_connect_timeout: Duration,
    /// Whether run-ended webhooks may go to loopback and private addresses (see
    /// `crate::webhooks`).
    pub webhook_allow_private_networks: bool,
    /// The only hosts run-ended webhooks may go to; None: any.
    pub webhook_allowed_hosts: Option<Vec<String>>,
}

/// The default log retention: a week.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(168 * 3600);

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(2),
            default_registry: "docker.io".to_owned(),
            stop_grace_seconds: berth_core::defaults::STOP_GRACE_SECONDS,
            stop_wait: Duration::from_secs(15),
            fit_policy: FitPolicy::BestFit,
            catalog: Arc::new(Catalog::default()),
            node_ttl: Duration::from_secs(6),
            lost_grace: Duration::from_secs(4),
            reserve_after: Duration::from_secs(60),
            secrets: None,
            log_retention: Some(DEFAULT_LOG_RETENTION),
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            ephemeral_connect_timeout: DEFAULT_EPHEMERAL_CONNECT_TIMEOUT,
            webhook_allow_private_networks: false,
            webhook_allowed_hosts: None,
        }
    }
}

/// How long an ephemeral run waits for its node unless configured otherwise: a CI job starts
/// its node right after creating the run, so minutes are plenty.
pub const DEFAULT_EPHEMERAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long an idempotency key replays its run unless configured otherwise: a day covers any
/// client's retries.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct Scheduler<S> {
    store: S,
    config: Config,
    state: Mutex<State>,
    /// Bumped after every stored change to a run or its logs; log watchers wait on it.
    changes: watch::Sender<u64>,
    /// When each node was last heard from (any message). Kept outside `state` so recording it
    /// never waits for the engine: liveness must not depend on how busy the scheduler is.
    liveness: std::sync::Mutex<HashMap<String, Instant>>,
    /// The error that ended each node's last session, until it delivers a report again, and
    /// since when its sessions keep failing (see `delivery`).
    delivery_errors: std::sync::Mutex<HashMap<String, delivery::Delivery>>,
    /// Staged effects of each operation, in flush order (see `dispatch_loop`).
    dispatch: mpsc::UnboundedSender<Dispatch>,
    store_failed: watch::Sender<bool>,
    /// Live image-pull progress per run (memory only; see `images`).
    pulls: std::sync::Mutex<HashMap<String, images::PullEntry>>,
    /// Serialises each run's log appends (see `logs`).
    log_appends: logs::AppendLocks,
    /// Held by a node enrollment, revocation or removal (see `identity`): a credential is never
    /// issued for a node id while its credentials are being revoked.
    enrolling: Mutex<()>,
    /// Counts revocations (a node revoked or removed); see [`RevocationMark`].
    revocations: std::sync::atomic::AtomicU64,
    /// The runners read or written in this term (see `runner_cache`).
    runners: runner_cache::RunnerCache,
}

/// Where the revocation count stood before a session's credential was checked. The check reads
/// the store; an `Attach` whose check passed just before a revocation was stored must not
/// register after the revocation closed the node's session (a removed node would come back):
/// [`Scheduler::attach_node_checked`] refuses a node revoked since its mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevocationMark(u64);

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Node>,
    /// The placement view of `nodes`, kept in step: node flags by `sync_node`, leases by `save`.
    index: FleetIndex,
    /// Runs that have not ended, by id (UUIDv7: iteration order is submission order).
    active: BTreeMap<String, Run>,
    /// The runs waiting for placement (a subset of `active`, kept by `stage`), per region, so
    /// scheduling and queue positions never scan the runs that are already placed.
    queue: waiting::WaitQueue,
    /// Waiting runs the scheduling passes looked at one by one (tests check passes stop early).
    #[cfg(test)]
    pass_visits: usize,
    /// Store writes staged by the current operation, submitted by `flush`.
    pending: Txn,
    /// Where each key's put sits in `pending`, so a key written twice is stored once.
    pending_at: HashMap<String, usize>,
    /// Runs staged by the current operation that are still active, by id, with where their
    /// record's put sits in `pending`: `flush` encodes each once, as it stands then, so a run
    /// staged several times in one operation (created and placed, started and ended, or placed
    /// and given a reason) costs one encoding.
    deferred_runs: HashMap<String, usize>,
    /// Where each *unit* of `pending` starts (besides 0): the writes that must apply together
    /// (one run's record with its index entries). `flush` may split `pending` into several
    /// store transactions when it exceeds the store's limits (etcd: 127 operations), but only
    /// between units.
    unit_starts: Vec<usize>,
    /// Inside `open_unit` … `close_unit`: `stage` does not start a unit of its own.
    unit_open: bool,
    /// Commands to agents (and sessions to close) staged by the current operation, sent once
    /// `pending` is durable.
    outgoing: Vec<(Link, Outgoing)>,
    /// For each node revoked or removed since start, the revocation count it was revoked at
    /// (see [`RevocationMark`]).
    revoked_at: HashMap<String, u64>,
    next_connection: u64,
    /// Idempotency keys used since start, (runner id, key hash) → run id: a retry that races the
    /// first request finds it here even before the first one's write is durable.
    idempotency: HashMap<(String, String), String>,
    /// The same keys as (run id, runner id, key hash), oldest first, so expired ones are
    /// dropped from `idempotency` without a scan.
    idempotency_order: VecDeque<(String, String, String)>,
    /// Every private registry with its password unsealed, by id (loaded at start).
    registries: HashMap<String, RegistryEntry>,
    /// Images each node must keep because a runner's warmup put them there.
    warm_pins: images::WarmPins,
    /// Runners' concurrency caps and the runs holding their slots (kept by `stage`).
    caps: caps::RunnerCaps,
    /// When each queued retry's backoff ends, earliest first (see `retries`); entries of runs
    /// placed or stopped meanwhile only cause one needless pass.
    backoffs: std::collections::BTreeSet<(i64, String)>,
    /// Every schedule, by id (loaded at `open`; the leader fires them, see `schedules`).
    schedules: BTreeMap<String, berth_core::schedule::Schedule>,
    /// Runners' notify settings and pending run-ended deliveries (see `webhooks`).
    webhooks: webhooks::Webhooks,
    /// Ephemeral runs waiting, unassigned, for their node (see `ephemeral`): never in `queue`.
    ephemeral_waiting: std::collections::BTreeSet<String>,
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

impl<S: Store> Scheduler<S> {
    /// Loads the runs that have not ended (through their index, never the whole history:
    /// see `active`); they wait for their nodes to re-register.
    pub async fn open(store: S, config: Config) -> Result<Arc<Self>, SchedulerError> {
        let mut state = State {
            active: Self::load_active_runs(&store).await?,
            schedules: Self::load_schedules(&store).await?,
            ..State::default()
        };
        for kv in store.list_prefix(keys::REGISTRIES).await? {
            let reg: ContainerRegistry = decode(&kv.key, &kv.value)?;
            let key = config.secrets.as_ref().ok_or_else(|| {
                SchedulerError::Protocol(
                    "the store holds registry secrets but no secret key was given".to_owned(),
                )
            })?;
            let password = key.open_text(&kv.key, &reg.password_sealed)?;
            state.registries.insert(
                reg.id.clone(),
                RegistryEntry {
                    project: reg.project,
                    auth: RegistryAuth {
                        host: reg.host,
                        username: reg.username,
                        password,
                    },
                },
            );
        }
        for kv in store.list_prefix(keys::NODES).await? {
            let rec: NodeRecord = decode(&kv.key, &kv.value)?;
            if rec
                .ephemeral_for
                .as_ref()
                .is_some_and(|run| !state.active.contains_key(run))
            {
                // An ephemeral node whose run has ended: gone for good.
                store
                    .commit(Txn::new().delete(kv.key.clone(), Expect::Any))
                    .await?;
                continue;
            }
            let mut node = Node::placeholder(&rec.id, &rec.region, rec.draining);
            node.ephemeral_for = rec.ephemeral_for;
            state.nodes.insert(rec.id.clone(), node);
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
        state.warm_pins = Self::load_warm_pins(&store, &config, &state.registries).await?;
        Self::load_webhooks(&store, &mut state.webhooks).await?;
        for kv in store.list_prefix(keys::RUNNERS).await? {
            let runner: berth_core::Runner = decode(&kv.key, &kv.value)?;
            if let Some(cap) = runner.spec.max_concurrent_runs {
                state.set_cap(&runner.id, Some(cap), kv.mod_revision);
            }
            state.set_notify(&runner.id, runner.spec.notify.clone(), kv.mod_revision);
        }
        let queued: Vec<Run> = state
            .active
            .values()
            .filter(|r| is_queued(r))
            .cloned()
            .collect();
        for run in &queued {
            state.queue.insert(run);
            state.note_backoff(run);
        }
        let ephemeral: Vec<Run> = state
            .active
            .values()
            .filter(|r| r.ephemeral.is_some())
            .cloned()
            .collect();
        for run in &ephemeral {
            state.track_ephemeral(run);
        }
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
        for run in state.active.values().filter(|r| r.node_id.is_some()) {
            state.caps.hold(&run.runner_id, false, true);
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
            delivery_errors: std::sync::Mutex::default(),
            dispatch,
            store_failed,
            pulls: std::sync::Mutex::default(),
            log_appends: logs::AppendLocks::default(),
            enrolling: Mutex::new(()),
            revocations: std::sync::atomic::AtomicU64::new(0),
            runners: runner_cache::RunnerCache::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    #[cfg(test)]
    async fn assert_index_consistent(&self) {
        self.state.lock().await.assert_index_consistent();
    }

    /// Whether the store answers a read now (readiness): a quorum read on etcd.
    pub async fn probe_store(&self) -> Result<String, String> {
        match tokio::time::timeout(
            berth_core::metrics::CHECK_TIMEOUT,
            self.store.get("/berth/readiness-probe"),
        )
        .await
        {
            Ok(Ok(_)) => Ok("the store answers".to_owned()),
            Ok(Err(e)) => Err(format!("the store failed a read: {e}")),
            Err(_) => Err(format!(
                "the store did not answer a read within {} s",
                berth_core::metrics::CHECK_TIMEOUT.as_secs()
            )),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

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
        st.encode_deferred_runs();
        let txn = std::mem::take(&mut st.pending);
        st.pending_at.clear();
        let units = std::mem::take(&mut st.unit_starts);
        st.unit_open = false;
        let messages = std::mem::take(&mut st.outgoing);
        // Submitted one after the other now, so they apply in this order.
        let commit = split_at_units(
            txn,
            &units,
            self.store.max_txn_ops(),
            self.store.max_txn_bytes(),
            |op| op.bytes(&self.store),
        )
        .into_iter()
        .map(|t| Box::pin(self.store.submit(t)) as CommitFuture)
        .collect();
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
}

impl State {
    /// The run if it is still leased to `node_id` under `lease_epoch`.
    fn leased(&self, run_id: &str, node_id: &str, lease_epoch: u64) -> Option<Run> {
        self.active
            .get(run_id)
            .filter(|c| c.node_id.as_deref() == Some(node_id) && c.lease_epoch == lease_epoch)
            .cloned()
    }

    /// Stages `run`'s new state: memory (the run cache and the index's leases) now, the store
    /// write with the operation's flush.
    fn stage(&mut self, mut run: Run) {
        // An attempt that ends for a cause its policy retries: the next attempt is stored in
        // the same unit as the end.
        let retry = if run.status.is_terminal() && self.active.contains_key(&run.id) {
            retries::next_attempt(&mut run)
        } else {
            None
        };
        let own_unit = retry.is_some() && !self.unit_open;
        if own_unit {
            self.open_unit();
        }
        self.stage_one(run);
        if let Some(next) = retry {
            self.stage_new(next);
        }
        if own_unit {
            self.close_unit();
        }
    }

    fn stage_one(&mut self, run: Run) {
        self.begin_unit();
        let was_active = self.active.contains_key(&run.id);
        let before = self.active.get(&run.id).and_then(|r| r.node_id.clone());
        crate::metrics::run_staged(
            self.active
                .get(&run.id)
                .map(|r| (r.status, r.node_id.is_some())),
            &run,
        );
        let after = (!run.status.is_terminal())
            .then(|| run.node_id.clone())
            .flatten();
        if before != after {
            self.index_lease(after.as_deref(), before.as_deref(), run.memory_mib);
            self.caps
                .hold(&run.runner_id, before.is_some(), after.is_some());
        }
        if run.status == RunStatus::Canceled && run.started_at.is_none() {
            if let Some(node) = before.as_deref() {
                // Canceled while assigned: its node may be starting it right now. What it
                // holds there stays held until the node says it is gone (`Node::stale`).
                self.hold_stale(node, &run.id, run.memory_mib);
            }
        }
        // The engine is the only writer of run records: no precondition needed. A run that
        // stays active is encoded by `flush`, once, as it stands then (see `deferred_runs`).
        if run.status.is_terminal() {
            self.deferred_runs.remove(&run.id);
            self.write(keys::run(&run.id), encode(&run), Expect::Any);
        } else {
            let at = self.write(keys::run(&run.id), Vec::new(), Expect::Any);
            if !self.deferred_runs.contains_key(&run.id) {
                self.deferred_runs.insert(run.id.clone(), at);
            }
        }
        self.stage_active_index(&run, was_active);
        if run.status.is_terminal() && was_active {
            self.notify_end(&run);
        }
        if run.status.is_terminal() && !run.files.is_empty() {
            // No node needs the files any more: their contents go, their digests stay in the
            // record. (Deleting an absent key is no error, so a run staged twice is fine.)
            self.delete(keys::run_files(&run.id));
        }
        if is_queued(&run) {
            self.queue.insert(&run);
            self.note_backoff(&run);
        } else {
            self.queue.remove(&run);
        }
        self.track_ephemeral(&run);
        if run.status.is_terminal() {
            self.active.remove(&run.id);
        } else {
            self.active.insert(run.id.clone(), run);
        }
    }

    /// Stages a run just made (a trigger's, a retry, a schedule's fire): its record (which must
    /// not exist yet), its files' contents, its runner's index entry, then `stage`.
    fn stage_new(&mut self, run: Run) {
        self.write(keys::run(&run.id), Vec::new(), Expect::Absent);
        self.write_file_contents(&run);
        self.write(
            keys::runner_run(&run.runner_id, &run.id),
            Vec::new(),
            Expect::Absent,
        );
        self.stage_one(run);
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
    /// Starts a new unit of writes (see `unit_starts`), unless one is held open.
    fn begin_unit(&mut self) {
        let at = self.pending.ops.len();
        if !self.unit_open && at > 0 && self.unit_starts.last() != Some(&at) {
            self.unit_starts.push(at);
        }
    }

    /// Everything staged until `close_unit` is one unit, `stage` calls included.
    fn open_unit(&mut self) {
        self.begin_unit();
        self.unit_open = true;
    }

    fn close_unit(&mut self) {
        self.unit_open = false;
    }

    /// Returns the put's place in `pending`.
    fn write(&mut self, key: String, value: Vec<u8>, expect: Expect) -> usize {
        if let Some(&at) = self.pending_at.get(&key) {
            if let Some(berth_core::store::Op::Put { value: v, .. }) = self.pending.ops.get_mut(at)
            {
                *v = value;
                return at;
            }
        }
        let at = self.pending.ops.len();
        self.pending_at.insert(key.clone(), at);
        self.pending = std::mem::take(&mut self.pending).put(key, value, expect);
        at
    }

    /// Encodes the records of the runs staged since the last flush that are still active, each
    /// as it stands now, into their puts.
    fn encode_deferred_runs(&mut self) {
        for (id, at) in self.deferred_runs.drain() {
            let run = self.active.get(&id);
            match (run, self.pending.ops.get_mut(at)) {
                (Some(run), Some(berth_core::store::Op::Put { value, .. })) => {
                    *value = encode(run);
                }
                // `stage_one` keeps every deferred run in `active` (one that ends leaves the
                // map and this list together), and puts are never removed from `pending`.
                _ => tracing::error!(run_id = %id, "a staged run record was missing at flush"),
            }
        }
    }

    /// Stages a message to a connected node, sent once the operation's writes are durable. A
    /// disconnected node learns what it must on re-register instead.
    fn send_to(&mut self, node_id: &str, command: AgentCommand) {
        if let Some(link) = self.nodes.get(node_id).and_then(|n| n.link.clone()) {
            self.outgoing.push((link, Outgoing::Command(command)));
        }
    }

    /// Stages the end of the node's session, after the messages staged before it (the agent
    /// hears `reason`); the node is disconnected in memory now.
    fn close_session(&mut self, node_id: &str, reason: String) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            if let Some(link) = node.link.take() {
                self.outgoing.push((link, Outgoing::Close(reason)));
            }
            node.connected = false;
        }
    }

    /// The index's lease totals equal what the active runs and the nodes' stale runs add up to
    /// (test invariant).
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
        // Containers a node may still run without a lease hold capacity too.
        for n in self.nodes.values() {
            for memory_mib in n.stale.values() {
                let e = held.entry(n.id.as_str()).or_default();
                e.0 += memory_mib;
                e.1 += 1;
            }
        }
        let mut holding: HashMap<String, u32> = HashMap::new();
        for c in self.active.values().filter(|c| c.node_id.is_some()) {
            *holding.entry(c.runner_id.clone()).or_default() += 1;
        }
        assert_eq!(
            holding,
            self.caps.all_holding(),
            "the runs holding each runner's slots"
        );
        let queued: std::collections::BTreeSet<String> = self
            .active
            .values()
            .filter(|r| is_queued(r))
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(
            self.queue.ids(),
            queued,
            "the queue holds exactly the waiting runs"
        );
        assert!(
            self.queue.sizes_consistent(&self.active),
            "the queue counts each region's sizes"
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
}

fn stop(run_id: &str) -> AgentCommand {
    AgentCommand::StopRun {
        run_id: run_id.to_owned(),
    }
}

type CommitFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, StoreError>> + Send>>;

/// Splits `txn` into transactions of at most `max_ops` operations and `max_bytes` bytes, cutting
/// only where a unit starts (`unit_starts`, ascending op indices). A unit larger than the limits
/// stays whole (the store then refuses it). Order is kept.
fn split_at_units(
    txn: Txn,
    unit_starts: &[usize],
    max_ops: usize,
    max_bytes: usize,
    size: impl Fn(&berth_core::store::Op) -> usize,
) -> Vec<Txn> {
    if txn.is_empty() {
        return Vec::new();
    }
    // The common case (the embedded store has no limits) costs no pass over the writes.
    let within_bytes =
        || max_bytes == usize::MAX || txn.ops.iter().map(&size).sum::<usize>() <= max_bytes;
    if txn.ops.len() <= max_ops && within_bytes() {
        return vec![txn];
    }
    let total = txn.ops.len();
    let mut bounds: Vec<usize> = unit_starts
        .iter()
        .copied()
        .filter(|&b| b > 0 && b < total)
        .collect();
    bounds.push(total);
    let mut out = Vec::new();
    let mut current = Txn::new();
    let mut current_bytes = 0;
    let mut ops = txn.ops.into_iter();
    let mut start = 0;
    for end in bounds {
        let unit: Vec<_> = ops.by_ref().take(end - start).collect();
        start = end;
        let unit_bytes: usize = unit.iter().map(&size).sum();
        let fits =
            current.ops.len() + unit.len() <= max_ops && current_bytes + unit_bytes <= max_bytes;
        if !fits && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.ops.extend(unit);
        current_bytes += unit_bytes;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// What an operation has for an agent once its writes are durable.
// Nearly every entry is a command: boxing them would allocate once per message to shrink a
// short-lived list.
#[allow(clippy::large_enum_variant)]
enum Outgoing {
    Command(AgentCommand),
    /// Ends the agent's session, telling it why.
    Close(String),
}

/// One operation's staged effects, in flush order.
struct Dispatch {
    /// The operation's store transactions (usually one), applied in this order.
    commit: Vec<CommitFuture>,
    messages: Vec<(Link, Outgoing)>,
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
        let mut failure = None;
        for commit in d.commit {
            if let Err(e) = commit.await {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            tracing::error!(error = %e, "store commit failed; the scheduler must restart");
            failed.send_replace(true);
            let _ = d.done.send(Err(SchedulerError::Store(e)));
            continue;
        }
        for (link, message) in d.messages {
            match message {
                // A closed stream: the node learns what it must on re-register.
                Outgoing::Command(command) => {
                    let _ = link.send(command);
                }
                Outgoing::Close(reason) => link.close(&reason),
            }
        }
        let _ = d.done.send(Ok(()));
    }
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

mod active;
mod api_keys;
mod caps;
mod delivery;
mod ephemeral;
mod idempotency;
mod identity;
mod images;
mod logs;
mod nodes;
mod queue;
mod registries;
mod removal;
mod reports;
mod retries;
mod runner_cache;
mod runners;
mod runs;
mod schedules;
#[cfg(test)]
mod tests;
mod usage;
mod waiting;
mod webhooks;

pub use identity::{validate_node_id, DEFAULT_REGISTRATION_TTL, MAX_REGISTRATION_TTL};
pub use logs::{log_line_cost, LOG_PAGE_MAX_BYTES, REDACTED, REDACT_MIN_LEN};
pub use nodes::NodeInfo;
use nodes::{Node, NodeRecord};
use queue::is_queued;
pub use registries::image_reference;
use registries::RegistryEntry;
pub use removal::{LeaveOutcome, Removal, RemovedNode};
pub use reports::RunReport;
pub use runners::MAX_WARM_SANDBOXES;
pub use schedules::MAX_SCHEDULES_PER_RUNNER;
pub use usage::{UsageGroup, UsageRow};
