//! The scheduler's metrics (see `berth_core::metrics`): runs by region and status, the queue,
//! placement, start latency, nodes and leases. Counters and histograms are recorded where the
//! engine changes a run (`State::stage`) or places one; gauges (the queue, the nodes) are
//! sampled every [`SAMPLE_EVERY`] from the engine's state ([`sample_forever`]).

use crate::engine::Scheduler;
use berth_core::codes::{ErrorCode, NodeState};
use berth_core::metrics::seconds_between;
use berth_core::status::RunStatus;
use berth_core::store::Store;
use berth_core::Run;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub const RUNS_CREATED: &str = "berth_runs_created_total";
pub const RUNS_ENDED: &str = "berth_runs_ended_total";
pub const RUNS_PENDING: &str = "berth_runs_pending";
pub const RUNS_ACTIVE: &str = "berth_runs_active";
pub const QUEUE_WAIT: &str = "berth_queue_wait_seconds";
pub const START_LATENCY: &str = "berth_run_start_latency_seconds";
pub const PLACEMENT_ATTEMPTS: &str = "berth_placement_attempts_total";
pub const PLACEMENT_PASS: &str = "berth_placement_pass_duration_seconds";
pub const NODE_MEMORY_TOTAL: &str = "berth_node_memory_total_bytes";
pub const NODE_MEMORY_FREE: &str = "berth_node_memory_free_bytes";
pub const NODE_RUNS: &str = "berth_node_runs";
pub const NODE_MAX_RUNS: &str = "berth_node_max_runs";
pub const NODE_HEARTBEAT_AGE: &str = "berth_node_heartbeat_age_seconds";
pub const NODE_UP: &str = "berth_node_up";
pub const NODE_DRAINING: &str = "berth_node_draining";
pub const NODES_LOST: &str = "berth_nodes_lost_total";
pub const LEASE_EXPIRATIONS: &str = "berth_lease_expirations_total";
pub const REPORTS_REFUSED: &str = "berth_agent_reports_refused_total";

/// How often the gauges are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// HELP lines for every scheduler metric.
pub fn describe() {
    describe_counter!(RUNS_CREATED, "Runs accepted, by region.");
    describe_counter!(
        RUNS_ENDED,
        "Runs that reached a final state, by region and status (succeeded, failed, canceled)."
    );
    describe_gauge!(RUNS_PENDING, "Runs waiting for a node, by region.");
    describe_gauge!(
        RUNS_ACTIVE,
        "Runs not yet ended (pending, assigned or running), by region."
    );
    describe_histogram!(
        QUEUE_WAIT,
        metrics::Unit::Seconds,
        "From a run's creation to its placement on a node, by region."
    );
    describe_histogram!(
        START_LATENCY,
        metrics::Unit::Seconds,
        "From a run's creation (POST) to its process started on the node, by region."
    );
    describe_counter!(
        PLACEMENT_ATTEMPTS,
        "Placement attempts of waiting runs, by region and result (placed, no_node)."
    );
    describe_histogram!(
        PLACEMENT_PASS,
        metrics::Unit::Seconds,
        "How long one scheduling pass over the waiting runs took."
    );
    describe_gauge!(
        NODE_MEMORY_TOTAL,
        "A node's memory for runs, by node and region."
    );
    describe_gauge!(
        NODE_MEMORY_FREE,
        "A node's memory not held by runs or ready sandboxes, by node and region."
    );
    describe_gauge!(NODE_RUNS, "Runs leased to a node (assigned or running).");
    describe_gauge!(NODE_MAX_RUNS, "The most runs a node takes at once.");
    describe_gauge!(
        NODE_HEARTBEAT_AGE,
        metrics::Unit::Seconds,
        "Seconds since the node was last heard from."
    );
    describe_gauge!(
        NODE_UP,
        "1 if the node is ready or draining, 0 if it is lost, by node and region."
    );
    describe_gauge!(
        NODE_DRAINING,
        "1 if the node takes no new runs (drained by an operator, or shutting down), else 0."
    );
    describe_counter!(
        NODES_LOST,
        "Nodes declared lost (silent past their TTL and grace)."
    );
    describe_counter!(
        LEASE_EXPIRATIONS,
        "Runs ended node_lost: their node's lease expired while they ran."
    );
    describe_counter!(
        REPORTS_REFUSED,
        "Reports about runs that contradicted the run's recorded state (e.g. a start refused \
         after the run started): acknowledged and dropped, each logged with its run and node."
    );
    // Series without labels exist from the start (at 0), so rates and alerts see them.
    counter!(NODES_LOST).increment(0);
    counter!(LEASE_EXPIRATIONS).increment(0);
    counter!(REPORTS_REFUSED).increment(0);
}

/// Records a run's change as the engine stages it: `before` is its status and node until now
/// (`None` for a run the engine did not hold: a new one).
pub fn run_staged(before: Option<(RunStatus, bool)>, run: &Run) {
    let region = run.region.clone();
    let placed = run.node_id.is_some();
    if before.is_none() && !run.status.is_terminal() {
        counter!(RUNS_CREATED, "region" => region.clone()).increment(1);
    }
    let (was_status, was_placed) = before.unwrap_or((RunStatus::Pending, false));
    if run.status == RunStatus::Pending && placed && !was_placed {
        let assigned_ms = run.timeline.assigned / 1000;
        histogram!(QUEUE_WAIT, "region" => region.clone())
            .record(seconds_between(run.created_at, assigned_ms));
    }
    if run.status == RunStatus::Running && was_status != RunStatus::Running {
        if let Some(started_ms) = run.started_at {
            histogram!(START_LATENCY, "region" => region.clone())
                .record(seconds_between(run.created_at, started_ms));
        }
    }
    if run.status.is_terminal() && before.is_some_and(|(b, _)| !b.is_terminal()) {
        counter!(RUNS_ENDED, "region" => region, "status" => run.status.as_str()).increment(1);
        if run.error_code == Some(ErrorCode::NodeLost) {
            counter!(LEASE_EXPIRATIONS).increment(1);
        }
    }
}

/// One placement attempt's result.
pub fn placement_attempt(region: &str, placed: bool) {
    let result = if placed { "placed" } else { "no_node" };
    counter!(PLACEMENT_ATTEMPTS, "region" => region.to_owned(), "result" => result).increment(1);
}

pub fn placement_pass(took: Duration) {
    histogram!(PLACEMENT_PASS).record(took.as_secs_f64());
}

pub fn node_lost() {
    counter!(NODES_LOST).increment(1);
}

pub fn report_refused() {
    counter!(REPORTS_REFUSED).increment(1);
}

/// Samples the gauges every [`SAMPLE_EVERY`] for as long as the scheduler runs.
pub async fn sample_forever<S: Store>(scheduler: Arc<Scheduler<S>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    // Every region of the catalog reads 0 when nothing waits or runs there (and one a run
    // names that the catalog no longer lists keeps reading once seen).
    let mut regions: BTreeSet<String> =
        scheduler.config().catalog.regions.iter().cloned().collect();
    loop {
        tick.tick().await;
        let counts = scheduler.run_counts_by_region().await;
        for (region, _) in &counts {
            regions.insert(region.clone());
        }
        for region in &regions {
            let (pending, active) = counts
                .iter()
                .find(|(r, _)| r == region)
                .map_or((0, 0), |(_, c)| *c);
            gauge!(RUNS_PENDING, "region" => region.clone()).set(pending as f64);
            gauge!(RUNS_ACTIVE, "region" => region.clone()).set(active as f64);
        }
        for n in scheduler.list_nodes().await {
            let labels = [
                ("node", n.view.id.clone()),
                ("region", n.view.region.clone()),
            ];
            const MIB: f64 = 1024.0 * 1024.0;
            gauge!(NODE_MEMORY_TOTAL, &labels).set(n.view.total_memory_mib as f64 * MIB);
            gauge!(NODE_MEMORY_FREE, &labels).set(n.view.free_memory_mib() as f64 * MIB);
            gauge!(NODE_RUNS, &labels).set(f64::from(n.view.runs));
            gauge!(NODE_MAX_RUNS, &labels).set(f64::from(n.view.max_runs));
            gauge!(NODE_HEARTBEAT_AGE, &labels).set(n.last_heartbeat_age.as_secs_f64());
            let up = n.view.status != NodeState::Lost;
            gauge!(NODE_UP, &labels).set(if up { 1.0 } else { 0.0 });
            let draining = n.view.status == NodeState::Draining;
            gauge!(NODE_DRAINING, &labels).set(if draining { 1.0 } else { 0.0 });
        }
    }
}

/// What `/readyz` asks of the scheduler that serves now: its store. None while this process does
/// not serve (a standby campaigning, or between terms).
type StoreProbe = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

static SERVING: std::sync::Mutex<Option<StoreProbe>> = std::sync::Mutex::new(None);

/// Marks this process as serving (leading) with `scheduler` until the returned guard drops.
pub fn serving<S: Store>(scheduler: Arc<Scheduler<S>>) -> Serving {
    let probe: StoreProbe = Arc::new(move || {
        let scheduler = scheduler.clone();
        Box::pin(async move { scheduler.probe_store().await })
    });
    *SERVING.lock().unwrap_or_else(|p| p.into_inner()) = Some(probe);
    Serving(())
}

/// This process serves until dropped (see [`serving`]).
pub struct Serving(());

impl Drop for Serving {
    fn drop(&mut self) {
        *SERVING.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The scheduler's readiness: it leads (serves the agents and the API; a standby does not) and
/// its store answers a read.
pub fn readiness() -> berth_core::metrics::Readiness {
    use berth_core::metrics::Check;
    Arc::new(|| {
        let probe = SERVING.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            match probe {
                Some(probe) => vec![
                    Check::new(
                        "leader",
                        Ok("leading: serving agents and the API".to_owned()),
                    ),
                    Check::new("store", probe().await),
                ],
                None => vec![
                    Check::new(
                        "leader",
                        Err("not leading: a standby campaigning, or starting".to_owned()),
                    ),
                    Check::new("store", Err("not checked: not leading".to_owned())),
                ],
            }
        })
    })
}
