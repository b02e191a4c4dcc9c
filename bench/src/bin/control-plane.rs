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
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use berth_bench::proc_stats;
use berth_bench::stats::{millis, Summary};
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body as Up;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::control_service_client::ControlServiceClient;
use berth_proto::v1::scheduler_message::Body as Down;
use clap::Parser;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    // Dropping `scheduler` kills the process and removes its data directory, on every path.
    let mut scheduler = SchedulerProcess::spawn(&bin, &args.data_root, &args.scheduler_log)?;
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

/// Builds the scheduler in release mode and returns the binary's path.
fn build_scheduler() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate has no parent directory")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building berth-scheduler (cargo build --release -p berth-scheduler)");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "berth-scheduler"])
        .current_dir(&workspace)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p berth-scheduler failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    Ok(target.join("release").join("berth-scheduler"))
}

// ---- the scheduler process ---------------------------------------------------------------

/// The scheduler child process and its temporary directory (store and log).
struct SchedulerProcess {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    // Removed on drop, after the child is dead (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl SchedulerProcess {
    fn spawn(bin: &Path, data_root: &Path, log_filter: &str) -> anyhow::Result<SchedulerProcess> {
        if !bin.is_file() {
            bail!(
                "no scheduler binary at {}; build it with `cargo build --release -p berth-scheduler`",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-control-plane-")
            .tempdir_in(data_root)
            .with_context(|| {
                format!("creating a temporary directory in {}", data_root.display())
            })?;
        // A free loopback port: bind port 0, note it, release it for the scheduler.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?;
        let log_path = dir.path().join("scheduler.log");
        // The scheduler logs to stdout; both streams go to one file, read back on errors.
        let log = std::fs::File::create(&log_path).context("creating the scheduler log")?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(bin)
            .arg("--grpc-listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--default-registry", "127.0.0.1:1"])
            .env("BERTH_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(SchedulerProcess {
            child,
            addr,
            log_path,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5)))
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the scheduler exited: {status}"),
            None => Ok(()),
        }
    }

    /// Waits until `ControlService` answers.
    async fn ready(&mut self) -> anyhow::Result<Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            if let Ok(channel) = self.endpoint()?.connect().await {
                let mut client = control_client(channel.clone());
                if client.list_nodes(pb::ListNodesRequest {}).await.is_ok() {
                    return Ok(channel);
                }
            }
            if Instant::now() > deadline {
                bail!("the scheduler did not answer on {} within 20 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- fake agents -------------------------------------------------------------------------

/// What the fake agents observed, shared with the main task.
#[derive(Default)]
struct Observed {
    /// When each run's first `AssignRun` arrived, where, under which lease epoch.
    assigned: Mutex<HashMap<String, Assignment>>,
    /// A second `AssignRun` for a run already assigned: (run id, first, second).
    duplicate_assignments: Mutex<Vec<(String, Assignment, Assignment)>>,
    /// When the scheduler acknowledged each run's `RunExited`.
    completed: Mutex<HashMap<String, Instant>>,
    /// `CreateRun` calls answered.
    answered_count: AtomicUsize,
    /// Distinct runs assigned and completed.
    assigned_count: AtomicUsize,
    completed_count: AtomicUsize,
    registered_count: AtomicUsize,
    /// The first agent failure, if any.
    failure: Mutex<Option<String>>,
}

#[derive(Debug, Clone)]
struct Assignment {
    at: Instant,
    node_id: String,
    lease_epoch: u64,
}

impl Observed {
    fn assigned(&self, run_id: &str, new: Assignment) {
        let Ok(mut m) = self.assigned.lock() else {
            return;
        };
        match m.get(run_id) {
            Some(first) => {
                if let Ok(mut d) = self.duplicate_assignments.lock() {
                    d.push((run_id.to_owned(), first.clone(), new));
                }
            }
            None => {
                m.insert(run_id.to_owned(), new);
                self.assigned_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn completed(&self, run_id: String, at: Instant) {
        let Ok(mut m) = self.completed.lock() else {
            return;
        };
        if m.insert(run_id, at).is_none() {
            self.completed_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn fail(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

struct AgentIdentity {
    node_id: String,
    boot_id: String,
    region: &'static str,
    memory_mib: u64,
    slots: u32,
}

/// A fake agent: registers, heartbeats, and answers every assignment at once with
/// `RunStarted` and `RunExited` (exit 0), numbering its reports with an increasing outbox `seq`.
/// It does not reconnect: a broken stream fails the benchmark.
async fn fake_agent(
    me: AgentIdentity,
    channel: Channel,
    observed: Arc<Observed>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (up, up_rx) = mpsc::unbounded_channel();
    let send = |msg: pb::AgentMessage| {
        up.send(msg)
            .map_err(|_| anyhow::anyhow!("the outbound stream is closed"))
    };
    send(pb::AgentMessage {
        seq: 0,
        body: Some(Up::Register(pb::Register {
            node_id: me.node_id.clone(),
            boot_id: me.boot_id.clone(),
            region: me.region.to_owned(),
            total_memory_mib: me.memory_mib,
            cpus: 16,
            max_concurrent_runs: me.slots,
            active_run_ids: vec![],
            agent_version: "berth-bench fake agent".to_owned(),
            // Fields added to the proto later keep their defaults.
            ..Default::default()
        })),
    })?;
    let mut client = AgentServiceClient::new(channel);
    let mut down = client
        .attach(UnboundedReceiverStream::new(up_rx))
        .await
        .context("attach")?
        .into_inner();
    let mut seq = 0u64;
    // Outbox entries not yet acknowledged: (seq of the RunExited, run id).
    let mut unacked_exits: VecDeque<(u64, String)> = VecDeque::new();
    let mut heartbeat: Option<tokio::time::Interval> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick(&mut heartbeat) => send(pb::AgentMessage {
                seq: 0,
                body: Some(Up::Heartbeat(pb::Heartbeat {
                    free_memory_mib: me.memory_mib,
                    running_run_ids: vec![],
                    ..Default::default()
                })),
            })?,
            msg = down.message() => {
                let Some(msg) = msg.context("scheduler stream")? else {
                    bail!("the scheduler closed the stream of {}", me.node_id);
                };
                match msg.body {
                    Some(Down::Registered(r)) => {
                        let every = Duration::from_secs(u64::from(r.heartbeat_interval_seconds.max(1)));
                        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        heartbeat = Some(i);
                        observed.registered_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Down::AssignRun(a)) => {
                        let now = Instant::now();
                        observed.assigned(&a.run_id, Assignment {
                            at: now,
                            node_id: me.node_id.clone(),
                            lease_epoch: a.lease_epoch,
                        });
                        let nanos = unix_nanos();
                        seq += 1;
                        send(pb::AgentMessage {
                            seq,
                            body: Some(Up::RunStarted(pb::RunStarted {
                                run_id: a.run_id.clone(),
                                lease_epoch: a.lease_epoch,
                                started_at_unix_nanos: nanos,
                                image_digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000".to_owned(),
                            })),
                        })?;
                        seq += 1;
                        send(pb::AgentMessage {
                            seq,
                            body: Some(Up::RunExited(pb::RunExited {
                                run_id: a.run_id.clone(),
                                lease_epoch: a.lease_epoch,
                                exit_code: 0,
                                exited_at_unix_nanos: nanos,
                                reason: pb::ExitReason::Exited.into(),
                                error_code: String::new(),
                                error_message: String::new(),
                                oom_killed: false,
                            })),
                        })?;
                        unacked_exits.push_back((seq, a.run_id));
                    }
                    Some(Down::Ack(ack)) => {
                        let now = Instant::now();
                        while unacked_exits.front().is_some_and(|(s, _)| *s <= ack.up_to_seq) {
                            let Some((_, run_id)) = unacked_exits.pop_front() else { break };
                            observed.completed(run_id, now);
                        }
                    }
                    // Nothing to stop or warm: the fake agent runs nothing.
                    Some(Down::StopRun(_)) | Some(Down::Warmup(_)) | Some(Down::WarmPins(_)) | None => {}
                }
            }
        }
    }
}

async fn tick(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- the benchmark -----------------------------------------------------------------------

struct Submitted {
    run_id: String,
    started: Instant,
    answered: Instant,
}

type AsOperator = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type Control = ControlServiceClient<InterceptedService<Channel, AsOperator>>;

/// The benchmark calls the control service as the API does for the admin token: in project
/// `default`, as admin (for `ListNodes`).
fn control_client(channel: Channel) -> Control {
    fn as_operator(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let m = req.metadata_mut();
        m.insert(
            berth_core::auth::PROJECT_METADATA,
            tonic::metadata::MetadataValue::from_static(berth_core::auth::DEFAULT_PROJECT),
        );
        m.insert(
            berth_core::auth::ADMIN_METADATA,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
    ControlServiceClient::with_interceptor(channel, as_operator as AsOperator)
}

async fn submitter(
    mut client: Control,
    runners: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    total: usize,
    observed: Arc<Observed>,
) -> anyhow::Result<Vec<Submitted>> {
    let mut out = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return Ok(out);
        }
        let started = Instant::now();
        let run = client
            .create_run(pb::CreateRunRequest {
                runner_id: runners[i % runners.len()].clone(),
                ..Default::default()
            })
            .await
            .context("CreateRun")?
            .into_inner();
        observed.answered_count.fetch_add(1, Ordering::Relaxed);
        out.push(Submitted {
            run_id: run.id,
            started,
            answered: Instant::now(),
        });
    }
}

struct Report {
    agents: usize,
    runs: usize,
    concurrency: usize,
    agents_per_connection: usize,
    wall: Duration,
    completion_wall: Duration,
    to_assign: Summary,
    create_answer: Summary,
    to_complete: Summary,
    peak_rss_kib: u64,
    scheduler_cpu_seconds: f64,
    bench_cpu_seconds: f64,
    scheduler_log: String,
    duplicate_assignments: usize,
    final_status: BTreeMap<String, usize>,
}

impl Report {
    fn runs_per_sec(&self) -> f64 {
        self.runs as f64 / self.wall.as_secs_f64()
    }

    fn print(&self) {
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
                    container_registry_id: None,
                    stop_grace_seconds: None,
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
            let key = match run.error_code {
                Some(code) => format!("{}:{code}", run.status),
                None => run.status,
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
