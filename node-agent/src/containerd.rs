//! The real [`ContainerRuntime`]: containerd 1.6 over its gRPC socket, in the agent's own
//! namespace. Each run owns a lease `berth-run-<run id>` (protecting its snapshot and container
//! until cleanup), and a snapshot and container named by the run ID. The task's stdout and stderr
//! go to regular files the caller names (in the run's journal directory): the shim appends to
//! them itself, so nothing is lost while no agent process is alive to read (a FIFO would lose
//! what is buffered in it when the shim closes it at the task's exit).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use berth_proto::v1::RegistryAuth;
use containerd_client::services::v1::container::Runtime as ContainerRuntimeInfo;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    PrepareSnapshotRequest, RemoveSnapshotRequest, UsageRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, KillRequest,
    ListContainersRequest, ListRequest as ListLeasesRequest, StartRequest, WaitRequest,
};
use oci_spec::runtime::Spec;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::clock::{timestamp_nanos, unix_nanos_now};
use crate::image::cache::ImageCache;
use crate::image::content::SNAPSHOTTER;
use crate::image::progress::PullProgressState;
use crate::image::pull::Puller;
use crate::image::store::ContainerdImages;
use crate::network::cni::RunNetwork;
use crate::run::cgroup::Cgroups;
use crate::run::spec::join_network;
use crate::run::user::ImageAccounts;
use crate::runtime::{
    ContainerRuntime, Created, EngineHealth, ExitWatch, OutputFiles, PreparedImage, RuntimeError,
    StopSignal, TaskExit,
};

/// The shim every run uses.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The Any type URL containerd expects for an OCI runtime spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The type of containerd's runc shim options, as containerd 1.6 registers it.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

/// containerd's runc shim options (`containerd.runc.v1.Options`, a public wire format): only the
/// field Berth sets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuncOptions {
    /// The OCI runtime binary the shim runs instead of `runc`.
    #[prost(string, tag = "6")]
    pub binary_name: String,
}

/// Whether `spec` is a sandboxed run's (see [`crate::run::spec::ISOLATION_ANNOTATION`]).
pub fn is_sandboxed(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(crate::run::spec::ISOLATION_ANNOTATION))
        .is_some_and(|v| v == berth_core::Isolation::Sandbox.as_str())
}

/// Checks that `spec` joins a network namespace of its own by path (the one the agent attached),
/// not the agent's (the host's): gVisor moves the interfaces of the namespace it joins into the
/// sandbox.
pub fn own_network_namespace(spec: &Spec) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|n| {
            n.iter()
                .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .and_then(|ns| ns.path().clone())
        .ok_or("a sandboxed run needs the network namespace the agent attached")?;
    let ns = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let host = std::fs::metadata("/proc/self/ns/net").map_err(|e| format!("own netns: {e}"))?;
    if (ns.dev(), ns.ino()) == (host.dev(), host.ino()) {
        return Err(format!(
            "{} is the host's network namespace: a sandbox would take its interfaces",
            path.display()
        ));
    }
    Ok(())
}

/// Label put on every container the agent creates.
pub const RUN_ID_LABEL: &str = "berth.run-id";

/// Connection and layout settings.
#[derive(Debug, Clone)]
pub struct ContainerdSettings {
    pub namespace: String,
    pub cgroup_parent: String,
    /// The host's cgroups (normally under `/sys/fs/cgroup`), detected at start.
    pub cgroups: Cgroups,
    /// Free space kept in reserve on the filesystem of containerd's snapshots: below it the node
    /// takes no new runs (0: no reserve).
    pub min_free_disk_bytes: u64,
    /// Runs share containerd shims in groups (`--shim-group-size`); None: a shim per run.
    pub shim_groups: Option<Arc<crate::shim_groups::ShimGroups>>,
    /// The runsc wrapper sandboxed runs' shims run (see `oci_runtimes`); None: the node has
    /// no gVisor and refuses them.
    pub sandbox_binary: Option<std::path::PathBuf>,
}

/// Calls [`crate::shim_groups::ShimGroups::created`] for a run that joined a group, however
/// its creation ends.
struct Joined<'a>(Option<(&'a crate::shim_groups::ShimGroups, &'a str)>);

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        if let Some((groups, run_id)) = self.0 {
            groups.created(run_id);
        }
    }
}

pub struct ContainerdRuntime {
    channel: Channel,
    settings: ContainerdSettings,
    puller: Arc<Puller>,
    /// Each run's own connected network namespace; None: runs get a new, unconnected one.
    network: Option<Arc<dyn RunNetwork>>,
    /// Keeps the images within the disk budget (see `image_cache`); none: images stay.
    cache: Option<Arc<ImageCache<ContainerdImages>>>,
    /// Whether containerd answers (see [`ContainerdRuntime::spawn_health_probe`]).
    health: Arc<watch::Sender<EngineHealth>>,
    /// Each image's `/etc/passwd` and `/etc/group`, by image digest (an image never changes).
    accounts: Arc<std::sync::Mutex<HashMap<String, ImageAccounts>>>,
    /// containerd's `/tasks/oom` events seen for each container (run) of this namespace (see
    /// [`ContainerdRuntime::spawn_oom_watch`]).
    oom_events: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// Runs that started in a container of another id (a ready sandbox): run id → container
    /// id. Every other run's container id is its run id.
    containers: std::sync::Mutex<HashMap<String, String>>,
}

/// What the run's OOM kills were, from its cgroup's counter (None: the cgroup is gone or says
/// nothing) and the OOM events containerd published for it: the larger, since either may miss
/// one (the counter vanishes with the cgroup; an event may be lost while the agent was away).
pub fn merge_oom_counts(cgroup: Option<u64>, events: u64) -> Option<u64> {
    match cgroup {
        Some(count) => Some(count.max(events)),
        None => (events > 0).then_some(events),
    }
}

/// Images whose accounts are remembered; beyond this the memory starts over.
const ACCOUNTS_CACHED: usize = 256;
/// Upper bound for reading an image's accounts (a view, a mount, two small files).
const ACCOUNTS_LIMIT: Duration = Duration::from_secs(30);

/// Upper bound for attaching a run's network (plugins wait for the xtables lock).
const NETWORK_ATTACH_LIMIT: Duration = Duration::from_secs(60);

/// How often the health probe asks containerd whether it is there.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// A probe that gets no answer within this counts as containerd being unreachable. Generous: a
/// loaded containerd must not be taken for a dead one.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// The first and the longest wait between attempts to re-attach to a task's exit after
/// containerd went away.
const REATTACH_START: Duration = Duration::from_millis(100);
const REATTACH_MAX: Duration = Duration::from_secs(2);
/// How long containerd may stay unreachable before a run's exit watch gives up on the task.
const REATTACH_LIMIT: Duration = Duration::from_secs(600);
/// A `Wait` that lasted this long before it broke was attached: the next outage counts anew.
const ATTACHED_AFTER: Duration = Duration::from_secs(10);
/// How long a signal is retried while containerd is unreachable.
const KILL_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// What to do when a call about a task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskCallFailure {
    /// containerd went away or cannot be reached (restart, crash): wait for it and ask again.
    /// The shim outlives containerd and keeps the task and its exit status meanwhile.
    Retry,
    /// containerd answers but no longer knows the task, after it was unreachable: the task is
    /// really gone.
    Lost,
    /// Any other answer: the call failed.
    Failed,
}

/// Sorts a failed task call by its status code; `after_outage` when an earlier attempt failed
/// because containerd could not be reached.
fn classify_task_failure(code: Code, after_outage: bool) -> TaskCallFailure {
    match code {
        // Unavailable: no connection; Unknown and Cancelled: the connection broke mid-call.
        Code::Unavailable | Code::Unknown | Code::Cancelled => TaskCallFailure::Retry,
        Code::NotFound if after_outage => TaskCallFailure::Lost,
        _ => TaskCallFailure::Failed,
    }
}

fn reattach_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(REATTACH_START)
        .with_max_delay(REATTACH_MAX)
        .without_max_times()
        .build()
}

/// The span of a containerd call on a run's path (while traces are exported).
fn call(rpc: &'static str) -> tracing::Span {
    berth_core::telemetry::client_call("containerd", rpc)
}

fn namespaced<T>(namespace: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(ns) = namespace.parse() {
        request.metadata_mut().insert("containerd-namespace", ns);
    }
    request
}

/// Whether containerd answers a `Version` call in time.
async fn probe(channel: Channel) -> bool {
    let mut client = VersionClient::new(channel);
    matches!(
        tokio::time::timeout(PROBE_LIMIT, client.version(Request::new(()))).await,
        Ok(Ok(_))
    )
}

/// Where containerd's snapshotter keeps its snapshots (the runs' writable layers), from its
/// plugin's exports; None when containerd does not say.
async fn snapshotter_root(channel: Channel) -> Option<PathBuf> {
    let mut client =
        containerd_client::services::v1::introspection_client::IntrospectionClient::new(channel);
    let request = containerd_client::services::v1::PluginsRequest {
        filters: vec![format!(
            "type==io.containerd.snapshotter.v1,id=={SNAPSHOTTER}"
        )],
    };
    let answer = tokio::time::timeout(PROBE_LIMIT, client.plugins(Request::new(request)))
        .await
        .ok()?
        .ok()?
        .into_inner();
    answer
        .plugins
        .into_iter()
        .find_map(|p| p.exports.get("root").map(PathBuf::from))
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// Records whether the snapshots' filesystem is below its reserve; a low spell counts as an
/// outage (the node registers again once it is over, to take runs again).
fn record_disk(health: &watch::Sender<EngineHealth>, low: bool, free: u64, reserve: u64) {
    health.send_if_modified(|h| {
        if h.disk_low == low {
            return false;
        }
        h.disk_low = low;
        if low {
            h.outages += 1;
            tracing::warn!(
                free_mib = free / MIB,
                reserve_mib = reserve / MIB,
                "low on disk: taking no runs until space is freed"
            );
        } else {
            tracing::info!(
                free_mib = free / MIB,
                "disk space is back; taking runs again"
            );
        }
        true
    });
}

const MIB: u64 = 1024 * 1024;

/// Records whether containerd answered; counts the outages and logs the changes.
fn record_health(health: &watch::Sender<EngineHealth>, reachable: bool) {
    health.send_if_modified(|h| {
        if h.reachable == reachable {
            return false;
        }
        h.reachable = reachable;
        if reachable {
            tracing::info!(
                outages = h.outages,
                "containerd answers again; taking runs again"
            );
        } else {
            h.outages += 1;
            tracing::warn!(
                outages = h.outages,
                "containerd is unreachable; taking no runs until it answers again"
            );
        }
        true
    });
}

/// Waits for the exit of task `run_id`, re-attaching after containerd went away (restart,
/// crash) for as long as [`REATTACH_LIMIT`]: the task is watched again if it still exists, and
/// its ending is an error naming the loss if containerd came back without it.
async fn wait_for_exit(
    mut tasks: TasksClient<Channel>,
    namespace: String,
    run_id: String,
) -> Result<TaskExit, RuntimeError> {
    let mut backoff = reattach_backoff();
    let mut outage_since: Option<Instant> = None;
    loop {
        let attempt = Instant::now();
        let status = match tasks
            .wait(namespaced(
                &namespace,
                WaitRequest {
                    container_id: run_id.clone(),
                    exec_id: String::new(),
                },
            ))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if outage_since.is_some() {
                    tracing::info!(run_id, "re-attached to the task after containerd came back");
                }
                let exited_at_unix_nanos = r
                    .exited_at
                    .as_ref()
                    .map(timestamp_nanos)
                    .unwrap_or_else(unix_nanos_now);
                tracing::debug!(
                    run_id,
                    after_exit_us = (unix_nanos_now() - exited_at_unix_nanos) / 1_000,
                    "Tasks.Wait returned"
                );
                return Ok(TaskExit {
                    exit_status: r.exit_status,
                    exited_at_unix_nanos,
                });
            }
            Err(status) => status,
        };
        if attempt.elapsed() >= ATTACHED_AFTER {
            outage_since = None;
            backoff = reattach_backoff();
        }
        match classify_task_failure(status.code(), outage_since.is_some()) {
            TaskCallFailure::Retry => {
                let since = *outage_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= REATTACH_LIMIT {
                    return Err(RuntimeError::Task {
                        operation: "Tasks.Wait",
                        message: format!(
                            "containerd has been unreachable for {} s; giving up on the task: {}",
                            since.elapsed().as_secs(),
                            status.message()
                        ),
                    });
                }
                let delay = backoff.next().unwrap_or(REATTACH_MAX);
                tracing::warn!(
                    run_id,
                    code = ?status.code(),
                    error = %status.message(),
                    retry_ms = delay.as_millis() as u64,
                    "lost the task's exit watch (containerd unreachable?); re-attaching"
                );
                tokio::time::sleep(delay).await;
            }
            TaskCallFailure::Lost => {
                return Err(RuntimeError::Task {
                    operation: "re-attaching to the task after containerd was unreachable",
                    message: format!(
                        "containerd lost the task (its shim is gone): {}",
                        status.message()
                    ),
                })
            }
            TaskCallFailure::Failed => return Err(task_error("Tasks.Wait")(status)),
        }
    }
}

const LEASE_PREFIX: &str = "berth-run-";

fn lease_id(run_id: &str) -> String {
    format!("{LEASE_PREFIX}{run_id}")
}

fn task_error(operation: &'static str) -> impl FnOnce(Status) -> RuntimeError {
    move |status| RuntimeError::Task {
        operation,
        message: status.message().to_string(),
    }
}

fn ignore_not_found(result: Result<(), Status>) -> Result<(), Status> {
    match result {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        other => other,
    }
}

/// Records a cleanup call's failure under `what`; "already gone" is not a failure.
fn record_cleanup<T>(
    failures: &mut Vec<String>,
    what: &str,
    result: Result<tonic::Response<T>, Status>,
) {
    if let Err(status) = ignore_not_found(result.map(|_| ())) {
        failures.push(format!("{what}: {}", status.message()));
    }
}

impl ContainerdRuntime {
    pub fn new(
        channel: Channel,
        settings: ContainerdSettings,
        puller: Arc<Puller>,
        network: Option<Arc<dyn RunNetwork>>,
    ) -> Self {
        Self {
            channel,
            settings,
            puller,
            network,
            cache: None,
            health: Arc::new(watch::Sender::new(EngineHealth::default())),
            accounts: Arc::default(),
            oom_events: Arc::default(),
            containers: std::sync::Mutex::default(),
        }
    }

    /// The id of the container `run_id` runs in.
    fn container_of(&self, run_id: &str) -> String {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(run_id)
            .cloned()
            .unwrap_or_else(|| run_id.to_owned())
    }

    /// Follows containerd's `/tasks/oom` events for this namespace for the agent's life (and
    /// subscribes again after containerd restarts), counting them per container.
    pub fn spawn_oom_watch(&self) {
        let channel = self.channel.clone();
        let namespace = self.settings.namespace.clone();
        let counts = self.oom_events.clone();
        tokio::spawn(async move {
            loop {
                let mut client = containerd_client::services::v1::events_client::EventsClient::new(
                    channel.clone(),
                );
                let request = containerd_client::services::v1::SubscribeRequest {
                    filters: vec![format!(r#"topic=="/tasks/oom",namespace=="{namespace}""#)],
                };
                if let Ok(answer) = client.subscribe(Request::new(request)).await {
                    let mut stream = answer.into_inner();
                    while let Ok(Some(envelope)) = stream.message().await {
                        let Some(event) = envelope.event else {
                            continue;
                        };
                        let Ok(oom) =
                            <containerd_client::events::TaskOom as prost::Message>::decode(
                                event.value.as_slice(),
                            )
                        else {
                            continue;
                        };
                        tracing::info!(run_id = %oom.container_id, "containerd reported an OOM kill");
                        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                        *counts.entry(oom.container_id).or_default() += 1;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Reads the image's accounts through a read-only view of its top layer, under a lease of
    /// its own (so containerd's GC leaves the view alone, and takes both if the agent dies
    /// meanwhile: the lease expires after 5 minutes); both are removed afterwards.
    async fn read_image_accounts(
        &self,
        image: &PreparedImage,
    ) -> Result<ImageAccounts, RuntimeError> {
        let failed = |what: &str, message: String| {
            RuntimeError::Create(format!(
                "reading the image's /etc/passwd and /etc/group: {what}: {message}"
            ))
        };
        let id = format!("berth-view-{}", uuid::Uuid::new_v4());
        // Expiring: if this agent dies mid-read, containerd's GC takes the lease and the view.
        let labels = crate::image::content::expiring_lease_labels(Duration::from_secs(300));
        LeasesClient::new(self.channel.clone())
            .create(self.request(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(|s| failed("Leases.Create", s.message().to_owned()))?;
        let viewed = SnapshotsClient::new(self.channel.clone())
            .view(self.request(
                ViewSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: id.clone(),
                    parent: image.top_chain_id.clone(),
                    labels: HashMap::new(),
                },
                Some(&id),
            ))
            .await;
        let read = match viewed {
            Ok(view) => {
                let mounts = view.into_inner().mounts;
                let scratch = std::env::temp_dir().join("berth-image-views");
                match tokio::task::spawn_blocking(move || {
                    crate::image::accounts::read_accounts(&mounts, &scratch)
                })
                .await
                {
                    Ok(Ok(accounts)) => Ok(accounts),
                    Ok(Err(e)) => Err(failed("reading the view", e.to_string())),
                    Err(e) => Err(failed("reading the view", e.to_string())),
                }
            }
            Err(s) => Err(failed("Snapshots.View", s.message().to_owned())),
        };
        let removed = SnapshotsClient::new(self.channel.clone())
            .remove(self.request(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: id.clone(),
                },
                None,
            ))
            .await;
        if let Err(s) = removed {
            if s.code() != Code::NotFound {
                tracing::warn!(view = %id, error = %s.message(), "removing an image view failed");
            }
        }
        let deleted = LeasesClient::new(self.channel.clone())
            .delete(self.request(
                DeleteLeaseRequest {
                    id: id.clone(),
                    sync: false,
                },
                None,
            ))
            .await;
        if let Err(s) = deleted {
            tracing::warn!(lease = %id, error = %s.message(), "deleting an image view's lease failed");
        }
        read
    }

    /// Asks containerd every [`HEALTH_EVERY`] whether it answers, for [`ContainerRuntime::health`].
    pub fn spawn_health_probe(&self) {
        let channel = self.channel.clone();
        let health = self.health.clone();
        let reserve = self.settings.min_free_disk_bytes;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEALTH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut root: Option<PathBuf> = None;
            loop {
                every.tick().await;
                let reachable = probe(channel.clone()).await;
                record_health(&health, reachable);
                if reserve == 0 {
                    continue;
                }
                if root.is_none() && reachable {
                    root = snapshotter_root(channel.clone()).await;
                    if let Some(r) = &root {
                        tracing::info!(root = %r.display(), reserve_mib = reserve / MIB, "watching the free space of containerd's snapshots");
                    }
                }
                if let Some(free) = root.as_deref().and_then(free_bytes) {
                    record_disk(&health, free < reserve, free, reserve);
                }
            }
        });
    }

    /// The spec the container gets: `spec`, joined to the run's network when runs have one.
    async fn networked_spec(&self, run_id: &str, spec: &Spec) -> Result<Spec, RuntimeError> {
        let mut spec = spec.clone();
        let Some(network) = self.network.clone() else {
            return Ok(spec);
        };
        let id = run_id.to_string();
        let attach = tokio::task::spawn_blocking(move || network.attach(&id));
        let attachment = match tokio::time::timeout(NETWORK_ATTACH_LIMIT, attach).await {
            Ok(Ok(Ok(attachment))) => attachment,
            Ok(Ok(Err(error))) => return Err(RuntimeError::Network(error.to_string())),
            Ok(Err(join)) => return Err(RuntimeError::Network(join.to_string())),
            Err(_) => {
                return Err(RuntimeError::Network(
                    "attaching the network timed out".to_string(),
                ))
            }
        };
        tracing::info!(run_id, address = ?attachment.address, netns = %attachment.netns.display(), "run network attached");
        join_network(&mut spec, &attachment);
        Ok(spec)
    }

    /// Detaches the run's network (address, veth, masquerading, namespace).
    async fn detach_network(&self, run_id: &str) -> Option<String> {
        let network = self.network.clone()?;
        let id = run_id.to_string();
        match tokio::task::spawn_blocking(move || network.detach(&id)).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(format!("network: {error}")),
            Err(join) => Some(format!("network: {join}")),
        }
    }

    /// Lets `cache` track image use and evict images beyond its budget.
    pub fn with_image_cache(mut self, cache: Arc<ImageCache<ContainerdImages>>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// A call in the agent's namespace (and `lease`), part of the current span's trace.
    fn request<T>(&self, message: T, lease: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        berth_core::telemetry::inject(request.metadata_mut());
        if let Ok(ns) = self.settings.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(lease) = lease.and_then(|l| l.parse().ok()) {
            request.metadata_mut().insert("containerd-lease", lease);
        }
        request
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    async fn create_inner(
        &self,
        run_id: &str,
        image: &PreparedImage,
        spec: &Spec,
        output: &OutputFiles,
    ) -> Result<Created, RuntimeError> {
        let create_err = |what: &str, status: Status| {
            RuntimeError::Create(format!("{what}: {}", status.message()))
        };
        // A sandboxed run's shim runs gVisor (the node's runsc wrapper) instead of runc.
        let runtime_options = if is_sandboxed(spec) {
            let binary = self.settings.sandbox_binary.as_ref().ok_or_else(|| {
                RuntimeError::Create("the run is sandboxed and this node has no gVisor".into())
            })?;
            Some(prost_types::Any {
                type_url: RUNC_OPTIONS_TYPE_URL.to_owned(),
                value: prost::Message::encode_to_vec(&RuncOptions {
                    binary_name: binary.display().to_string(),
                }),
            })
        } else {
            None
        };
        let mut spec = self
            .networked_spec(run_id, spec)
            .instrument(berth_core::telemetry::step("network attach"))
            .await?;
        if runtime_options.is_some() && self.network.is_some() {
            // gVisor takes over the interfaces of the namespace it joins: never the host's.
            own_network_namespace(&spec).map_err(RuntimeError::Network)?;
        }
        // Each sandbox is its own gVisor kernel: sandboxed runs share no shim.
        let groups = self
            .settings
            .shim_groups
            .as_deref()
            .filter(|_| runtime_options.is_none());
        let _joined = Joined(groups.map(|g| (g, run_id)));
        if let Some(groups) = groups {
            let group = groups.join(run_id);
            tracing::debug!(run_id, group = %group, "run joins a shim group");
            let mut annotations = spec.annotations().clone().unwrap_or_default();
            annotations.insert(crate::shim_groups::GROUP_ANNOTATION.to_owned(), group);
            spec.set_annotations(Some(annotations));
        }
        let spec = &spec;
        let created = Created {
            network_ready_at_unix_nanos: if self.network.is_some() {
                unix_nanos_now()
            } else {
                0
            },
        };
        let lease = lease_id(run_id);
        LeasesClient::new(self.channel.clone())
            .create(self.request(
                CreateLeaseRequest {
                    id: lease.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .instrument(call("Leases.Create"))
            .await
            .or_else(|s| {
                if s.code() == Code::AlreadyExists {
                    Ok(tonic::Response::new(Default::default()))
                } else {
                    Err(s)
                }
            })
            .map_err(|s| create_err("Leases.Create", s))?;
        let mounts = SnapshotsClient::new(self.channel.clone())
            .prepare(self.request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: run_id.to_string(),
                    parent: image.top_chain_id.clone(),
                    labels: HashMap::new(),
                },
                Some(&lease),
            ))
            .instrument(call("Snapshots.Prepare"))
            .await
            .map_err(|s| create_err("Snapshots.Prepare", s))?
            .into_inner()
            .mounts;
        let spec_json = serde_json::to_vec(spec)
            .map_err(|e| RuntimeError::Create(format!("serialising the spec: {e}")))?;
        let mut labels = HashMap::new();
        labels.insert(RUN_ID_LABEL.to_string(), run_id.to_string());
        ContainersClient::new(self.channel.clone())
            .create(self.request(
                CreateContainerRequest {
                    container: Some(Container {
                        id: run_id.to_string(),
                        labels,
                        image: String::new(),
                        runtime: Some(ContainerRuntimeInfo {
                            name: RUNC_RUNTIME.to_string(),
                            options: runtime_options,
                        }),
                        spec: Some(prost_types::Any {
                            type_url: SPEC_TYPE_URL.to_string(),
                            value: spec_json,
                        }),
                        snapshotter: SNAPSHOTTER.to_string(),
                        snapshot_key: run_id.to_string(),
                        created_at: None,
                        updated_at: None,
                        extensions: HashMap::new(),
                        sandbox: String::new(),
                    }),
                },
                Some(&lease),
            ))
            .instrument(call("Containers.Create"))
            .await
            .map_err(|s| create_err("Containers.Create", s))?;

        self.tasks()
            .create(self.request(
                CreateTaskRequest {
                    container_id: run_id.to_string(),
                    rootfs: mounts,
                    stdin: String::new(),
                    stdout: output.stdout.display().to_string(),
                    stderr: output.stderr.display().to_string(),
                    terminal: false,
                    checkpoint: None,
                    options: None,
                    runtime_path: String::new(),
                },
                Some(&lease),
            ))
            .instrument(call("Tasks.Create"))
            .await
            .map_err(|s| create_err("Tasks.Create", s))?;
        Ok(created)
    }

    /// Takes the run out of its shim group before its task is deleted, and waits until no run
    /// that joined the group is still being created (see `shim_groups`).
    async fn leave_shim_group(&self, run_id: &str) {
        let Some(groups) = self.settings.shim_groups.as_deref() else {
            return;
        };
        if let Some(group) = groups.leave(run_id) {
            groups.quiet(&group).await;
        }
    }

    async fn remove_everything(&self, run_id: &str) -> Vec<String> {
        let mut failures = Vec::new();
        let mut tasks = self.tasks();
        // A task may still run (stale run, failed start): kill it and give it a moment.
        let killed = tasks
            .kill(self.request(
                KillRequest {
                    container_id: run_id.to_string(),
                    exec_id: String::new(),
                    signal: StopSignal::Kill.number(),
                    all: true,
                },
                None,
            ))
            .await;
        if killed.is_ok() {
            let wait = tasks.wait(self.request(
                WaitRequest {
                    container_id: run_id.to_string(),
                    exec_id: String::new(),
                },
                None,
            ));
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
        self.leave_shim_group(run_id).await;
        let result = tasks
            .delete(self.request(
                DeleteTaskRequest {
                    container_id: run_id.to_string(),
                },
                None,
            ))
            .await;
        record_cleanup(&mut failures, "Tasks.Delete", result);
        let result = ContainersClient::new(self.channel.clone())
            .delete(self.request(
                DeleteContainerRequest {
                    id: run_id.to_string(),
                },
                None,
            ))
            .await;
        record_cleanup(&mut failures, "Containers.Delete", result);
        let result = SnapshotsClient::new(self.channel.clone())
            .remove(self.request(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: run_id.to_string(),
                },
                None,
            ))
            .await;
        record_cleanup(&mut failures, "Snapshots.Remove", result);
        let result = LeasesClient::new(self.channel.clone())
            .delete(self.request(
                DeleteLeaseRequest {
                    id: lease_id(run_id),
                    sync: false,
                },
                None,
            ))
            .await;
        record_cleanup(&mut failures, "Leases.Delete", result);
        let (cgroups, parent, id) = (
            self.settings.cgroups.clone(),
            self.settings.cgroup_parent.clone(),
            run_id.to_string(),
        );
        // Blocking: a busy directory is retried with sleeps.
        match tokio::task::spawn_blocking(move || cgroups.remove(&parent, &id)).await {
            Ok(removal) => failures.extend(
                removal
                    .into_iter()
                    .map(|error| format!("removing cgroup {error}")),
            ),
            Err(error) => failures.push(format!("removing cgroups: {error}")),
        }
        // Last: the task is gone, so nothing uses the namespace any more.
        failures.extend(self.detach_network(run_id).await);
        failures
    }
}

impl ContainerRuntime for ContainerdRuntime {
    fn cached_images(&self) -> Vec<String> {
        self.puller.cached()
    }

    async fn image_accounts(&self, image: &PreparedImage) -> Result<ImageAccounts, RuntimeError> {
        let remembered = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&image.digest)
            .cloned();
        if let Some(accounts) = remembered {
            return Ok(accounts);
        }
        let accounts = tokio::time::timeout(ACCOUNTS_LIMIT, self.read_image_accounts(image))
            .await
            .map_err(|_| {
                RuntimeError::Create(
                    "reading the image's /etc/passwd and /etc/group timed out".to_owned(),
                )
            })??;
        let mut cache = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= ACCOUNTS_CACHED {
            cache.clear();
        }
        cache.insert(image.digest.clone(), accounts.clone());
        Ok(accounts)
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PreparedImage, RuntimeError> {
        // The pull runs in its own task so a run that is stopped mid-pull does not cut it off
        // (other runs may wait on it, and its lease must be deleted).
        let puller = self.puller.clone();
        let owned = image.to_string();
        let auth = auth.cloned();
        let cache = self.cache.clone();
        let joined = tokio::spawn(async move {
            let pulled = puller.pull_noting_age(&owned, auth.as_ref()).await;
            if let (Ok(_), Some(cache)) = (&pulled, cache) {
                // Off the run's path: the run holds the image anyway.
                let image = owned.clone();
                tokio::spawn(async move { cache.used(&image).await });
            }
            if let Ok((_, true)) = &pulled {
                // Renewed before it expires: the next run does not wait for the registry.
                let image = owned.clone();
                tokio::spawn(async move { puller.refresh(&image, auth.as_ref()).await });
            }
            pulled.map(|(image, _)| image)
        })
        .await;
        match joined {
            Ok(Ok(prepared)) => Ok(prepared),
            Ok(Err(error)) => Err(RuntimeError::ImagePull {
                image: image.to_string(),
                message: error.to_string(),
            }),
            Err(join) => Err(RuntimeError::ImagePull {
                image: image.to_string(),
                message: format!("pull task failed: {join}"),
            }),
        }
    }

    async fn create(
        &self,
        run_id: &str,
        image: &PreparedImage,
        spec: &Spec,
        output: &OutputFiles,
    ) -> Result<Created, RuntimeError> {
        self.create_inner(run_id, image, spec, output).await
    }

    async fn watch_exit(&self, run_id: &str) -> Result<ExitWatch, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        let wait = wait_for_exit(
            self.tasks(),
            self.settings.namespace.clone(),
            self.container_of(run_id),
        );
        tokio::spawn(async move {
            let _ = tx.send(wait.await);
        });
        Ok(rx)
    }

    async fn start(&self, run_id: &str) -> Result<i64, RuntimeError> {
        let container_id = self.container_of(run_id);
        let asked_at = unix_nanos_now();
        self.tasks()
            .start(self.request(
                StartRequest {
                    container_id,
                    exec_id: String::new(),
                },
                None,
            ))
            .instrument(call("Tasks.Start"))
            .await
            .map_err(|s| RuntimeError::Start(s.message().to_string()))?;
        Ok(asked_at)
    }

    async fn kill(&self, run_id: &str, signal: StopSignal, all: bool) -> Result<(), RuntimeError> {
        let mut backoff = reattach_backoff();
        let first = Instant::now();
        let container_id = self.container_of(run_id);
        loop {
            let result = self
                .tasks()
                .kill(self.request(
                    KillRequest {
                        container_id: container_id.clone(),
                        exec_id: String::new(),
                        signal: signal.number(),
                        all,
                    },
                    None,
                ))
                .await
                .map(|_| ());
            let status = match ignore_not_found(result) {
                Ok(()) => return Ok(()),
                Err(status) => status,
            };
            let retry = classify_task_failure(status.code(), false) == TaskCallFailure::Retry;
            if !retry || first.elapsed() >= KILL_RETRY_LIMIT {
                return Err(task_error("Tasks.Kill")(status));
            }
            let delay = backoff.next().unwrap_or(REATTACH_MAX);
            tracing::warn!(run_id, error = %status.message(), retry_ms = delay.as_millis() as u64, "containerd unreachable; retrying the signal");
            tokio::time::sleep(delay).await;
        }
    }

    /// containerd's `Snapshots.Usage` of the run's active snapshot: the size of its upper
    /// directory (containerd walks it; bounded by [`PROBE_LIMIT`]).
    async fn writable_bytes(&self, run_id: &str) -> Option<u64> {
        let mut client = SnapshotsClient::new(self.channel.clone());
        let usage = client.usage(self.request(
            UsageRequest {
                snapshotter: SNAPSHOTTER.to_string(),
                key: self.container_of(run_id),
            },
            None,
        ));
        let answer = tokio::time::timeout(PROBE_LIMIT, usage).await.ok()?.ok()?;
        u64::try_from(answer.into_inner().size).ok()
    }

    async fn ping(&self) -> Result<String, String> {
        if probe(self.channel.clone()).await {
            Ok("containerd answers".to_owned())
        } else {
            Err(format!(
                "containerd does not answer a Version call within {} s",
                PROBE_LIMIT.as_secs()
            ))
        }
    }

    fn usage(&self, run_id: &str) -> Option<crate::run::cgroup::RunUsage> {
        let container_id = self.container_of(run_id);
        self.settings
            .cgroups
            .usage(&self.settings.cgroup_parent, &container_id)
    }

    fn oom_kills(&self, run_id: &str) -> Option<u64> {
        let container_id = self.container_of(run_id);
        let cgroup = self
            .settings
            .cgroups
            .oom_kills(&self.settings.cgroup_parent, &container_id);
        let events = self
            .oom_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&container_id)
            .copied()
            .unwrap_or(0);
        merge_oom_counts(cgroup, events)
    }

    async fn delete_task(&self, run_id: &str) -> Result<(), RuntimeError> {
        let container_id = self.container_of(run_id);
        self.leave_shim_group(&container_id).await;
        let result = self
            .tasks()
            .delete(self.request(DeleteTaskRequest { container_id }, None))
            .await
            .map(|_| ());
        ignore_not_found(result).map_err(task_error("Tasks.Delete"))
    }

    async fn cleanup(&self, run_id: &str) {
        let container_id = self.container_of(run_id);
        self.oom_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&container_id);
        let failures = self.remove_everything(&container_id).await;
        if failures.is_empty() {
            tracing::debug!(run_id, container_id, "run cleaned up");
        } else {
            tracing::warn!(
                run_id,
                container_id,
                ?failures,
                "cleanup left something behind"
            );
        }
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
    }

    fn use_container(&self, run_id: &str, container_id: &str) {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_id.to_owned(), container_id.to_owned());
    }

    async fn check_reachable(&self) -> bool {
        let reachable = probe(self.channel.clone()).await;
        record_health(&self.health, reachable);
        reachable
    }

    fn health(&self) -> Option<watch::Receiver<EngineHealth>> {
        Some(self.health.subscribe())
    }

    fn watch_pull(&self, image: &str) -> Option<watch::Receiver<PullProgressState>> {
        Some(self.puller.watch_progress(image))
    }

    fn hold_image(&self, run_id: &str, image: &str) {
        if let Some(cache) = &self.cache {
            cache.hold(run_id, image);
        }
    }

    fn release_image(&self, run_id: &str) {
        if let Some(cache) = &self.cache {
            cache.release(run_id);
        }
    }

    fn set_warm_pins(&self, images: &[String]) {
        if let Some(cache) = &self.cache {
            cache.set_pins(images);
        }
    }

    async fn list_containers(&self) -> Result<Vec<String>, RuntimeError> {
        let containers = ContainersClient::new(self.channel.clone())
            .list(self.request(ListContainersRequest { filters: vec![] }, None))
            .await
            .map_err(task_error("Containers.List"))?
            .into_inner()
            .containers;
        let mut ids: Vec<String> = containers.into_iter().map(|c| c.id).collect();
        // A lease without a container: the agent died between taking the lease (and preparing
        // the snapshot) and creating the container — a run, or a sandbox, which has no journal.
        let leases = LeasesClient::new(self.channel.clone())
            .list(self.request(ListLeasesRequest { filters: vec![] }, None))
            .await
            .map_err(task_error("Leases.List"))?
            .into_inner()
            .leases;
        for lease in leases {
            if let Some(id) = lease.id.strip_prefix(LEASE_PREFIX) {
                if !ids.iter().any(|c| c == id) {
                    ids.push(id.to_owned());
                }
            }
        }
        Ok(ids)
    }

    fn prepare_ahead(&self) {
        if let Some(network) = &self.network {
            network.prepare_ahead();
        }
    }

    fn release_ahead(&self) {
        if let Some(network) = &self.network {
            network.release_ahead();
        }
    }

    fn list_networks(&self) -> Vec<String> {
        self.network
            .as_ref()
            .map(|n| n.attached_runs())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_joining(path: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        let mut ns = oci_spec::runtime::LinuxNamespace::default();
        ns.set_typ(oci_spec::runtime::LinuxNamespaceType::Network);
        ns.set_path(path.map(std::path::PathBuf::from));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_namespaces(Some(vec![ns]));
        spec.set_linux(Some(linux));
        spec
    }

    #[test]
    fn a_sandbox_joins_only_a_network_namespace_of_its_own() {
        let host = own_network_namespace(&spec_joining(Some("/proc/self/ns/net")))
            .expect_err("the host's");
        assert!(host.contains("host's network namespace"), "{host}");
        let unnamed = own_network_namespace(&spec_joining(None)).expect_err("no path");
        assert!(unnamed.contains("needs the network namespace"), "{unnamed}");
        // Another process's namespace: here pid 1's is the host's too, so make a real one.
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "5"])
            .spawn()
            .expect("unshare");
        let path = format!("/proc/{}/ns/net", child.id());
        // unshare execs sleep once the namespace exists.
        let mut own = Err(String::new());
        for _ in 0..50 {
            own = own_network_namespace(&spec_joining(Some(&path)));
            if own.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(own, Ok(()));
        assert!(is_sandboxed(&{
            let mut s = Spec::default();
            s.set_annotations(Some(
                [(
                    crate::run::spec::ISOLATION_ANNOTATION.to_owned(),
                    "sandbox".to_owned(),
                )]
                .into(),
            ));
            s
        }));
        assert!(!is_sandboxed(&Spec::default()));
    }

    #[test]
    fn a_broken_connection_is_retried_and_a_task_missing_afterwards_is_lost() {
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled] {
            assert_eq!(classify_task_failure(code, false), TaskCallFailure::Retry);
            assert_eq!(classify_task_failure(code, true), TaskCallFailure::Retry);
        }
        assert_eq!(
            classify_task_failure(Code::NotFound, true),
            TaskCallFailure::Lost
        );
        assert_eq!(
            classify_task_failure(Code::NotFound, false),
            TaskCallFailure::Failed,
            "no outage: a missing task is an ordinary failure"
        );
        assert_eq!(
            classify_task_failure(Code::FailedPrecondition, true),
            TaskCallFailure::Failed
        );
    }

    #[test]
    fn health_counts_outages_once_each() {
        let health = watch::Sender::new(EngineHealth::default());
        let seen = health.subscribe();
        record_health(&health, true);
        assert!(!seen.has_changed().unwrap_or(true), "no change, no news");
        record_health(&health, false);
        record_health(&health, false);
        assert_eq!(
            *health.borrow(),
            EngineHealth {
                reachable: false,
                outages: 1,
                disk_low: false,
            }
        );
        record_health(&health, true);
        record_health(&health, false);
        assert_eq!(health.borrow().outages, 2);
    }

    #[test]
    fn oom_kills_are_the_larger_of_the_cgroup_counter_and_the_events() {
        assert_eq!(merge_oom_counts(None, 0), None);
        assert_eq!(
            merge_oom_counts(None, 1),
            Some(1),
            "the cgroup is gone: the event tells"
        );
        assert_eq!(merge_oom_counts(Some(0), 0), Some(0));
        assert_eq!(merge_oom_counts(Some(2), 1), Some(2));
        assert_eq!(
            merge_oom_counts(Some(0), 1),
            Some(1),
            "the counter missed it"
        );
    }

    /// A spell of low disk stops the node taking runs and counts as an outage (so the agent
    /// registers again when it is over); only changes are news.
    #[test]
    fn low_disk_stops_taking_runs_and_counts_as_an_outage() {
        let health = watch::Sender::new(EngineHealth::default());
        let seen = health.subscribe();
        record_disk(&health, false, 10 << 30, 1 << 30);
        assert!(!seen.has_changed().unwrap_or(true), "no change, no news");
        record_disk(&health, true, 100 << 20, 1 << 30);
        record_disk(&health, true, 90 << 20, 1 << 30);
        let now = *health.borrow();
        assert!(now.disk_low && now.reachable && !now.takes_runs());
        assert_eq!(now.outages, 1);
        record_disk(&health, false, 5 << 30, 1 << 30);
        assert!(health.borrow().takes_runs());
        assert!(free_bytes(std::path::Path::new("/")).is_some_and(|b| b > 0));
    }
}
