//! The real [`ContainerRuntime`]: containerd 1.6 over its gRPC socket, in the agent's own
//! namespace. Each run owns a lease `berth-run-<run id>` (protecting its snapshot and container
//! until cleanup), and a snapshot and container named by the run ID. The task's stdout and stderr
//! go to regular files the caller names (in the run's journal directory): the shim appends to
//! them itself, so nothing is lost while no agent process is alive to read (a FIFO would lose
//! what is buffered in it when the shim closes it at the task's exit).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::RegistryAuth;
use containerd_client::services::v1::container::Runtime as ContainerRuntimeInfo;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, KillRequest,
    ListContainersRequest, StartRequest, WaitRequest,
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
use crate::run::cgroup::{read_oom_kills, remove_run_cgroups};
use crate::run::spec::join_network;
use crate::runtime::{
    ContainerRuntime, ExitWatch, OutputFiles, PreparedImage, RuntimeError, StopSignal, TaskExit,
};

/// The shim every run uses.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The Any type URL containerd expects for an OCI runtime spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Label put on every container the agent creates.
pub const RUN_ID_LABEL: &str = "berth.run-id";

/// Connection and layout settings.
#[derive(Debug, Clone)]
pub struct ContainerdSettings {
    pub namespace: String,
    pub cgroup_parent: String,
    /// Normally `/sys/fs/cgroup`; tests may point it elsewhere.
    pub cgroup_root: PathBuf,
}

pub struct ContainerdRuntime {
    channel: Channel,
    settings: ContainerdSettings,
    puller: Arc<Puller>,
    /// Each run's own connected network namespace; None: runs get a new, unconnected one.
    network: Option<Arc<dyn RunNetwork>>,
    /// Keeps the images within the disk budget (see `image_cache`); none: images stay.
    cache: Option<Arc<ImageCache<ContainerdImages>>>,
}

/// Upper bound for attaching a run's network (plugins wait for the xtables lock).
const NETWORK_ATTACH_LIMIT: Duration = Duration::from_secs(60);

fn lease_id(run_id: &str) -> String {
    format!("berth-run-{run_id}")
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
        }
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

    fn request<T>(&self, message: T, lease: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
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
    ) -> Result<(), RuntimeError> {
        let create_err = |what: &str, status: Status| {
            RuntimeError::Create(format!("{what}: {}", status.message()))
        };
        let spec = &self.networked_spec(run_id, spec).await?;
        let lease = lease_id(run_id);
        LeasesClient::new(self.channel.clone())
            .create(self.request(
                CreateLeaseRequest {
                    id: lease.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
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
                            options: None,
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
            .await
            .map_err(|s| create_err("Tasks.Create", s))?;
        Ok(())
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
        for (path, error) in remove_run_cgroups(
            &self.settings.cgroup_root,
            &self.settings.cgroup_parent,
            run_id,
        ) {
            failures.push(format!("removing cgroup {path}: {error}"));
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
            let pulled = puller.pull(&owned, auth.as_ref()).await;
            if let (Ok(_), Some(cache)) = (&pulled, cache) {
                // Off the run's path: the run holds the image anyway.
                let image = owned.clone();
                tokio::spawn(async move { cache.used(&image).await });
            }
            pulled
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
    ) -> Result<(), RuntimeError> {
        self.create_inner(run_id, image, spec, output).await
    }

    async fn watch_exit(&self, run_id: &str) -> Result<ExitWatch, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        let mut tasks = self.tasks();
        let request = self.request(
            WaitRequest {
                container_id: run_id.to_string(),
                exec_id: String::new(),
            },
            None,
        );
        tokio::spawn(async move {
            let result = tasks
                .wait(request)
                .await
                .map(|r| {
                    let r = r.into_inner();
                    TaskExit {
                        exit_status: r.exit_status,
                        exited_at_unix_nanos: r
                            .exited_at
                            .as_ref()
                            .map(timestamp_nanos)
                            .unwrap_or_else(unix_nanos_now),
                    }
                })
                .map_err(task_error("Tasks.Wait"));
            let _ = tx.send(result);
        });
        Ok(rx)
    }

    async fn start(&self, run_id: &str) -> Result<i64, RuntimeError> {
        self.tasks()
            .start(self.request(
                StartRequest {
                    container_id: run_id.to_string(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(|s| RuntimeError::Start(s.message().to_string()))?;
        Ok(unix_nanos_now())
    }

    async fn kill(&self, run_id: &str, signal: StopSignal, all: bool) -> Result<(), RuntimeError> {
        let result = self
            .tasks()
            .kill(self.request(
                KillRequest {
                    container_id: run_id.to_string(),
                    exec_id: String::new(),
                    signal: signal.number(),
                    all,
                },
                None,
            ))
            .await
            .map(|_| ());
        ignore_not_found(result).map_err(task_error("Tasks.Kill"))
    }

    fn oom_kills(&self, run_id: &str) -> Option<u64> {
        read_oom_kills(
            &self.settings.cgroup_root,
            &self.settings.cgroup_parent,
            run_id,
        )
    }

    async fn delete_task(&self, run_id: &str) -> Result<(), RuntimeError> {
        let result = self
            .tasks()
            .delete(self.request(
                DeleteTaskRequest {
                    container_id: run_id.to_string(),
                },
                None,
            ))
            .await
            .map(|_| ());
        ignore_not_found(result).map_err(task_error("Tasks.Delete"))
    }

    async fn cleanup(&self, run_id: &str) {
        let failures = self.remove_everything(run_id).await;
        if failures.is_empty() {
            tracing::debug!(run_id, "run cleaned up");
        } else {
            tracing::warn!(run_id, ?failures, "cleanup left something behind");
        }
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
        Ok(containers.into_iter().map(|c| c.id).collect())
    }

    fn list_networks(&self) -> Vec<String> {
        self.network
            .as_ref()
            .map(|n| n.attached_runs())
            .unwrap_or_default()
    }
}
