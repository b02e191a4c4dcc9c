//! `control-plane`: how many runs per second one scheduler places, and how fast.
//!
//! Starts the real `berth-scheduler` binary as a child process (loopback only, a fresh store
//! under `--data-root`), attaches `--agents` fake agents over real gRPC `AgentService.Attach`,
//! creates one runner per region through `ControlService` and then submits `--runs` runs with
//! `CreateRun`, `--concurrency` in flight. A fake agent answers every `AssignRun` at once with
//! `RunStarted` and `RunExited` (exit 0), so no container is involved.
//!
//! Per run it measures the time from the start of the `CreateRun` call to the moment the agent
//! receives `AssignRun` ("agent ack"), and to the moment the scheduler acknowledges the agent's
//! `RunExited` ("completed"). It prints a short summary, then one JSON object on its last line.
//!
//! ```text
//! cargo run --release -p berth-bench --bin control-plane -- --agents 1000 --runs 20000
//! ```
//!
//! # Layout
//! - this file: the flags, the run (agents → runners → submission → measurement) and the
//!   report of a failed run;
//! - `scheduler`: building and running the scheduler process;
//! - `agents`: the fake agents and what they observed;
//! - `submit`: the `CreateRun` callers;
//! - `report`: the summary and its JSON line.
#![allow(clippy::print_stdout)]

mod agents;
mod report;
mod scheduler;
mod submit;

use agents::{fake_agent, AgentIdentity, Assignment, Observed};
use anyhow::{bail, Context};
use berth_bench::proc_stats;
use berth_bench::stats::{millis, Summary};
use berth_core::convert::{error_code_from_pb, run_status_from_pb};
use berth_proto::v1 as pb;
use clap::Parser;
use report::Report;
use scheduler::{build_scheduler, SchedulerProcess};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use submit::{control_client, submitter};
use tokio::sync::watch;

const REGIONS: [&str; 3] = ["fra", "ams", "lon"];
const GOAL_RUNS_PER_SEC: f64 = 10_000.0;

/// One scheduler, many fake agents over real gRPC, runs submitted through `ControlService`.
#[derive(Parser, Debug)]
#[command(name = "control-plane")]
struct Args {
    /// Fake agents to attach, spread over fra, ams and lon.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Runs to submit.
    #[arg(long, default_value_t = 20_000)]
    runs: usize,
    /// `CreateRun` calls in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Fake agents per HTTP/2 connection (1 = one TCP connection per agent, like real nodes).
    #[arg(long, default_value_t = 1)]
    agents_per_connection: usize,
    /// Memory each fake agent registers with, in MiB.
    #[arg(long, default_value_t = 64 * 1024)]
    agent_memory_mib: u64,
    /// `max_concurrent_runs` each fake agent registers with.
    #[arg(long, default_value_t = 64)]
    agent_slots: u32,
    /// The scheduler binary. Without it the bench runs
    /// `cargo build --release -p berth-scheduler` and uses `<target dir>/release/berth-scheduler`.
    #[arg(long)]
    scheduler_bin: Option<PathBuf>,
    /// The scheduler's log filter (`BERTH_LOG`); `info`, the scheduler's default, logs every run.
    #[arg(long, default_value = "info")]
    scheduler_log: String,
    /// Where the scheduler's temporary data directory goes; must be a real disk (ext4), not
    /// tmpfs, for the fsync cost to be real.
    #[arg(long, default_value = "/var/tmp")]
    data_root: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Run the scheduler on a private etcd cluster of this many members on loopback
    /// (`--store etcd://...`; it campaigns and leads alone) instead of the embedded store.
    #[arg(long, default_value_t = 0)]
    etcd_members: usize,
    /// With --etcd-members: start the members with `--max-txn-ops=N` and the scheduler with
    /// `--etcd-max-txn-ops=N` (etcd's default is 128).
    #[arg(long)]
    etcd_max_txn_ops: Option<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.agents == 0 || args.runs == 0 || args.concurrency == 0 {
        bail!("--agents, --runs and --concurrency must be at least 1");
    }
    let bin = match &args.scheduler_bin {
        Some(bin) => bin.clone(),
        None => build_scheduler()?,
    };
    let etcd = match args.etcd_members {
        0 => None,
        n => Some(
            berth_core::testkit::etcd::EtcdCluster::start_with(
                n,
                &berth_core::testkit::etcd::EtcdOptions {
                    extra_args: args
                        .etcd_max_txn_ops
                        .map(|ops| format!("--max-txn-ops={ops}"))
                        .into_iter()
                        .collect(),
                    ..Default::default()
                },
            )
            .context("starting etcd on loopback")?,
        ),
    };
    let store = etcd.as_ref().map(|e| e.store_url());
    let extra: Vec<String> = match (&etcd, args.etcd_max_txn_ops) {
        (Some(_), Some(ops)) => vec![format!("--etcd-max-txn-ops={ops}")],
        _ => Vec::new(),
    };
    // Dropping `scheduler` kills the process and removes its data directory, on every path.
    let mut scheduler = SchedulerProcess::spawn(
        &bin,
        &args.data_root,
        &args.scheduler_log,
        store.as_deref(),
        &extra,
    )?;
    let observed = Arc::new(Observed::default());
    let outcome = tokio::select! {
        r = tokio::time::timeout(
            Duration::from_secs(args.timeout_secs),
            run_bench(&args, &mut scheduler, &observed),
        ) => r.unwrap_or_else(|_| Err(anyhow::anyhow!("gave up after {} s", args.timeout_secs))),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match outcome {
        Ok(report) => {
            drop(scheduler);
            report.print();
            Ok(())
        }
        Err(e) => {
            eprintln!("scheduler log (last lines):\n{}", scheduler.log_tail(20));
            // What was reached before the failure, still as one JSON object on the last line.
            let peak_rss_kib = proc_stats::peak_rss_kib(scheduler.pid()).unwrap_or(0);
            drop(scheduler);
            let json = serde_json::json!({
                "benchmark": "control-plane",
                "ok": false,
                "error": format!("{e:#}"),
                "agents": args.agents,
                "runs": args.runs,
                "concurrency": args.concurrency,
                "runs_answered": observed.answered_count.load(Ordering::Relaxed),
                "runs_assigned": observed.assigned_count.load(Ordering::Relaxed),
                "runs_completed": observed.completed_count.load(Ordering::Relaxed),
                "duplicate_assignments": observed.duplicate_assignments.lock().map_or(0, |d| d.len()),
                "scheduler_peak_rss_mib": (peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            });
            println!("{json}");
            Err(e)
        }
    }
}

async fn run_bench(
    args: &Args,
    scheduler: &mut SchedulerProcess,
    observed: &Arc<Observed>,
) -> anyhow::Result<Report> {
    let control_channel = scheduler.ready().await?;
    eprintln!(
        "scheduler pid {} on {}; attaching {} agents",
        scheduler.pid(),
        scheduler.addr,
        args.agents
    );

    // Agents.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    let per_connection = args.agents_per_connection.max(1);
    let mut channel = None;
    for i in 0..args.agents {
        if i % per_connection == 0 {
            channel = Some(
                scheduler
                    .endpoint()?
                    .connect()
                    .await
                    .context("connecting an agent")?,
            );
        }
        let Some(channel) = channel.clone() else {
            bail!("no agent connection");
        };
        let me = AgentIdentity {
            node_id: format!("bench-node-{i:05}"),
            boot_id: format!("bench-boot-{i:05}-{}", std::process::id()),
            region: REGIONS[i % REGIONS.len()],
            memory_mib: args.agent_memory_mib,
            slots: args.agent_slots,
        };
        let observed = observed.clone();
        let stop = stop_rx.clone();
        agents.spawn(async move {
            let node = me.node_id.clone();
            if let Err(e) = fake_agent(me, channel, observed.clone(), stop).await {
                observed.fail(format!("agent {node}: {e:#}"));
            }
        });
    }
    wait_for(scheduler, observed, "agents to register", || {
        observed.registered_count.load(Ordering::Relaxed) >= args.agents
    })
    .await?;
    eprintln!("{} agents registered", args.agents);

    // Runners, one per region.
    let mut control = control_client(control_channel);
    let mut runners = Vec::new();
    for region in REGIONS {
        let runner = control
            .create_runner(pb::CreateRunnerRequest {
                spec: Some(pb::RunnerSpec {
                    name: format!("bench-{region}"),
                    image_name: "bench/noop".to_owned(),
                    image_tag: "latest".to_owned(),
                    run_command: Some("true".to_owned()),
                    argv: vec![],
                    entrypoint: None,
                    timeout_seconds: 60,
                    region: region.to_owned(),
                    instance_type: "standard-s".to_owned(),
                    env_variables: vec![],
                    ..Default::default()
                }),
            })
            .await
            .context("CreateRunner")?
            .into_inner();
        runners.push(runner.id);
    }
    let runners = Arc::new(runners);

    // Submission: `concurrency` callers over a few HTTP/2 connections, as an API process would.
    let connections = args.concurrency.div_ceil(64).clamp(1, 8);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = scheduler
            .endpoint()?
            .connect()
            .await
            .context("connecting")?;
        clients.push(control_client(channel));
    }
    eprintln!(
        "submitting {} runs, {} in flight over {} connections",
        args.runs, args.concurrency, connections
    );
    let cpu_before = proc_stats::cpu_seconds(scheduler.pid())?;
    let bench_cpu_before = proc_stats::own_cpu_seconds()?;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut submitters = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        submitters.spawn(submitter(
            clients[i % connections].clone(),
            runners.clone(),
            next.clone(),
            args.runs,
            observed.clone(),
        ));
    }
    let mut submitted = Vec::with_capacity(args.runs);
    while let Some(joined) = submitters.join_next().await {
        submitted.extend(joined.context("submitter panicked")??);
        scheduler.check_alive()?;
    }
    wait_for(scheduler, observed, "every assignment", || {
        observed.assigned_count.load(Ordering::Relaxed) >= args.runs
    })
    .await?;
    wait_for(scheduler, observed, "every exit to be acknowledged", || {
        observed.completed_count.load(Ordering::Relaxed) >= args.runs
    })
    .await?;
    let scheduler_cpu_seconds = proc_stats::cpu_seconds(scheduler.pid())? - cpu_before;
    let bench_cpu_seconds = proc_stats::own_cpu_seconds()? - bench_cpu_before;
    let peak_rss_kib = proc_stats::peak_rss_kib(scheduler.pid())?;
    let _ = stop_tx.send(true);
    while agents.join_next().await.is_some() {}

    // How the runs ended, as the API would show them (read after the measurement).
    let mut final_status: BTreeMap<String, usize> = BTreeMap::new();
    for runner_id in runners.iter() {
        let mut runs = Vec::new();
        let mut after_id = String::new();
        loop {
            let page = control
                .list_runs(pb::ListRunsRequest {
                    newest_first: false,
                    runner_id: runner_id.clone(),
                    limit: 1000,
                    after_id,
                })
                .await
                .context("ListRuns")?
                .into_inner();
            runs.extend(page.runs);
            if page.next_after_id.is_empty() {
                break;
            }
            after_id = page.next_after_id;
        }
        for run in runs {
            let status = run_status_from_pb(run.status).map_or("unknown", |s| s.as_str());
            let key = match error_code_from_pb(run.error_code) {
                Some(code) => format!("{status}:{code}"),
                None => status.to_owned(),
            };
            *final_status.entry(key).or_default() += 1;
        }
    }

    // Join the submitters' view with the agents'.
    let assigned = observed
        .assigned
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let completed = observed
        .completed
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut to_assign = Vec::with_capacity(submitted.len());
    let mut to_complete = Vec::with_capacity(submitted.len());
    let mut create_answer = Vec::with_capacity(submitted.len());
    let mut last_assigned = t0;
    let mut last_completed = t0;
    for s in &submitted {
        let Some(Assignment { at, .. }) = assigned.get(&s.run_id) else {
            bail!("run {} was never assigned", s.run_id);
        };
        let Some(done) = completed.get(&s.run_id) else {
            bail!("run {} never completed", s.run_id);
        };
        to_assign.push(at.saturating_duration_since(s.started));
        to_complete.push(done.saturating_duration_since(s.started));
        create_answer.push(s.answered.saturating_duration_since(s.started));
        last_assigned = last_assigned.max(*at);
        last_completed = last_completed.max(*done);
    }
    if assigned.len() != submitted.len() {
        bail!(
            "{} runs assigned, {} submitted: the scheduler assigned runs nobody submitted",
            assigned.len(),
            submitted.len()
        );
    }
    let duplicates = observed
        .duplicate_assignments
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    for (run_id, first, second) in duplicates.iter().take(5) {
        eprintln!(
            "duplicate AssignRun for {run_id}: first to {} (epoch {}), then to {} (epoch {}) {:.1} ms later",
            first.node_id,
            first.lease_epoch,
            second.node_id,
            second.lease_epoch,
            millis(second.at.saturating_duration_since(first.at))
        );
    }
    Ok(Report {
        agents: args.agents,
        runs: submitted.len(),
        concurrency: args.concurrency,
        agents_per_connection: per_connection,
        wall: last_assigned.duration_since(t0),
        completion_wall: last_completed.duration_since(t0),
        to_assign: Summary::of(to_assign),
        create_answer: Summary::of(create_answer),
        to_complete: Summary::of(to_complete),
        peak_rss_kib,
        scheduler_cpu_seconds,
        bench_cpu_seconds,
        scheduler_log: args.scheduler_log.clone(),
        store: match args.etcd_members {
            0 => "embedded".to_owned(),
            n => match args.etcd_max_txn_ops {
                Some(ops) => format!("etcd ({n} members, max-txn-ops {ops})"),
                None => format!("etcd ({n} members)"),
            },
        },
        duplicate_assignments: duplicates.len(),
        final_status,
    })
}

/// Waits (checking every 5 ms) until `done`; fails if an agent failed or the scheduler died.
/// The measured times come from the agents' own timestamps, so the polling adds nothing to them.
async fn wait_for(
    scheduler: &mut SchedulerProcess,
    observed: &Observed,
    what: &str,
    done: impl Fn() -> bool,
) -> anyhow::Result<()> {
    loop {
        if done() {
            return Ok(());
        }
        if let Some(why) = observed.failure() {
            bail!("while waiting for {what}: {why}");
        }
        scheduler
            .check_alive()
            .with_context(|| format!("while waiting for {what}"))?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
