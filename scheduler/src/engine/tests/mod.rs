//! Engine tests against the in-memory store, with a recorder standing in for each agent: the
//! shared fixtures here, the tests by concern in the child modules.

use super::*;
use crate::placement::NodeState;
use berth_core::agent::{
    AgentCommand, AgentLink, AssignRun, ExitReason, Heartbeat, LinkClosed, LogBatch, LogLine,
    PullFor, PullProgress, Registration, RunExited, RunReleased, RunStarted, StartStages,
    WarmupResult,
};
use berth_core::codes::ErrorCode;
use berth_core::model::{ImagePull, LogStream, WarmupStatus};
use berth_core::overrides::RunOverrides;
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, MemoryStore};
use berth_core::validate::RegistrySpec;
use berth_core::{now_unix_millis, EnvVar, RunnerSpec};

mod active;
mod caps;
mod ephemeral;
mod idempotency;
mod images;
mod isolation;
mod limits;
mod logs;
mod nodes;
mod projects;
mod queue;
mod registries;
mod removal;
mod retries;
mod runner_cache;
mod runs;
mod schedules;
mod usage;
mod webhooks;

/// The project every test acts in unless it says otherwise.
const P: &str = berth_core::auth::DEFAULT_PROJECT;

pub(super) fn spec(region: &str, itype: &str) -> RunnerSpec {
    RunnerSpec {
        name: "test-runner".into(),
        image_name: "busybox".into(),
        image_tag: "latest".into(),
        run_command: Some("echo hi".into()),
        argv: vec![],
        entrypoint: None,
        timeout_seconds: 30,
        region: region.into(),
        instance_type: itype.into(),
        env_variables: vec![EnvVar {
            env_key: "A".into(),
            env_val: "1".into(),
            secret: false,
        }],
        container_registry_id: None,
        stop_grace_seconds: None,
        max_concurrent_runs: None,
        retry_policy: None,
        notify: None,
        isolation: Default::default(),
    }
}

fn register(node: &str, region: &str, mem: u64, active: &[&str]) -> Registration {
    Registration {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        region: region.into(),
        total_memory_mib: mem,
        cpus: 2,
        max_concurrent_runs: 8,
        active_run_ids: active.iter().map(|s| s.to_string()).collect(),
        agent_version: "test".into(),
        cached_images: vec![],
        ephemeral: None,
        runtimes: vec!["runc".into()],
    }
}

fn config() -> Config {
    Config {
        default_registry: "127.0.0.1:5000".into(),
        stop_wait: Duration::from_millis(200),
        ..Config::default()
    }
}

/// The fake agent: records every command the engine sends it, in order, for the test to read
/// from the other end.
struct Recorder(mpsc::UnboundedSender<AgentCommand>);

impl AgentLink for Recorder {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed> {
        self.0.send(command).map_err(|_| LinkClosed)
    }
}

type Rx = mpsc::UnboundedReceiver<AgentCommand>;

fn recorder() -> (Link, Rx) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Recorder(tx)), rx)
}

async fn attach<S: Store>(s: &Scheduler<S>, reg: Registration) -> Rx {
    let (link, mut rx) = recorder();
    s.attach_node(reg, link).await.expect("attach");
    match rx.recv().await {
        Some(AgentCommand::Registered(_)) => {}
        other => panic!("expected Registered first, got {other:?}"),
    }
    match rx.recv().await {
        Some(AgentCommand::WarmPins { .. }) => {}
        other => panic!("expected the warm pins after Registered, got {other:?}"),
    }
    rx
}

fn next_assign(rx: &mut Rx) -> AssignRun {
    match rx.try_recv().ok() {
        Some(AgentCommand::AssignRun(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn started(a: &AssignRun) -> RunStarted {
    RunStarted {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        started_at_unix_nanos: 1_000_000_000,
        image_digest: Some("sha256:abc".into()),
        stages: StartStages::default(),
        runtime: Some("runc 1.1.5".into()),
    }
}

fn exited(a: &AssignRun, code: i32, reason: ExitReason) -> RunExited {
    RunExited {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        exit_code: code,
        exited_at_unix_nanos: 3_500_000_000,
        reason,
        error_code: None,
        error_message: String::new(),
        oom_killed: false,
        reported_at_unix_nanos: 3_600_000_000,
        cleanup_pending: false,
    }
}

/// Overrides as the control service receives them: files of `hello` as bytes, at `path` with
/// `mode`, and the stop grace.
fn received(files: &[(&str, u32)], stop_grace_seconds: Option<u32>) -> RunOverrides {
    use berth_proto::v1 as pb;
    berth_core::convert::overrides_from_pb(pb::RunOverrides {
        files: files
            .iter()
            .map(|&(path, mode)| pb::FileUpload {
                path: path.to_owned(),
                content: b"hello".to_vec(),
                mode,
            })
            .collect(),
        stop_grace_seconds,
        ..Default::default()
    })
}

fn config_fast_expiry() -> Config {
    Config {
        node_ttl: Duration::from_secs(2),
        lost_grace: Duration::from_secs(1),
        ..config()
    }
}

fn next_pins(rx: &mut Rx) -> Vec<String> {
    match rx.try_recv().ok() {
        Some(AgentCommand::WarmPins { images, .. }) => images,
        other => panic!("expected WarmPins, got {other:?}"),
    }
}

/// Like `attach`, but leaves the pin set (sent right after Registered) in the channel.
async fn attach_keeping_pins<S: Store>(s: &Scheduler<S>, reg: Registration) -> Rx {
    let (link, mut rx) = recorder();
    s.attach_node(reg, link).await.expect("attach");
    match rx.recv().await {
        Some(AgentCommand::Registered(_)) => {}
        other => panic!("expected Registered first, got {other:?}"),
    }
    rx
}

fn not_found<T: std::fmt::Debug>(r: Result<T, SchedulerError>) -> bool {
    matches!(r, Err(SchedulerError::NotFound { .. }))
}
