//! The one mapping between the domain types and their gRPC (`berth_proto::v1`) forms on the
//! control side (API ↔ scheduler). The agent side's (reports and commands, see [`crate::agent`])
//! is in the scheduler's agent service, where those messages enter and leave the scheduler.

use crate::model::{Catalog, EnvVar, InstanceType, LogEntry, Run, RunFile, Runner, RunnerSpec};
use crate::validate::FileInput;
use base64::Engine as _;
use berth_proto::v1 as pb;

/// Checked files as the API hands them to the control service.
pub fn files_to_upload_pb(files: &[RunFile]) -> Vec<pb::FileUpload> {
    files
        .iter()
        .map(|f| pb::FileUpload {
            path: f.path.clone(),
            content: f.content.to_vec(),
            mode: f.mode,
        })
        .collect()
}

/// Uploaded files back into the input form, so the scheduler re-checks them with the same
/// validation as the API.
pub fn file_inputs_from_pb(files: Vec<pb::FileUpload>) -> Vec<FileInput> {
    files
        .into_iter()
        .map(|f| FileInput {
            path: Some(f.path),
            content_base64: Some(base64::engine::general_purpose::STANDARD.encode(f.content)),
            mode: Some(i64::from(f.mode)),
        })
        .collect()
}

/// What the control service tells about a run's files: never their content.
pub fn file_infos_pb(files: &[RunFile]) -> Vec<pb::RunFileInfo> {
    files
        .iter()
        .map(|f| pb::RunFileInfo {
            path: f.path.clone(),
            mode: f.mode,
            size_bytes: f.size_bytes,
            sha256: f.sha256.clone(),
        })
        .collect()
}

pub fn env_to_pb(env: &[EnvVar]) -> Vec<pb::EnvVar> {
    env.iter()
        .map(|e| pb::EnvVar {
            key: e.env_key.clone(),
            value: e.env_val.clone(),
            secret: e.secret,
        })
        .collect()
}

pub fn env_from_pb(env: Vec<pb::EnvVar>) -> Vec<EnvVar> {
    env.into_iter()
        .map(|e| EnvVar {
            env_key: e.key,
            env_val: e.value,
            secret: e.secret,
        })
        .collect()
}

impl From<&RunnerSpec> for pb::RunnerSpec {
    fn from(s: &RunnerSpec) -> Self {
        pb::RunnerSpec {
            name: s.name.clone(),
            image_name: s.image_name.clone(),
            image_tag: s.image_tag.clone(),
            run_command: s.run_command.clone(),
            argv: s.argv.clone(),
            entrypoint: s.entrypoint.clone(),
            timeout_seconds: s.timeout_seconds,
            region: s.region.clone(),
            instance_type: s.instance_type.clone(),
            env_variables: env_to_pb(&s.env_variables),
            container_registry_id: s.container_registry_id.clone(),
            stop_grace_seconds: s.stop_grace_seconds,
        }
    }
}

impl From<pb::RunnerSpec> for RunnerSpec {
    fn from(s: pb::RunnerSpec) -> Self {
        RunnerSpec {
            name: s.name,
            image_name: s.image_name,
            image_tag: s.image_tag,
            run_command: s.run_command,
            argv: s.argv,
            entrypoint: s.entrypoint,
            timeout_seconds: s.timeout_seconds,
            region: s.region,
            instance_type: s.instance_type,
            env_variables: env_from_pb(s.env_variables),
            container_registry_id: s.container_registry_id.filter(|id| !id.is_empty()),
            stop_grace_seconds: s.stop_grace_seconds,
        }
    }
}

/// A runner with the store revision it was read at, as the control service answers it: secret
/// values are blanked (they never leave the scheduler except inside a node's `RunSpec`).
pub fn runner_to_pb(r: &Runner, revision: u64) -> pb::Runner {
    let mut spec: pb::RunnerSpec = (&r.spec).into();
    for e in spec.env_variables.iter_mut().filter(|e| e.secret) {
        e.value.clear();
    }
    pb::Runner {
        id: r.id.clone(),
        spec: Some(spec),
        warmed_at_unix_millis: r.warmed_at,
        created_at_unix_millis: r.created_at,
        updated_at_unix_millis: r.updated_at,
        revision,
        warmup_status: r.warmup.as_ref().map(|w| w.status.as_str().to_owned()),
        warm_node_id: r.warmup.as_ref().map(|w| w.node_id.clone()),
        warmup_error: r.warmup.as_ref().and_then(|w| w.error.clone()),
        warmup_image_pull: None,
    }
}

impl From<&Catalog> for pb::Catalog {
    fn from(c: &Catalog) -> Self {
        pb::Catalog {
            regions: c.regions.clone(),
            instance_types: c
                .instance_types
                .iter()
                .map(|t| pb::InstanceType {
                    slug: t.slug.clone(),
                    cpu_millis: t.cpu_millis,
                    memory_mib: t.memory_mib,
                    price_per_second_usd: t.price_per_second_usd,
                })
                .collect(),
        }
    }
}

impl From<pb::Catalog> for Catalog {
    fn from(c: pb::Catalog) -> Self {
        Catalog {
            regions: c.regions,
            instance_types: c
                .instance_types
                .into_iter()
                .map(|t| InstanceType {
                    slug: t.slug,
                    cpu_millis: t.cpu_millis,
                    memory_mib: t.memory_mib,
                    price_per_second_usd: t.price_per_second_usd,
                })
                .collect(),
        }
    }
}

impl From<&Run> for pb::Run {
    fn from(r: &Run) -> Self {
        pb::Run {
            id: r.id.clone(),
            runner_id: r.runner_id.clone(),
            status: r.status.as_str().to_owned(),
            exit_code: r.exit_code,
            command: r.command.clone(),
            argv: r.argv.clone(),
            entrypoint: r.entrypoint.clone(),
            node_id: r.node_id.clone(),
            region: r.region.clone(),
            instance_type: r.instance_type.clone(),
            image: r.image.clone(),
            image_digest: r.image_digest.clone(),
            timeout_seconds: r.timeout_seconds,
            created_at_unix_millis: r.created_at,
            started_at_unix_millis: r.started_at,
            completed_at_unix_millis: r.completed_at,
            error_code: r.error_code.clone(),
            error_message: r.error_message.clone(),
            pending_reason: r.pending_reason.clone(),
            stop_requested: r.stop_requested,
            queue_position: r.queue_position,
            warm_pin: r.warm_pin.clone(),
            container_registry_id: r.container_registry_id.clone(),
            oom_killed: r.oom_killed,
            price_nano_usd_per_second: r.price_nano_usd_per_second,
            billed_seconds: r.duration_seconds(),
            cost_nano_usd: r.cost_nano_usd(),
            files: file_infos_pb(&r.files),
            stop_grace_seconds: r.stop_grace_seconds,
            image_pull: r.image_pull.as_ref().map(pb::ImagePull::from),
        }
    }
}

impl From<&crate::model::ImagePull> for pb::ImagePull {
    fn from(p: &crate::model::ImagePull) -> Self {
        pb::ImagePull {
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            layers_done: p.layers_done,
            layers_total: p.layers_total,
        }
    }
}

impl From<&LogEntry> for pb::LogEntry {
    fn from(l: &LogEntry) -> Self {
        pb::LogEntry {
            id: l.id,
            stream: l.stream.as_str().to_owned(),
            msg: l.msg.clone(),
            ts_unix_nanos: l.ts_unix_nanos,
        }
    }
}
