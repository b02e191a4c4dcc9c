//! The result: a short human summary, then one JSON object on the last line (the fields
//! BENCHMARKS.md and scripts read).

use crate::GOAL_RUNS_PER_SEC;
use berth_bench::stats::{millis, Summary};
use std::collections::BTreeMap;
use std::time::Duration;

/// What one benchmark measured.
pub(crate) struct Report {
    pub(crate) agents: usize,
    pub(crate) runs: usize,
    pub(crate) concurrency: usize,
    pub(crate) agents_per_connection: usize,
    pub(crate) wall: Duration,
    pub(crate) completion_wall: Duration,
    pub(crate) to_assign: Summary,
    pub(crate) create_answer: Summary,
    pub(crate) to_complete: Summary,
    pub(crate) peak_rss_kib: u64,
    pub(crate) scheduler_cpu_seconds: f64,
    pub(crate) bench_cpu_seconds: f64,
    pub(crate) scheduler_log: String,
    /// `embedded` or `etcd (N members)`.
    pub(crate) store: String,
    pub(crate) duplicate_assignments: usize,
    pub(crate) final_status: BTreeMap<String, usize>,
}

impl Report {
    pub(crate) fn runs_per_sec(&self) -> f64 {
        self.runs as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn print(&self) {
        let rps = self.runs_per_sec();
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "control-plane: {} runs on {} fake agents ({} per connection), {} CreateRun in flight, {} CPUs shared by bench and scheduler",
            self.runs, self.agents, self.agents_per_connection, self.concurrency, cpus
        );
        println!(
            "  submission -> agent ack: {:.0} runs/s over {:.2} s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            rps,
            self.wall.as_secs_f64(),
            millis(self.to_assign.p50),
            millis(self.to_assign.p99),
            millis(self.to_assign.max)
        );
        println!(
            "  CreateRun answered: p50 {:.2} ms, p99 {:.2} ms; exit stored and acked: p50 {:.2} ms, p99 {:.2} ms ({:.0} runs/s completed)",
            millis(self.create_answer.p50),
            millis(self.create_answer.p99),
            millis(self.to_complete.p50),
            millis(self.to_complete.p99),
            self.runs as f64 / self.completion_wall.as_secs_f64()
        );
        println!(
            "  scheduler: peak RSS {:.1} MiB, {:.2} CPU-s ({:.0} us/run); bench: {:.2} CPU-s; goal {} runs/s {}",
            self.peak_rss_kib as f64 / 1024.0,
            self.scheduler_cpu_seconds,
            self.scheduler_cpu_seconds * 1e6 / self.runs as f64,
            self.bench_cpu_seconds,
            GOAL_RUNS_PER_SEC,
            if rps >= GOAL_RUNS_PER_SEC { "met" } else { "missed" }
        );
        println!(
            "  runs ended as {:?}; {} duplicate AssignRun (a run re-placed under a new lease)",
            self.final_status, self.duplicate_assignments
        );
        let json = serde_json::json!({
            "benchmark": "control-plane",
            "agents": self.agents,
            "runs": self.runs,
            "concurrency": self.concurrency,
            "agents_per_connection": self.agents_per_connection,
            "cpus": cpus,
            "scheduler_log": self.scheduler_log,
            "store": self.store,
            "runs_per_sec": (rps * 10.0).round() / 10.0,
            "wall_seconds": self.wall.as_secs_f64(),
            "p50_ms": millis(self.to_assign.p50),
            "p99_ms": millis(self.to_assign.p99),
            "max_ms": millis(self.to_assign.max),
            "create_run_p50_ms": millis(self.create_answer.p50),
            "create_run_p99_ms": millis(self.create_answer.p99),
            "completed_p50_ms": millis(self.to_complete.p50),
            "completed_p99_ms": millis(self.to_complete.p99),
            "completed_runs_per_sec": (self.runs as f64 / self.completion_wall.as_secs_f64() * 10.0).round() / 10.0,
            "scheduler_peak_rss_mib": (self.peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            "scheduler_cpu_seconds": self.scheduler_cpu_seconds,
            "bench_cpu_seconds": self.bench_cpu_seconds,
            "goal_runs_per_sec": GOAL_RUNS_PER_SEC,
            "goal_met": rps >= GOAL_RUNS_PER_SEC,
            "duplicate_assignments": self.duplicate_assignments,
            "final_status": self.final_status,
        });
        println!("{json}");
    }
}
