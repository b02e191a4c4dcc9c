//! The agent's side of `AgentService.Attach`: register, heartbeat, take assignments and stops,
//! deliver the outbox, and reconnect forever with capped backoff when the stream breaks. Runs keep
//! executing while disconnected; their reports wait in the outbox.
//!
//! Shutdown is graceful: once the shutdown future resolves (SIGTERM), the agent refuses new
//! assignments — each is answered at once with `RunExited { START_FAILED, error_code:
//! "node_draining" }` — and keeps the session up, reporting the running runs' lines and exits,
//! until every run has ended and every report is acknowledged, or the shutdown grace is over.
//! With no scheduler connected it waits only for the runs to end (their journals keep the
//! reports for the next start). Runs still going then stay with containerd; the next agent
//! start re-adopts them.
//!
//! While containerd does not answer, assignments are refused the same way (with a message
//! saying so), and once it answers again the session registers anew, so that the scheduler,
//! which took the refusals for a shutdown, takes the node for ready again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_core::codes::ErrorCode;
use berth_core::convert::error_code_to_pb;
use berth_core::failover::Rotation;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::{
    agent_message::Body, scheduler_message, AgentMessage, AssignRun, ExitReason, Heartbeat,
    Register, RunExited, SchedulerMessage, WarmupResult,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::clock::unix_nanos_now;
use crate::config::AgentConfig;
use crate::image::progress::warmup_report;
use crate::outbox::{RefusalWatch, SharedOutbox, REFUSALS_BEFORE_DEFUSE};
use crate::run::journal::Journal;
use crate::run::sandboxes::{keep_ready, SandboxSettings, Sandboxes};
use crate::run::supervisor::{resume, supervise, Assignment, SupervisorSettings};
use crate::runtime::{pull_reporting, ContainerRuntime, EngineHealth};

/// The wait before registering again after a session the agent ended itself.
const SESSION_RESTART: Duration = Duration::from_millis(100);
/// While no scheduler answers, a warning at most this often (each failed try is logged at debug).
const OUTAGE_WARN_EVERY: Duration = Duration::from_secs(10);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a stopping agent gives its ready sandboxes to go.
const SANDBOXES_REMOVAL: Duration = Duration::from_secs(30);
/// How often a draining agent checks whether it is done.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Why one connection attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// connecting to the scheduler failed
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    /// the node credential cannot travel as gRPC metadata
    #[error("the node credential must be visible ASCII")]
    InvalidCredential,
    /// the stream failed
    #[error("stream error: {0}")]
    Stream(#[from] tonic::Status),
    /// the scheduler closed the stream
    #[error("the scheduler closed the stream")]
    Closed,
    /// the scheduler did not answer Register with Registered
    #[error("no Registered reply: {0}")]
    NotRegistered(&'static str),
}

/// A run this agent process is responsible for.
struct RunEntry {
    stop: watch::Sender<bool>,
    memory_mib: u64,
    /// Set once the supervisor queued RunExited; the entry goes when that seq is acknowledged.
    exit_seq: Option<u64>,
}

/// The node agent: owns the runs and the connection to the scheduler.
pub struct Agent<R: ContainerRuntime> {
    config: AgentConfig,
    runtime: Arc<R>,
    outbox: SharedOutbox,
    journal: Journal,
    boot_id: String,
    runs: Arc<Mutex<HashMap<String, RunEntry>>>,
    /// Set once shutdown began: new assignments are refused.
    draining: AtomicBool,
    /// Set while a session is registered with the scheduler: only then can reports be
    /// acknowledged, so only then is a draining agent worth waiting for acknowledgements.
    connected: Arc<AtomicBool>,
    /// Ready sandboxes for warmed runners; None with `max_sandboxes` 0 (or no directory).
    sandboxes: Option<Arc<Sandboxes>>,
    /// One-shot mode: whether the node took its run, and how its life ended (see
    /// [`Agent::one_shot_end`]).
    took_ephemeral_run: AtomicBool,
    one_shot: watch::Sender<Option<OneShotEnd>>,
}

/// How a one-shot node's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OneShotEnd {
    /// It took its run, which ended, and the scheduler has every report.
    Done,
    /// The scheduler refused the node (a wrong claim, the run has ended, not enough memory).
    Refused(String),
}

/// Clears [`Agent::connected`] however the session ends (error, close, or dropped by shutdown).
struct ConnectedGuard<'a>(&'a AtomicBool);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl<R: ContainerRuntime> Agent<R> {
    pub fn new(config: AgentConfig, runtime: Arc<R>) -> Self {
        if config.max_sandboxes == 0 {
            // What an earlier process with sandboxes left there (their containers are swept).
            let _ = std::fs::remove_dir_all(config.state_dir.join("sandboxes"));
        }
        let sandboxes = (config.max_sandboxes > 0)
            .then(|| {
                let dir = config.state_dir.join("sandboxes");
                Sandboxes::new(dir, config.max_sandboxes, config.sandbox_max_idle)
                    .map_err(|error| tracing::error!(%error, "no ready sandboxes: cannot prepare their directory"))
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        Self {
            sandboxes,
            journal: Journal::new(&config.state_dir),
            config,
            runtime,
            outbox: SharedOutbox::new(),
            boot_id: uuid::Uuid::new_v4().to_string(),
            runs: Arc::new(Mutex::new(HashMap::new())),
            draining: AtomicBool::new(false),
            connected: Arc::new(AtomicBool::new(false)),
            took_ephemeral_run: AtomicBool::new(false),
            one_shot: watch::channel(None).0,
        }
    }

    /// One-shot mode: resolves once the node is done (its run ended and every report was
    /// acknowledged) or the scheduler refused it; the caller then shuts the agent down. Never
    /// resolves for a node of the fleet.
    pub fn one_shot_end(&self) -> impl Future<Output = OneShotEnd> + Send + 'static {
        let mut end = self.one_shot.subscribe();
        let one_shot = self.config.ephemeral.is_some();
        async move {
            if !one_shot {
                return std::future::pending().await;
            }
            let ended = end
                .wait_for(Option::is_some)
                .await
                .map(|end| end.clone().unwrap_or(OneShotEnd::Done));
            match ended {
                Ok(end) => end,
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// One-shot mode: the node is done once it took its run and nothing is left to report.
    fn check_one_shot(&self) {
        if self.config.ephemeral.is_some()
            && self.took_ephemeral_run.load(Ordering::SeqCst)
            && self.runs().is_empty()
            && self.outbox.is_empty()
        {
            self.one_shot.send_if_modified(|end| {
                let first = end.is_none();
                if first {
                    tracing::info!("one-shot node: its run ended and was reported; leaving");
                    *end = Some(OneShotEnd::Done);
                }
                first
            });
        }
    }

    /// One-shot mode: a session that the scheduler refused for good ends the node.
    fn check_refused(&self, result: &Result<(), SessionError>) {
        let Some(ephemeral) = &self.config.ephemeral else {
            return;
        };
        if let Err(SessionError::Stream(status)) = result {
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
            ) {
                let why = status.message().to_owned();
                tracing::error!(run_id = %ephemeral.run_id, reason = %why, "the scheduler refused this one-shot node");
                self.one_shot.send_if_modified(|end| {
                    let first = end.is_none();
                    if first {
                        *end = Some(OneShotEnd::Refused(why));
                    }
                    first
                });
            }
        }
    }

    pub fn outbox(&self) -> &SharedOutbox {
        &self.outbox
    }

    /// The agent's readiness: registered with a scheduler now, and containerd answers.
    pub fn readiness(&self) -> berth_core::metrics::Readiness {
        use berth_core::metrics::Check;
        let connected = self.connected.clone();
        let runtime = self.runtime.clone();
        Arc::new(move || {
            let connected = connected.load(Ordering::SeqCst);
            let runtime = runtime.clone();
            Box::pin(async move {
                let scheduler = if connected {
                    Ok("registered with a scheduler".to_owned())
                } else {
                    Err("not registered with any scheduler".to_owned())
                };
                let containerd =
                    tokio::time::timeout(berth_core::metrics::CHECK_TIMEOUT, runtime.ping())
                        .await
                        .unwrap_or_else(|_| Err("containerd did not answer in time".to_owned()));
                vec![
                    Check::new("scheduler", scheduler),
                    Check::new("containerd", containerd),
                ]
            })
        })
    }

    /// Renders, when scraped, the containers of this agent's runs: memory and CPU time from
    /// their cgroups (`crate::metrics::render_containers`).
    pub fn container_metrics(&self) -> berth_core::metrics::Collector {
        let runs = self.runs.clone();
        let runtime = self.runtime.clone();
        Arc::new(move || {
            let mut ids: Vec<String> = runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            ids.sort();
            let usage: Vec<_> = ids
                .into_iter()
                .filter_map(|id| runtime.usage(&id).map(|u| (id, u)))
                .collect();
            crate::metrics::render_containers(&usage)
        })
    }

    fn runs(&self) -> MutexGuard<'_, HashMap<String, RunEntry>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over what an earlier agent process (killed, crashed) left behind, before the first
    /// `Register`, so the runs it re-adopts are listed there:
    /// - a run with a recorded exit: its unacknowledged lines and its `RunExited` are re-sent;
    /// - a run whose task was started: the task is re-adopted (see [`resume`]);
    /// - a run that never started: its container is removed and the run forgotten, so the
    ///   scheduler re-queues it;
    /// - a container without a journal: removed, as before;
    /// - a run directory without a journal (`run.json`): removed with what it holds.
    pub async fn recover(&self) {
        self.journal.remove_orphans();
        let mut adopted = HashSet::new();
        // Sandbox containers that journaled runs took (their ids are not the runs').
        let mut taken = HashSet::new();
        for run_id in self.journal.list() {
            let run_dir = self.journal.run_dir(&run_id);
            let record = match run_dir.read_record() {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(run_id = %run_id, %error, "unreadable run journal; removing the run");
                    self.runtime.cleanup(&run_id).await;
                    self.journal.remove(&run_id);
                    continue;
                }
            };
            // A run that took a ready sandbox runs in that container: every call for the run,
            // its cleanup below included, goes there, and the sweep below leaves it alone.
            if let Some(container_id) = &record.container_id {
                self.runtime.use_container(&run_id, container_id);
                taken.insert(container_id.clone());
            }
            let recorded_exit = run_dir.read_exit().unwrap_or_else(|error| {
                tracing::error!(run_id = %run_id, %error, "unreadable exit record; re-adopting the task instead");
                None
            });
            if recorded_exit.is_none() && record.started_at_unix_nanos.is_none() {
                tracing::warn!(run_id = %run_id, "run had not started before the restart; removing it so the scheduler re-queues it");
                self.runtime.cleanup(&run_id).await;
                self.journal.remove(&run_id);
                continue;
            }
            let Some(stop_rx) = self.track(&run_id, record.spec.memory_mib) else {
                continue;
            };
            self.runtime.hold_image(&run_id, &record.spec.image);
            if self
                .config
                .ephemeral
                .as_ref()
                .is_some_and(|e| e.run_id == run_id)
            {
                self.took_ephemeral_run.store(true, Ordering::SeqCst);
            }
            adopted.insert(run_id.clone());
            let supervisor = resume(
                self.runtime.clone(),
                self.supervisor_settings(),
                run_dir,
                record,
                recorded_exit,
                stop_rx,
                self.outbox.clone(),
            );
            self.spawn_supervisor(run_id, supervisor);
        }
        if !adopted.is_empty() {
            tracing::info!(
                runs = adopted.len(),
                "re-adopted runs of an earlier agent process"
            );
        }
        let mut removed = HashSet::new();
        match self.runtime.list_containers().await {
            Ok(ids) => {
                for id in ids
                    .into_iter()
                    .filter(|id| !adopted.contains(id) && !taken.contains(id))
                {
                    tracing::warn!(run_id = %id, "removing container left by an earlier agent process");
                    self.runtime.cleanup(&id).await;
                    self.journal.remove(&id);
                    removed.insert(id);
                }
            }
            Err(error) => tracing::warn!(%error, "could not list leftover containers"),
        }
        // Network namespaces and addresses of runs that are gone (the agent died between
        // attaching the network and creating the container, or during a cleanup).
        for id in self.runtime.list_networks() {
            if !adopted.contains(&id) && !taken.contains(&id) && !removed.contains(&id) {
                tracing::warn!(run_id = %id, "releasing the network of a run left by an earlier agent process");
                self.runtime.cleanup(&id).await;
            }
        }
    }

    /// Takes over leftovers, then stays connected to the scheduler until `shutdown` resolves;
    /// then drains ([`Agent::drain`]) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.recover().await;
        self.runtime.prepare_ahead();
        let keeper = self.sandboxes.as_ref().map(|pool| {
            tokio::spawn(keep_ready(
                pool.clone(),
                self.runtime.clone(),
                SandboxSettings {
                    cgroup_parent: self.config.cgroup_parent.clone(),
                    pids_limit: self.config.pids_limit,
                },
            ))
        });
        let drained = async {
            shutdown.await;
            // What was prepared for runs that will not come goes first: the sandboxes (the
            // keeper removes them; one being created is finished, then removed) and the
            // networks attached ahead.
            if let (Some(pool), Some(keeper)) = (&self.sandboxes, keeper) {
                pool.close();
                if tokio::time::timeout(SANDBOXES_REMOVAL, keeper)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "ready sandboxes not all removed in time; the next start sweeps them"
                    );
                }
            }
            let runtime = self.runtime.clone();
            let _ = tokio::task::spawn_blocking(move || runtime.release_ahead()).await;
            self.drain().await;
        };
        let mut drained = std::pin::pin!(drained);
        let schedulers = &self.config.schedulers;
        let mut rotation = Rotation::new(schedulers.len(), 0);
        let mut refusals = RefusalWatch::default();
        let mut outage = Outage::default();
        loop {
            let mut registered = false;
            let front_before = self.outbox.front_seq();
            let url = &schedulers.urls()[rotation.current()];
            let attempt = self.connect_once(rotation.current(), &mut registered);
            let result = tokio::select! {
                _ = &mut drained => return,
                result = attempt => result,
            };
            self.check_refused(&result);
            if registered {
                rotation.worked();
                outage = Outage::default();
                let front_after = self.outbox.front_seq();
                if refusals.session_ended(front_before, front_after, result.is_err()) {
                    self.give_up_on_front(&result);
                }
            }
            let delay = match &result {
                // Ended on purpose (containerd is back): register again with the same one.
                Ok(()) => {
                    tracing::info!(scheduler = %url, "scheduler session ended; registering again");
                    SESSION_RESTART
                }
                Err(error) => {
                    let delay = rotation.failed();
                    let next = &schedulers.urls()[rotation.current()];
                    if outage.should_warn() {
                        tracing::warn!(scheduler = %url, next = %next, %error, retry_ms = delay.as_millis() as u64, "scheduler session failed; trying the next scheduler address");
                    } else {
                        tracing::debug!(scheduler = %url, next = %next, %error, retry_ms = delay.as_millis() as u64, "scheduler session failed");
                    }
                    delay
                }
            };
            tokio::select! {
                _ = &mut drained => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The scheduler keeps ending the session before acknowledging the oldest report: if that is
    /// a log batch, its lines' text becomes a marker with the reason, so it gets through and the
    /// loss shows in the run's logs, instead of the same batch being re-sent forever.
    fn give_up_on_front(&self, result: &Result<(), SessionError>) {
        let reason = match result {
            Err(error) => error.to_string(),
            Ok(()) => "the session kept ending".to_owned(),
        };
        let seq = self.outbox.front_seq();
        if self.outbox.defuse_front(&reason) {
            tracing::error!(seq, %reason, refusals = REFUSALS_BEFORE_DEFUSE, "the scheduler keeps refusing a log batch; sending its lines as markers instead");
        } else {
            tracing::error!(seq, %reason, refusals = REFUSALS_BEFORE_DEFUSE, "the scheduler keeps ending the session before acknowledging the oldest report");
        }
    }

    /// Stops taking runs and waits, at most the shutdown grace, until every run this process
    /// handles has ended and the scheduler acknowledged every report. The session keeps going
    /// meanwhile (it runs alongside in [`Agent::run`]). With no scheduler connected nothing can
    /// be acknowledged, so it only waits for the runs to end: an ended run's lines and exit are
    /// in its journal, and the next start re-sends them (as after a crash). With no run going
    /// it therefore returns at once, whether or not a scheduler is there.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let grace = self.config.shutdown_grace;
        tracing::info!(
            active_runs = self.runs().len(),
            connected = self.connected.load(Ordering::SeqCst),
            grace_seconds = grace.as_secs_f64(),
            "shutting down: refusing new runs, waiting for the running ones"
        );
        let idle = async {
            loop {
                match self.drain_state() {
                    DrainState::Reported => {
                        tracing::info!("every run ended and was reported; exiting");
                        return;
                    }
                    DrainState::EndedUnreported => {
                        tracing::warn!(
                            unacknowledged_reports = self.outbox.len(),
                            "every run ended but no scheduler is connected to acknowledge the reports; exiting: the next start re-sends them from the run journals"
                        );
                        return;
                    }
                    DrainState::Busy => tokio::time::sleep(DRAIN_POLL).await,
                }
            }
        };
        if tokio::time::timeout(grace, idle).await.is_err() {
            let mut left: Vec<String> = self.runs().keys().cloned().collect();
            left.sort();
            tracing::warn!(
                runs = ?left,
                unacknowledged_reports = self.outbox.len(),
                "shutdown grace over; exiting anyway: the runs keep running under containerd and the next agent start re-adopts them"
            );
        }
    }

    fn drain_state(&self) -> DrainState {
        let runs = self.runs();
        if runs.is_empty() && self.outbox.is_empty() {
            DrainState::Reported
        } else if !self.connected.load(Ordering::SeqCst)
            && runs.values().all(|r| r.exit_seq.is_some())
        {
            DrainState::EndedUnreported
        } else {
            DrainState::Busy
        }
    }

    /// True once shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn register_message(&self) -> AgentMessage {
        let active_run_ids = self.runs().keys().cloned().collect();
        AgentMessage {
            seq: 0,
            body: Some(Body::Register(Register {
                node_id: self.config.node_id.clone(),
                boot_id: self.boot_id.clone(),
                region: self.config.region.clone(),
                total_memory_mib: self.config.total_memory_mib,
                cpus: self.config.cpus,
                max_concurrent_runs: self.config.max_runs,
                active_run_ids,
                agent_version: concat!("berth-node-agent/", env!("CARGO_PKG_VERSION")).to_string(),
                cached_images: self.runtime.cached_images(),
                runtimes: self.config.runtimes.names(),
                ephemeral_run_id: self
                    .config
                    .ephemeral
                    .as_ref()
                    .map(|e| e.run_id.clone())
                    .unwrap_or_default(),
                ephemeral_claim: self
                    .config
                    .ephemeral
                    .as_ref()
                    .map(|e| e.claim.0.clone())
                    .unwrap_or_default(),
            })),
        }
    }

    fn supervisor_settings(&self) -> SupervisorSettings {
        SupervisorSettings {
            cgroup_parent: self.config.cgroup_parent.clone(),
            pids_limit: self.config.pids_limit,
            log_limits: self.config.log_limits,
            max_disk_bytes: self.config.max_run_disk_bytes,
            sandboxes: self.sandboxes.clone(),
            runtimes: self.config.runtimes.clone(),
        }
    }

    fn heartbeat_message(&self) -> AgentMessage {
        let runs = self.runs();
        let running: Vec<(&String, &RunEntry)> =
            runs.iter().filter(|(_, r)| r.exit_seq.is_none()).collect();
        let used: u64 = running.iter().map(|(_, r)| r.memory_mib).sum();
        AgentMessage {
            seq: 0,
            body: Some(Body::Heartbeat(Heartbeat {
                free_memory_mib: self.config.total_memory_mib.saturating_sub(used),
                running_run_ids: running.iter().map(|(id, _)| (*id).clone()).collect(),
                cached_images: self.runtime.cached_images(),
            })),
        }
    }

    /// One session with scheduler `index` of the configured list.
    async fn connect_once(&self, index: usize, registered: &mut bool) -> Result<(), SessionError> {
        let endpoint = self.config.schedulers.endpoint(index);
        let url = endpoint.uri().to_string();
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| SessionError::Connect { url, source })?;
        let credential = self
            .config
            .credential
            .as_ref()
            .map(|t| tonic::metadata::MetadataValue::try_from(t.0.as_str()))
            .transpose()
            .map_err(|_| SessionError::InvalidCredential)?;
        let mut client =
            AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(credential) = &credential {
                    req.metadata_mut().insert(
                        berth_core::auth::NODE_CREDENTIAL_METADATA,
                        credential.clone(),
                    );
                }
                Ok(req)
            });
        let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
        tx.send(self.register_message())
            .await
            .map_err(|_| SessionError::Closed)?;
        let mut inbound = client.attach(ReceiverStream::new(rx)).await?.into_inner();

        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionError::NotRegistered("timed out"))??;
        let registered_msg = match first.and_then(|m| m.body) {
            Some(scheduler_message::Body::Registered(r)) => r,
            Some(_) => {
                return Err(SessionError::NotRegistered(
                    "first message was not Registered",
                ))
            }
            None => return Err(SessionError::Closed),
        };
        *registered = true;
        self.connected.store(true, Ordering::SeqCst);
        let _connected = ConnectedGuard(&self.connected);
        tracing::info!(
            node_id = %self.config.node_id,
            boot_id = %self.boot_id,
            heartbeat_interval_seconds = registered_msg.heartbeat_interval_seconds,
            stale_runs = registered_msg.stale_run_ids.len(),
            outbox = self.outbox.len(),
            "registered with scheduler"
        );
        for stale in registered_msg.stale_run_ids {
            self.drop_stale_run(stale);
        }
        // A run refused while containerd was unreachable made the scheduler take this node
        // for one shutting down; registering again once containerd is back undoes that.
        let mut health = self.runtime.health();
        let outages_at_register = health.as_ref().map_or(0, |h| h.borrow().outages);
        let interval = match registered_msg.heartbeat_interval_seconds {
            0 => DEFAULT_HEARTBEAT,
            s => Duration::from_secs(u64::from(s)),
        };

        // Re-send everything not yet acknowledged, then only what is new.
        let mut last_sent = 0u64;
        let mut heartbeat = tokio::time::interval(interval);
        loop {
            // Ephemeral reports first: a pull's last progress report must reach the
            // scheduler before the run's RunStarted, which was queued after it.
            for message in self.outbox.take_ephemeral() {
                tx.send(message).await.map_err(|_| SessionError::Closed)?;
            }
            for message in self.outbox.unsent_after(last_sent) {
                last_sent = last_sent.max(message.seq);
                tx.send(message).await.map_err(|_| SessionError::Closed)?;
            }
            tokio::select! {
                message = inbound.message() => match message? {
                    Some(message) => {
                        self.handle(message);
                        self.check_one_shot();
                    }
                    None => return Err(SessionError::Closed),
                },
                _ = self.outbox.changed() => {}
                _ = heartbeat.tick() => {
                    tx.send(self.heartbeat_message()).await.map_err(|_| SessionError::Closed)?;
                }
                now = health_changed(&mut health) => {
                    if now.takes_runs() && now.outages > outages_at_register {
                        tracing::info!("containerd is back; registering again to take runs");
                        return Ok(());
                    }
                }
            }
        }
    }

    fn handle(&self, message: SchedulerMessage) {
        match message.body {
            Some(scheduler_message::Body::AssignRun(assign)) => self.assign(assign),
            Some(scheduler_message::Body::StopRun(stop)) => match self.runs().get(&stop.run_id) {
                Some(entry) => {
                    tracing::info!(run_id = %stop.run_id, "stop requested by scheduler");
                    entry.stop.send_replace(true);
                }
                None => tracing::debug!(run_id = %stop.run_id, "stop for unknown run ignored"),
            },
            Some(scheduler_message::Body::Ack(ack)) => self.acknowledged(ack.up_to_seq),
            Some(scheduler_message::Body::WarmPins(pins)) => {
                tracing::debug!(images = ?pins.images, sandboxes = pins.sandboxes.len(), "warm pins from the scheduler");
                self.runtime.set_warm_pins(&pins.images);
                if let Some(pool) = &self.sandboxes {
                    pool.set_wanted(
                        pins.sandboxes
                            .into_iter()
                            .map(|s| (s.runner_id, s.count, s.spec.unwrap_or_default())),
                    );
                }
            }
            Some(scheduler_message::Body::Warmup(warmup)) => {
                let runtime = self.runtime.clone();
                let outbox = self.outbox.clone();
                tokio::spawn(async move {
                    let key = format!("warmup:{}", warmup.runner_id);
                    let pulled = pull_reporting(
                        &*runtime,
                        &warmup.image,
                        warmup.registry_auth.as_ref(),
                        |state| {
                            let report = warmup_report(&warmup.runner_id, &warmup.image, state);
                            outbox.push_ephemeral(key.clone(), Body::PullProgress(report));
                        },
                    )
                    .await;
                    let result = match pulled {
                        Ok(image) => WarmupResult {
                            runner_id: warmup.runner_id,
                            image: warmup.image,
                            ok: true,
                            image_digest: image.digest,
                            error_message: String::new(),
                        },
                        Err(error) => {
                            tracing::warn!(image = %warmup.image, %error, "warmup pull failed");
                            WarmupResult {
                                runner_id: warmup.runner_id,
                                image: warmup.image,
                                ok: false,
                                image_digest: String::new(),
                                error_message: error.to_string(),
                            }
                        }
                    };
                    outbox.push(Body::WarmupResult(result));
                });
            }
            Some(scheduler_message::Body::Registered(_)) => {
                tracing::debug!("duplicate Registered ignored");
            }
            None => {}
        }
    }

    /// The scheduler stored everything up to `up_to_seq`: remember how far each run's lines
    /// are acknowledged, and forget the runs whose `RunExited` is.
    fn acknowledged(&self, up_to_seq: u64) {
        let mut acked_lines: HashMap<String, u64> = HashMap::new();
        for message in self.outbox.ack(up_to_seq) {
            if let Some(Body::LogBatch(batch)) = message.body {
                let top = batch.lines.iter().map(|l| l.seq).max().unwrap_or(0);
                let entry = acked_lines.entry(batch.run_id).or_default();
                *entry = (*entry).max(top);
            }
        }
        for (run_id, seq) in acked_lines {
            if let Err(error) = self.journal.run_dir(&run_id).write_acked(seq) {
                tracing::warn!(run_id = %run_id, %error, "recording acknowledged lines failed");
            }
        }
        let mut finished = Vec::new();
        self.runs().retain(|run_id, r| {
            let keep = r.exit_seq.is_none_or(|seq| seq > up_to_seq);
            if !keep {
                finished.push(run_id.clone());
            }
            keep
        });
        for run_id in finished {
            self.journal.remove(&run_id);
        }
    }

    /// Registers a run this process is responsible for; None if it already is.
    fn track(&self, run_id: &str, memory_mib: u64) -> Option<watch::Receiver<bool>> {
        let mut runs = self.runs();
        if runs.contains_key(run_id) {
            return None;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        runs.insert(
            run_id.to_string(),
            RunEntry {
                stop: stop_tx,
                memory_mib,
                exit_seq: None,
            },
        );
        Some(stop_rx)
    }

    /// Runs a supervisor; once it queued `RunExited` the run stays listed until that is
    /// acknowledged (then its journal goes too).
    fn spawn_supervisor(
        &self,
        run_id: String,
        supervisor: impl Future<Output = u64> + Send + 'static,
    ) {
        let outbox = self.outbox.clone();
        let registry = self.runs.clone();
        let journal = self.journal.clone();
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            let exit_seq = supervisor.await;
            runtime.release_image(&run_id);
            let mut runs = registry.lock().unwrap_or_else(|e| e.into_inner());
            if outbox.is_acked(exit_seq) {
                // The ack overtook us: the scheduler already has the exit.
                runs.remove(&run_id);
                drop(runs);
                journal.remove(&run_id);
            } else if let Some(entry) = runs.get_mut(&run_id) {
                entry.exit_seq = Some(exit_seq);
            }
        });
    }

    fn drop_stale_run(&self, run_id: String) {
        match self.runs().get(&run_id) {
            Some(entry) => {
                tracing::warn!(run_id = %run_id, "scheduler says run is stale; stopping it");
                entry.stop.send_replace(true);
            }
            None => {
                tracing::warn!(run_id = %run_id, "scheduler says run is stale; cleaning up");
                let runtime = self.runtime.clone();
                let journal = self.journal.clone();
                tokio::spawn(async move {
                    runtime.cleanup(&run_id).await;
                    journal.remove(&run_id);
                });
            }
        }
    }

    fn assign(&self, assign: AssignRun) {
        let run_id = assign.run_id.clone();
        let spec = assign.spec.unwrap_or_default();
        if let Some(ephemeral) = &self.config.ephemeral {
            if ephemeral.run_id != run_id {
                // The scheduler never sends one; refused like a draining node's, it goes back.
                tracing::warn!(run_id = %run_id, "one-shot node: refusing a run it was not started for");
                self.outbox.push(Body::RunExited(refused_while_draining(
                    run_id,
                    assign.lease_epoch,
                )));
                return;
            }
            self.took_ephemeral_run.store(true, Ordering::SeqCst);
        }
        if self.is_draining() {
            if self.runs().contains_key(&run_id) {
                tracing::debug!(run_id = %run_id, "duplicate assignment ignored");
            } else {
                tracing::info!(run_id = %run_id, "refusing an assignment: shutting down");
                self.outbox.push(Body::RunExited(refused_while_draining(
                    run_id,
                    assign.lease_epoch,
                )));
            }
            return;
        }
        let health = self.runtime.health().map(|h| *h.borrow());
        if let Some(h) = health.filter(|h| !h.takes_runs()) {
            if !self.runs().contains_key(&run_id) {
                let refusal = if h.reachable {
                    tracing::warn!(run_id = %run_id, "refusing an assignment: low on disk");
                    refused_low_disk(run_id, assign.lease_epoch)
                } else {
                    tracing::warn!(run_id = %run_id, "refusing an assignment: containerd is unreachable");
                    refused_engine_unreachable(run_id, assign.lease_epoch)
                };
                self.outbox.push(Body::RunExited(refusal));
                return;
            }
        }
        let Some(stop_rx) = self.track(&run_id, spec.memory_mib) else {
            tracing::debug!(run_id = %run_id, "duplicate assignment ignored");
            return;
        };
        self.runtime.hold_image(&run_id, &spec.image);
        tracing::info!(run_id = %run_id, image = %spec.image, lease_epoch = assign.lease_epoch, "run assigned");
        let settings = self.supervisor_settings();
        let assignment = Assignment {
            runner_id: assign.runner_id,
            run_id: run_id.clone(),
            lease_epoch: assign.lease_epoch,
            spec,
            trace_parent: (!assign.traceparent.is_empty()).then_some(assign.traceparent),
        };
        let supervisor = supervise(
            self.runtime.clone(),
            settings,
            self.journal.clone(),
            assignment,
            stop_rx,
            self.outbox.clone(),
        );
        self.spawn_supervisor(run_id, supervisor);
    }
}

/// How far a draining agent has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainState {
    /// Every run ended and every report was acknowledged.
    Reported,
    /// Every run ended (its exit is journaled), but no scheduler is connected to acknowledge.
    EndedUnreported,
    /// A run is still going, or a connected scheduler has yet to acknowledge reports.
    Busy,
}

/// How long no scheduler has answered, to log a warning now and then rather than on every try
/// (a try may come every 200 ms).
#[derive(Debug, Default)]
struct Outage {
    last_warned: Option<std::time::Instant>,
}

impl Outage {
    fn should_warn(&mut self) -> bool {
        let due = self
            .last_warned
            .is_none_or(|at| at.elapsed() >= OUTAGE_WARN_EVERY);
        if due {
            self.last_warned = Some(std::time::Instant::now());
        }
        due
    }
}

/// The next change of the engine's health; never resolves for an engine without one.
async fn health_changed(health: &mut Option<watch::Receiver<EngineHealth>>) -> EngineHealth {
    if let Some(h) = health {
        if h.changed().await.is_ok() {
            return *h.borrow_and_update();
        }
    }
    std::future::pending().await
}

/// The report for an assignment that arrives while containerd does not answer: the run never
/// started here, and `node_draining` makes the scheduler place it again (the agent registers
/// again once containerd is back, which makes the node take runs again).
fn refused_engine_unreachable(run_id: String, lease_epoch: u64) -> RunExited {
    RunExited {
        error_message:
            "containerd is unreachable on this node; it takes no runs until containerd answers again"
                .to_string(),
        ..refused_while_draining(run_id, lease_epoch)
    }
}

/// The report for an assignment that arrives while the disk containerd keeps the runs' files on
/// is below its reserve: the run never started here, and `node_draining` makes the scheduler
/// place it elsewhere (the agent registers again once space is back).
fn refused_low_disk(run_id: String, lease_epoch: u64) -> RunExited {
    RunExited {
        error_message: "this node is low on disk; it takes no runs until space is freed"
            .to_string(),
        ..refused_while_draining(run_id, lease_epoch)
    }
}

/// The report for an assignment that arrives while the agent shuts down: the run never started
/// here, so the scheduler can place it elsewhere.
fn refused_while_draining(run_id: String, lease_epoch: u64) -> RunExited {
    RunExited {
        run_id,
        lease_epoch,
        exit_code: -1,
        exited_at_unix_nanos: 0,
        reason: ExitReason::StartFailed as i32,
        error_code: error_code_to_pb(Some(ErrorCode::NodeDraining)).into(),
        error_message: "the node agent is shutting down and takes no new runs".to_string(),
        oom_killed: false,
        reported_at_unix_nanos: unix_nanos_now(),
        // Nothing was created: nothing to clean up.
        cleanup_pending: false,
    }
}

#[cfg(test)]
mod tests;
