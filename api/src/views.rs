//! The public JSON shapes (Nodion's field names), built from the control service's messages.

use berth_proto::v1 as pb;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Billionths of a USD as a JSON number of USD.
pub fn nano_usd(n: u64) -> Value {
    json!(n as f64 / 1e9)
}

pub fn timestamp_millis(ms: i64) -> Value {
    timestamp_nanos(i128::from(ms) * 1_000_000)
}

pub fn timestamp_nanos(ns: i128) -> Value {
    OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

fn opt_millis(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, timestamp_millis)
}

/// Variables as the API shows them: a secret one without its value.
fn env(vars: &[pb::EnvVar]) -> Value {
    Value::Array(
        vars.iter()
            .map(|e| {
                if e.secret {
                    json!({"env_key": e.key, "env_val": null, "secret": true})
                } else {
                    json!({"env_key": e.key, "env_val": e.value})
                }
            })
            .collect(),
    )
}

fn argv(a: &[String]) -> Value {
    if a.is_empty() {
        Value::Null
    } else {
        json!(a)
    }
}

pub fn runner(r: &pb::Runner) -> Value {
    let s = r.spec.clone().unwrap_or_default();
    json!({
        "id": r.id,
        "name": s.name,
        "image_name": s.image_name,
        "image_tag": s.image_tag,
        "run_command": s.run_command,
        "argv": argv(&s.argv),
        "entrypoint": s.entrypoint,
        "timeout_seconds": s.timeout_seconds,
        "region": s.region,
        "instance_type": s.instance_type,
        "env_variables": env(&s.env_variables),
        "container_registry_id": s.container_registry_id,
        "stop_grace_seconds": s.stop_grace_seconds,
        "warmed_at": opt_millis(r.warmed_at_unix_millis),
        "warmup_status": r.warmup_status,
        "warm_node_id": r.warm_node_id,
        "warmup_error": r.warmup_error,
        "created_at": timestamp_millis(r.created_at_unix_millis),
        "updated_at": timestamp_millis(r.updated_at_unix_millis),
    })
}

pub fn run(r: &pb::Run) -> Value {
    let duration = match (r.started_at_unix_millis, r.completed_at_unix_millis) {
        (Some(s), Some(e)) => json!(u64::try_from(e.saturating_sub(s))
            .unwrap_or(0)
            .div_ceil(1000)),
        _ => Value::Null,
    };
    json!({
        "id": r.id,
        "runner_id": r.runner_id,
        "status": r.status,
        "exit_code": r.exit_code,
        "command": r.command,
        "argv": argv(&r.argv),
        "entrypoint": r.entrypoint,
        "node_id": r.node_id,
        "region": r.region,
        "instance_type": r.instance_type,
        "image": r.image,
        "image_digest": r.image_digest,
        "timeout_seconds": r.timeout_seconds,
        "created_at": timestamp_millis(r.created_at_unix_millis),
        "started_at": opt_millis(r.started_at_unix_millis),
        "completed_at": opt_millis(r.completed_at_unix_millis),
        "duration_seconds": duration,
        "error_code": r.error_code,
        "error_message": r.error_message,
        "pending_reason": r.pending_reason,
        "queue_position": r.queue_position,
        "warm_pin": r.warm_pin,
        "stop_requested": r.stop_requested,
        "oom_killed": r.oom_killed,
        "price_per_second_usd": nano_usd(r.price_nano_usd_per_second),
        "billed_seconds": r.billed_seconds,
        "cost_usd": r.cost_nano_usd.map(nano_usd),
        "stop_grace_seconds": r.stop_grace_seconds,
        "files": files(&r.files),
    })
}

/// A run's uploaded files as the API shows them: never their content.
fn files(files: &[pb::RunFileInfo]) -> Value {
    Value::Array(
        files
            .iter()
            .map(|f| {
                json!({
                    "path": f.path,
                    "mode": f.mode,
                    "size_bytes": f.size_bytes,
                    "sha256": f.sha256,
                })
            })
            .collect(),
    )
}

/// A registry as the API shows it: the password is never returned.
pub fn registry(r: &pb::ContainerRegistry) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "host": r.host,
        "username": r.username,
        "created_at": timestamp_millis(r.created_at_unix_millis),
    })
}

pub fn log(l: &pb::LogEntry) -> Value {
    json!({
        "id": l.id,
        "stream": l.stream,
        "msg": l.msg,
        "ts": timestamp_nanos(i128::from(l.ts_unix_nanos)),
    })
}

pub fn node(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "region": n.region,
        "status": n.status,
        "draining": n.draining,
        "total_memory_mib": n.total_memory_mib,
        "free_memory_mib": n.free_memory_mib,
        "cpus": n.cpus,
        "max_concurrent_runs": n.max_concurrent_runs,
        "running_runs": n.running_run_ids,
        "cached_images": n.cached_images,
        "last_heartbeat_age_seconds": n.last_heartbeat_age_millis as f64 / 1000.0,
    })
}
