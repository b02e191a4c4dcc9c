//! The agent's metrics (see `berth_core::metrics`): image pulls, container starts, runs on the
//! node, OOM kills and the log pump's lines and bytes.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use std::time::Duration;

pub const IMAGE_PULLS: &str = "berth_agent_image_pulls_total";
pub const IMAGE_PULL_DURATION: &str = "berth_agent_image_pull_duration_seconds";
pub const IMAGE_PULL_BYTES: &str = "berth_agent_image_pull_bytes_total";
pub const CONTAINER_START: &str = "berth_agent_container_start_duration_seconds";
pub const RUNS_RUNNING: &str = "berth_agent_runs_running";
pub const RUNS_ENDED: &str = "berth_agent_runs_ended_total";
pub const OOM_KILLS: &str = "berth_agent_oom_kills_total";
pub const LOG_LINES: &str = "berth_agent_log_lines_total";
pub const LOG_BYTES: &str = "berth_agent_log_bytes_total";
pub const LOG_LIMITS_REACHED: &str = "berth_agent_log_limits_reached_total";
pub const LOG_DROPPED_BYTES: &str = "berth_agent_log_dropped_bytes_total";

/// HELP lines for every agent metric.
pub fn describe() {
    describe_counter!(
        IMAGE_PULLS,
        "Image pulls that went to the registry (not answered from the resolve cache), by result."
    );
    describe_histogram!(
        IMAGE_PULL_DURATION,
        metrics::Unit::Seconds,
        "How long an image pull took (resolve, download, unpack), by result."
    );
    describe_counter!(
        IMAGE_PULL_BYTES,
        metrics::Unit::Bytes,
        "Image bytes downloaded from registries."
    );
    describe_histogram!(
        CONTAINER_START,
        metrics::Unit::Seconds,
        "From the assignment's arrival to the process started, by whether a ready sandbox was used."
    );
    describe_gauge!(RUNS_RUNNING, "Runs whose process runs on this node now.");
    describe_counter!(
        RUNS_ENDED,
        "Runs ended on this node, by reason (exited, timeout, stopped, start_failed, ...)."
    );
    describe_counter!(
        OOM_KILLS,
        "Runs the kernel's OOM killer ended (they hit their memory limit)."
    );
    describe_counter!(LOG_LINES, "Log lines captured from runs' output.");
    describe_counter!(
        LOG_BYTES,
        metrics::Unit::Bytes,
        "Bytes of log line text captured from runs' output."
    );
    describe_counter!(
        LOG_LIMITS_REACHED,
        "Runs that reached their log limit (their later output is dropped)."
    );
    describe_counter!(
        LOG_DROPPED_BYTES,
        metrics::Unit::Bytes,
        "Output bytes runs wrote past their log limit (dropped unread, so not counted in lines)."
    );
    // Series without labels exist from the start (at 0), so rates and alerts see them.
    for name in [
        IMAGE_PULL_BYTES,
        OOM_KILLS,
        LOG_LINES,
        LOG_BYTES,
        LOG_LIMITS_REACHED,
        LOG_DROPPED_BYTES,
    ] {
        counter!(name).increment(0);
    }
    gauge!(RUNS_RUNNING).set(0.0);
}

pub fn image_pull(ok: bool, took: Duration) {
    let result = if ok { "ok" } else { "error" };
    counter!(IMAGE_PULLS, "result" => result).increment(1);
    histogram!(IMAGE_PULL_DURATION, "result" => result).record(took.as_secs_f64());
}

pub fn image_bytes(bytes: u64) {
    counter!(IMAGE_PULL_BYTES).increment(bytes);
}

/// A run's process runs on the node until this is dropped.
pub struct Running(());

impl Running {
    /// The process started (`started_unix_nanos`) for an assignment that arrived at
    /// `received_unix_nanos`.
    pub fn started(received_unix_nanos: i64, started_unix_nanos: i64, sandbox: bool) -> Running {
        let took = started_unix_nanos
            .saturating_sub(received_unix_nanos)
            .max(0) as f64
            / 1e9;
        histogram!(CONTAINER_START, "sandbox" => if sandbox { "true" } else { "false" })
            .record(took);
        gauge!(RUNS_RUNNING).increment(1.0);
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        gauge!(RUNS_RUNNING).decrement(1.0);
    }
}

pub fn run_ended(reason: &'static str, oom_killed: bool) {
    counter!(RUNS_ENDED, "reason" => reason).increment(1);
    if oom_killed {
        counter!(OOM_KILLS).increment(1);
    }
}

pub fn log_lines(lines: u64, bytes: u64) {
    if lines > 0 {
        counter!(LOG_LINES).increment(lines);
        counter!(LOG_BYTES).increment(bytes);
    }
}

pub fn log_limit_reached() {
    counter!(LOG_LIMITS_REACHED).increment(1);
}

pub fn log_dropped(bytes: u64) {
    if bytes > 0 {
        counter!(LOG_DROPPED_BYTES).increment(bytes);
    }
}

pub const CONTAINER_MEMORY_USAGE: &str = "container_memory_usage_bytes";
pub const CONTAINER_CPU_TIME: &str = "container_cpu_time_seconds_total";

/// The runs' containers as Prometheus text, in the shape of OpenTelemetry's container metrics
/// (`container.memory.usage` and `container.cpu.time`, labelled by `run_id`): read from their
/// cgroups when scraped, so a run's series is there while it runs and gone after it.
pub fn render_containers(runs: &[(String, crate::run::cgroup::RunUsage)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if runs.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "# HELP {CONTAINER_MEMORY_USAGE} Memory a run's container uses now (its cgroup's usage)."
    );
    let _ = writeln!(out, "# TYPE {CONTAINER_MEMORY_USAGE} gauge");
    for (run_id, u) in runs {
        let _ = writeln!(
            out,
            "{CONTAINER_MEMORY_USAGE}{{run_id=\"{run_id}\"}} {}",
            u.memory_bytes
        );
    }
    let _ = writeln!(
        out,
        "# HELP {CONTAINER_CPU_TIME} CPU time a run's container has used (its cgroup's)."
    );
    let _ = writeln!(out, "# TYPE {CONTAINER_CPU_TIME} counter");
    for (run_id, u) in runs {
        let _ = writeln!(
            out,
            "{CONTAINER_CPU_TIME}{{run_id=\"{run_id}\"}} {}",
            u.cpu_nanos as f64 / 1e9
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::cgroup::RunUsage;

    #[test]
    fn containers_render_as_prometheus_text_with_one_series_per_run() {
        assert_eq!(render_containers(&[]), "");
        let usage = |memory_bytes, cpu_nanos| RunUsage {
            memory_bytes,
            memory_peak_bytes: memory_bytes,
            cpu_nanos,
            processes: 1,
        };
        let text = render_containers(&[
            ("a".to_owned(), usage(1024, 1_500_000_000)),
            ("b".to_owned(), usage(2048, 0)),
        ]);
        assert_eq!(
            text,
            "# HELP container_memory_usage_bytes Memory a run's container uses now (its cgroup's usage).\n\
             # TYPE container_memory_usage_bytes gauge\n\
             container_memory_usage_bytes{run_id=\"a\"} 1024\n\
             container_memory_usage_bytes{run_id=\"b\"} 2048\n\
             # HELP container_cpu_time_seconds_total CPU time a run's container has used (its cgroup's).\n\
             # TYPE container_cpu_time_seconds_total counter\n\
             container_cpu_time_seconds_total{run_id=\"a\"} 1.5\n\
             container_cpu_time_seconds_total{run_id=\"b\"} 0\n"
        );
    }
}
