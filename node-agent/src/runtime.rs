//! The boundary between run supervision and the container engine. [`ContainerRuntime`] is what a
//! supervisor needs from containerd; `containerd.rs` implements it for real and the tests use a
//! scripted fake.

use std::future::Future;
use std::path::PathBuf;

use berth_core::codes::ErrorCode;
use berth_proto::v1::RegistryAuth;
use oci_spec::runtime::Spec;
use tokio::sync::{oneshot, watch};

use crate::image::progress::{forward, PullProgressState, REPORT_EVERY};
pub use crate::image::pull::PreparedImage;

/// Regular files (they must exist) that the task's stdout and stderr are appended to. The
/// shim writes them itself, so output is kept even while no agent process is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFiles {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// How a task ended, as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskExit {
    /// Exit status; containerd already reports a death by signal N as 128 + N.
    pub exit_status: u32,
    /// containerd's exit timestamp, unix nanoseconds.
    pub exited_at_unix_nanos: i64,
}

/// Resolves when the task exits.
pub type ExitWatch = oneshot::Receiver<Result<TaskExit, RuntimeError>>;

/// Whether the container engine answers, and how many times it stopped answering since the
/// agent started (so a short outage is still seen by someone who looks only afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineHealth {
    pub reachable: bool,
    /// Outages of containerd, and spells of low disk: each one made the node refuse runs.
    pub outages: u64,
    /// The filesystem containerd keeps the runs' writable layers on has less free space than
    /// the node keeps in reserve: the node takes no new runs until it has again.
    pub disk_low: bool,
}

impl EngineHealth {
    /// Whether the node can take a new run.
    pub fn takes_runs(&self) -> bool {
        self.reachable && !self.disk_low
    }
}

impl Default for EngineHealth {
    fn default() -> Self {
        Self {
            reachable: true,
            outages: 0,
            disk_low: false,
        }
    }
}

/// Signals the supervisor sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Kill,
}

impl StopSignal {
    pub fn number(self) -> u32 {
        match self {
            StopSignal::Term => 15,
            StopSignal::Kill => 9,
        }
    }
}

/// A container-engine failure, named by the step that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// the image could not be pulled or unpacked
    #[error("pulling image {image}: {message}")]
    ImagePull { image: String, message: String },
    /// the container or task could not be created
    #[error("creating the container: {0}")]
    Create(String),
    /// the run's network could not be set up
    #[error("setting up the run's network: {0}")]
    Network(String),
    /// the task could not be started
    #[error("starting the task: {0}")]
    Start(String),
    /// waiting for, signalling or deleting the task failed
    #[error("{operation}: {message}")]
    Task {
        operation: &'static str,
        message: String,
    },
}

impl RuntimeError {
    /// The machine-readable `error_code` reported in `RunExited`.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            RuntimeError::ImagePull { .. } => ErrorCode::ImagePullFailed,
            RuntimeError::Create(_) => ErrorCode::ContainerCreateFailed,
            RuntimeError::Network(_) => ErrorCode::NetworkSetupFailed,
            RuntimeError::Start(_) => ErrorCode::TaskStartFailed,
            RuntimeError::Task { .. } => ErrorCode::TaskFailed,
        }
    }
}

/// What `create` did on its way, for the run's timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Created {
    /// When the run's network was attached, unix nanoseconds; 0 without a network.
    pub network_ready_at_unix_nanos: i64,
}

/// What the supervisor needs from the container engine. Every method is keyed by the run ID,
/// which is also the container ID, snapshot key and FIFO directory name — except for a run
/// started in a ready sandbox ([`ContainerRuntime::use_container`]).
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Images known to be present and unpacked (reported to the scheduler for placement).
    fn cached_images(&self) -> Vec<String>;

    /// Makes `image` present and unpacked (pulling only what is missing), with `auth` for its
    /// registry when the run has credentials.
    fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = Result<PreparedImage, RuntimeError>> + Send;

    /// The image's `/etc/passwd` and `/etc/group` (absent ones are `None`), to resolve its
    /// `USER` (see `run::user`). An engine that cannot look into images answers none: the run
    /// then starts as a numeric `USER` or root, and a named one fails.
    fn image_accounts(
        &self,
        _image: &PreparedImage,
    ) -> impl Future<Output = Result<crate::run::user::ImageAccounts, RuntimeError>> + Send {
        std::future::ready(Ok(crate::run::user::ImageAccounts::default()))
    }

    /// Prepares the rootfs and the run's network, creates the container with `spec` (joined to
    /// that network) and creates (not starts) its task, its stdout and stderr appended to
    /// `output`.
    fn create(
        &self,
        run_id: &str,
        image: &PreparedImage,
        spec: &Spec,
        output: &OutputFiles,
    ) -> impl Future<Output = Result<Created, RuntimeError>> + Send;

    /// From now on `run_id` runs in the existing container `container_id` (a ready sandbox
    /// created under that id): every call for the run goes to that container, its cleanup
    /// included. A runtime without sandboxes ignores it.
    fn use_container(&self, _run_id: &str, _container_id: &str) {}

    /// Begins preparing what later runs will need (networks attached ahead), once the agent
    /// has swept what an earlier process left. Nothing by default.
    fn prepare_ahead(&self) {}

    /// Releases what was prepared ahead (the agent shuts down). Blocking.
    fn release_ahead(&self) {}

    /// Begins waiting for the task's exit; call before `start`. Also works for a task an earlier
    /// agent process started (re-adoption after a restart); resolves at once if it already
    /// exited, and with an error if the task is gone.
    fn watch_exit(
        &self,
        run_id: &str,
    ) -> impl Future<Output = Result<ExitWatch, RuntimeError>> + Send;

    /// Starts the task; returns the start time in unix nanoseconds: the moment the start was
    /// asked for, before which the process cannot have run (a short process may even have
    /// exited by the time the call returns; billing counts from here).
    fn start(&self, run_id: &str) -> impl Future<Output = Result<i64, RuntimeError>> + Send;

    /// Sends `signal` to the task's init process, or to every process in it when `all`.
    fn kill(
        &self,
        run_id: &str,
        signal: StopSignal,
        all: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// How many of the run's processes the kernel's OOM killer ended, or None when that cannot
    /// be known (the run's cgroup is already gone). Ask after the exit and before `delete_task`,
    /// which removes the cgroup.
    fn oom_kills(&self, run_id: &str) -> Option<u64>;

    /// Whether the runtime answers now (readiness): what it said, or why not.
    fn ping(&self) -> impl Future<Output = Result<String, String>> + Send {
        async { Ok("not checked".to_owned()) }
    }

    /// What the run's container uses now (memory, CPU time), for the metrics; None when it
    /// cannot be known (no cgroup, or a runtime that does not say).
    fn usage(&self, _run_id: &str) -> Option<crate::run::cgroup::RunUsage> {
        None
    }

    /// Bytes the run's writable layer (the files it wrote to its own filesystem) holds now;
    /// None when the engine cannot tell.
    fn writable_bytes(&self, _run_id: &str) -> impl Future<Output = Option<u64>> + Send {
        std::future::ready(None)
    }

    /// Deletes the (exited) task. Returns once the shim has finished copying its output.
    fn delete_task(&self, run_id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes everything the run left behind in the engine: task, container, snapshot, lease,
    /// cgroups, network namespace and address (not the run's journal directory). Best effort and idempotent: failures are
    /// logged, missing pieces ignored.
    fn cleanup(&self, run_id: &str) -> impl Future<Output = ()> + Send;

    /// IDs of containers in this agent's namespace, and of runs or sandboxes that hold a lease
    /// without a container (left over from an earlier process).
    fn list_containers(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;

    /// IDs of runs that hold a network namespace or address on this node (left over from an
    /// earlier process, or current).
    fn list_networks(&self) -> Vec<String> {
        Vec::new()
    }

    // ---- engine health (defaults: an engine that always answers) ----

    /// Asks the engine now whether it answers (and updates [`Self::health`] with the answer).
    fn check_reachable(&self) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }

    /// Changes of the engine's reachability; None when this runtime cannot tell.
    fn health(&self) -> Option<watch::Receiver<EngineHealth>> {
        None
    }

    // ---- image cache and pull progress (defaults: a runtime without either) ----

    /// Changes to the progress of pulls of `image` from now on (see [`crate::image::progress`]);
    /// None when this runtime cannot tell.
    fn watch_pull(&self, _image: &str) -> Option<watch::Receiver<PullProgressState>> {
        None
    }

    /// Run `run_id` uses `image` (from its assignment) until [`Self::release_image`]: the image
    /// cache never deletes it meanwhile.
    fn hold_image(&self, _run_id: &str, _image: &str) {}

    /// Run `run_id` has ended and was cleaned up.
    fn release_image(&self, _run_id: &str) {}

    /// The images warmups pinned on this node (the whole set, from the scheduler).
    fn set_warm_pins(&self, _images: &[String]) {}
}

/// Pulls `image` through `runtime`, calling `report` with throttled progress while the pull
/// runs (nothing when the image was already present). The last state seen is always reported
/// before returning, so the final figures are never lost to throttling.
pub async fn pull_reporting<R: ContainerRuntime>(
    runtime: &R,
    image: &str,
    auth: Option<&RegistryAuth>,
    mut report: impl FnMut(PullProgressState),
) -> Result<PreparedImage, RuntimeError> {
    let Some(mut progress) = runtime.watch_pull(image) else {
        return runtime.pull_image(image, auth).await;
    };
    let pull = runtime.pull_image(image, auth);
    forward(pull, &mut progress, REPORT_EVERY, &mut report).await
}
