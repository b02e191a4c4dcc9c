//! `takeover`: how long a scheduler takes to load its state (`Scheduler::open`, what a new
//! leader does before it serves) when the store holds a long history of finished runs.
//!
//! For each backend (the embedded store in a temporary directory under `--data-root`, and/or a
//! private etcd started on free loopback ports) it fills the store through the `Store` trait
//! with the records the engine writes — one runner, run records, the runner's run index, the
//! index of active runs — sealed as `berth-scheduler` seals them, then:
//! 1. with only the `--active` runs stored, times `Scheduler::open` (`--repeat` times);
//! 2. adds `--finished` finished runs (older than the active ones) and times `Scheduler::open`
//!    again, and the full scan of `runs/` that the previous build's `open` did instead of
//!    reading the index (list every run record, decode it, keep the ones not ended) — as one
//!    range request, like that build, and in pages of 1,000 (etcd refuses the one range);
//! 3. deletes the index and its marker (a store as an older build left it) and times the one
//!    `open` that builds the index again.
//!
//! It prints a short summary, then one JSON object on its last line.
//!
//! ```text
//! cargo run --release -p berth-bench --bin takeover -- --finished 100000 --active 1000
//! ```
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use berth_bench::stats::millis;
use berth_core::model::{EnvVar, Runner, RunnerSpec};
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, EtcdConfig, EtcdStore, Expect, SealedStore, Store, Txn};
use berth_core::testkit::etcd::{EtcdCluster, EtcdOptions};
use berth_core::{keys, Run, RunStatus};
use berth_scheduler::engine::{Config, Scheduler};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time to load the scheduler's state from a store with a long history.
#[derive(Parser, Debug)]
#[command(name = "takeover")]
struct Args {
    /// Finished runs in the store (succeeded, failed, canceled).
    #[arg(long, default_value_t = 100_000)]
    finished: usize,
    /// Runs that have not ended (half running on nodes, half waiting).
    #[arg(long, default_value_t = 1_000)]
    active: usize,
    /// Which stores: `embedded`, `etcd` or `both`.
    #[arg(long, default_value = "both")]
    store: String,
    /// Members of the private etcd cluster (1 or 3), on free loopback ports.
    #[arg(long, default_value_t = 1)]
    etcd_members: usize,
    /// The etcd binary (Debian's etcd-server 3.4).
    #[arg(long, env = "BERTH_ETCD_BIN", default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Timed repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Where the stores' temporary directories go (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    data_root: PathBuf,
}

/// Stored keys are sealed like `berth-scheduler` seals them (see its `main.rs`).
const SEALED: [&str; 3] = [keys::RUNNERS, keys::RUNS, keys::RUN_FILES];
/// Writes per fill transaction: under etcd's 128 operations per request.
const FILL_TXN_OPS: usize = 100;
/// Fill transactions in flight.
const FILL_IN_FLIGHT: usize = 32;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let (embedded, etcd) = match args.store.as_str() {
        "embedded" => (true, false),
        "etcd" => (false, true),
        "both" => (true, true),
        other => bail!("unknown --store {other}; use embedded, etcd or both"),
    };
    let key = Arc::new(SecretKey::generate());
    let mut results = Vec::new();
    if embedded {
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-takeover-")
            .tempdir_in(&args.data_root)
            .with_context(|| format!("a temporary directory in {}", args.data_root.display()))?;
        let path = dir.path().join("state.redb");
        let open = || -> anyhow::Result<SealedStore<EmbeddedStore>> {
            // The previous scheduler's store may still be closing: retry briefly.
            let mut tries = 0;
            loop {
                match EmbeddedStore::open(&path) {
                    Ok(store) => return Ok(SealedStore::new(store, key.clone(), &SEALED)),
                    Err(e) if tries >= 50 => {
                        return Err(
                            anyhow::Error::new(e).context(format!("opening {}", path.display()))
                        )
                    }
                    Err(_) => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        };
        results.push(measure("embedded", &args, || async { open() }).await?);
    }
    if etcd {
        let cluster = EtcdCluster::start_with(
            args.etcd_members,
            &EtcdOptions {
                bin: Some(args.etcd_bin.clone()),
                parent_dir: Some(args.data_root.clone()),
                extra_args: vec!["--quota-backend-bytes=4294967296".to_owned()],
            },
        )
        .context("starting etcd")?;
        let endpoints = cluster.endpoints();
        let connect = || async {
            let store = EtcdStore::connect(EtcdConfig::new(endpoints.clone())).await?;
            Ok(SealedStore::new(store, key.clone(), &SEALED))
        };
        wait_healthy(&connect().await?).await?;
        let name = format!(
            "etcd ({} member{})",
            args.etcd_members,
            if args.etcd_members == 1 { "" } else { "s" }
        );
        results.push(measure(&name, &args, connect).await?);
    }
    for r in &results {
        let one_range = match (r.full_scan_ms, &r.full_scan_error) {
            (Some(ms), _) => format!("{ms:.1} ms ({:.0}x)", ms / r.open_ms.max(0.001)),
            (None, Some(e)) => format!("failed ({e})"),
            (None, None) => "not run".to_owned(),
        };
        println!(
            "{:<18} active only: open {:.1} ms | +{} finished: open {:.1} ms; previous build's scan: one range {}, paged {:.1} ms ({:.0}x); first open without the index (upgrade) {:.1} ms",
            r.store,
            r.open_active_only_ms,
            args.finished,
            r.open_ms,
            one_range,
            r.paged_scan_ms,
            r.paged_scan_ms / r.open_ms.max(0.001),
            r.upgrade_open_ms,
        );
    }
    let json = serde_json::json!({
        "benchmark": "takeover",
        "finished": args.finished,
        "active": args.active,
        "repeat": args.repeat,
        "results": results.iter().map(|r| serde_json::json!({
            "store": r.store,
            "open_active_only_ms": round(r.open_active_only_ms),
            "open_ms": round(r.open_ms),
            "full_scan_ms": r.full_scan_ms.map(round),
            "full_scan_error": r.full_scan_error,
            "paged_scan_ms": round(r.paged_scan_ms),
            "paged_scan_over_open": round(r.paged_scan_ms / r.open_ms.max(0.001)),
            "upgrade_open_ms": round(r.upgrade_open_ms),
            "fill_s": round(r.fill_secs),
        })).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

struct Measured {
    store: String,
    open_active_only_ms: f64,
    open_ms: f64,
    /// The previous build's one range over `runs/`, when it worked.
    full_scan_ms: Option<f64>,
    full_scan_error: Option<String>,
    /// The same scan in pages of [`SCAN_PAGE`].
    paged_scan_ms: f64,
    /// The first open of the same store without the index (it builds it).
    upgrade_open_ms: f64,
    fill_secs: f64,
}

/// Runs per range request in the paged scan.
const SCAN_PAGE: usize = 1000;

fn check_found(found: usize, active: usize) -> anyhow::Result<()> {
    if found != active {
        bail!("the full scan found {found} active runs, not {active}");
    }
    Ok(())
}

/// Fills the store `connect` opens and times the loads (see the module doc).
async fn measure<S, F, Fut>(name: &str, args: &Args, connect: F) -> anyhow::Result<Measured>
where
    S: Store,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    eprintln!("{name}: filling {} active runs", args.active);
    let runner = runner();
    let store = connect().await?;
    store
        .commit(Txn::new().put(keys::runner(&runner.id), encode(&runner), Expect::Any))
        .await?;
    // Finished runs are older than the active ones: reserve their ids (UUIDv7) first.
    let finished_ids: Vec<String> = (0..args.finished).map(|_| new_id()).collect();
    let active: Vec<Run> = (0..args.active)
        .map(|i| {
            let status = if i % 2 == 0 {
                RunStatus::Running
            } else {
                RunStatus::Pending
            };
            run(&runner, new_id(), status, i)
        })
        .collect();
    let started = Instant::now();
    fill(&store, &runner, &active)
        .await
        .context("storing the active runs")?;
    drop(store);
    let open_active_only = time_open(args.repeat, &connect, args.active).await?;

    eprintln!("{name}: filling {} finished runs", args.finished);
    let store = connect().await?;
    let finished: Vec<Run> = finished_ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let status = [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Canceled][i % 3];
            run(&runner, id, status, i)
        })
        .collect();
    fill(&store, &runner, &finished)
        .await
        .context("storing the finished runs")?;
    let fill_secs = started.elapsed().as_secs_f64();
    // The previous build read every run with one range request; etcd refuses a response
    // above its client's 4 MiB message limit, so that may fail outright: then only the paged
    // scan (what a previous build would have needed at the least) is timed.
    let mut one_range_error = None;
    let mut one_range = Vec::new();
    let mut paged = Vec::new();
    for _ in 0..args.repeat {
        if one_range_error.is_none() {
            let t = Instant::now();
            match full_scan(&store).await {
                Ok(found) => {
                    one_range.push(t.elapsed());
                    check_found(found, args.active)?;
                }
                Err(e) => {
                    eprintln!("{name}: one range over runs/ failed: {e:#}");
                    one_range_error = Some(format!("{e:#}"));
                }
            }
        }
        let t = Instant::now();
        let found = paged_scan(&store).await?;
        paged.push(t.elapsed());
        check_found(found, args.active)?;
    }
    drop(store);
    let open = time_open(args.repeat, &connect, args.active).await?;
    // The one-time upgrade: the same store as an older build left it (no index, no marker).
    let store = connect().await?;
    let mut index: Vec<String> = store
        .list_prefix(keys::ACTIVE_RUNS)
        .await?
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    index.push(keys::ACTIVE_RUNS_INDEXED.to_owned());
    for chunk in index.chunks(FILL_TXN_OPS) {
        let txn = chunk
            .iter()
            .fold(Txn::new(), |t, key| t.delete(key.clone(), Expect::Any));
        store.commit(txn).await?;
    }
    drop(store);
    let upgrade = time_open(1, &connect, args.active).await?;
    eprintln!("{name}: done");
    Ok(Measured {
        store: name.to_owned(),
        open_active_only_ms: open_active_only,
        open_ms: open,
        full_scan_ms: (!one_range.is_empty()).then(|| median_ms(one_range)),
        full_scan_error: one_range_error,
        paged_scan_ms: median_ms(paged),
        upgrade_open_ms: upgrade,
        fill_secs,
    })
}

/// Median milliseconds of `Scheduler::open` on a fresh connection, checking what it loaded.
async fn time_open<S, F, Fut>(repeat: usize, connect: &F, active: usize) -> anyhow::Result<f64>
where
    S: Store,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut times = Vec::new();
    for _ in 0..repeat {
        let store = connect().await?;
        let t = Instant::now();
        let scheduler = Scheduler::open(store, Config::default())
            .await
            .context("Scheduler::open")?;
        times.push(t.elapsed());
        let loaded = scheduler.active_run_count().await;
        if loaded != active {
            bail!("open loaded {loaded} active runs, not {active}");
        }
        drop(scheduler);
    }
    Ok(median_ms(times))
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort_unstable();
    times.get(times.len() / 2).map_or(0.0, |d| millis(*d))
}

/// What the previous build's `open` did with the runs: list every record, decode it, keep the
/// ones that have not ended. Returns how many it kept.
async fn full_scan<S: Store>(store: &S) -> anyhow::Result<usize> {
    let mut active = BTreeMap::new();
    for kv in store.list_prefix(keys::RUNS).await? {
        let run: Run = serde_json::from_slice(&kv.value).context("decoding a run")?;
        if !run.status.is_terminal() {
            active.insert(run.id.clone(), run);
        }
    }
    Ok(active.len())
}

/// [`full_scan`] in pages of [`SCAN_PAGE`] runs, each its own range request.
async fn paged_scan<S: Store>(store: &S) -> anyhow::Result<usize> {
    let end = keys::prefix_end(keys::RUNS);
    let mut start = keys::RUNS.to_owned();
    let mut active = BTreeMap::new();
    loop {
        let page = store.range(&start, &end, SCAN_PAGE).await?;
        for kv in &page {
            let run: Run = serde_json::from_slice(&kv.value).context("decoding a run")?;
            if !run.status.is_terminal() {
                active.insert(run.id.clone(), run);
            }
        }
        match page.last() {
            Some(last) if page.len() == SCAN_PAGE => start = format!("{}\0", last.key),
            _ => return Ok(active.len()),
        }
    }
}

/// Stores `runs` as the engine does: the record, the runner's index entry, and (for a run that
/// has not ended) the active index entry; plus the marker that the index is complete.
async fn fill<S: Store>(store: &S, runner: &Runner, runs: &[Run]) -> anyhow::Result<()> {
    let mut in_flight = Vec::new();
    let mut txn = Txn::new();
    for run in runs {
        txn = txn.put(keys::run(&run.id), encode(run), Expect::Any).put(
            keys::runner_run(&runner.id, &run.id),
            Vec::new(),
            Expect::Any,
        );
        if !run.status.is_terminal() {
            txn = txn.put(keys::active_run(&run.id), Vec::new(), Expect::Any);
        }
        if txn.ops.len() + 3 > FILL_TXN_OPS {
            in_flight.push(store.submit(std::mem::take(&mut txn)));
        }
        if in_flight.len() >= FILL_IN_FLIGHT {
            for done in futures::future::join_all(in_flight.drain(..)).await {
                done?;
            }
        }
    }
    txn = txn.put(keys::ACTIVE_RUNS_INDEXED, b"1".to_vec(), Expect::Any);
    in_flight.push(store.submit(txn));
    for done in futures::future::join_all(in_flight).await {
        done?;
    }
    Ok(())
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn runner() -> Runner {
    Runner {
        id: new_id(),
        project: berth_core::auth::DEFAULT_PROJECT.to_owned(),
        spec: RunnerSpec {
            name: "bench-takeover".to_owned(),
            image_name: "busybox".to_owned(),
            image_tag: "latest".to_owned(),
            run_command: Some("echo hello from a benchmark".to_owned()),
            argv: vec![],
            entrypoint: None,
            timeout_seconds: 300,
            region: "fra".to_owned(),
            instance_type: "standard-s".to_owned(),
            env_variables: env(),
            container_registry_id: None,
            stop_grace_seconds: None,
            max_concurrent_runs: None,
            retry_policy: None,
            notify: None,
            isolation: Default::default(),
        },
        warmed_at: None,
        created_at: berth_core::now_unix_millis(),
        updated_at: berth_core::now_unix_millis(),
        warmup: None,
    }
}

fn env() -> Vec<EnvVar> {
    ["DATABASE_URL", "LOG_LEVEL", "FEATURE_FLAGS"]
        .into_iter()
        .map(|k| EnvVar {
            env_key: k.to_owned(),
            env_val: format!("value-of-{}", k.to_lowercase()),
            secret: false,
        })
        .collect()
}

/// A run record shaped like the engine's at `status`: an ended run has run on a node and
/// holds its exit; a running one holds its lease; a waiting one its reason.
fn run(runner: &Runner, id: String, status: RunStatus, i: usize) -> Run {
    let now = berth_core::now_unix_millis();
    let on_node = status != RunStatus::Pending;
    Run {
        id,
        runner_id: runner.id.clone(),
        project: runner.project.clone(),
        status,
        exit_code: match status {
            RunStatus::Succeeded => Some(0),
            RunStatus::Failed => Some(1),
            RunStatus::Canceled => Some(143),
            _ => None,
        },
        command: runner.spec.run_command.clone(),
        argv: vec![],
        entrypoint: None,
        env: runner.spec.env_variables.clone(),
        image: "docker.io/library/busybox:latest".to_owned(),
        image_digest: on_node.then(|| {
            "sha256:3fbc632167424a6d997e74f52b878d7cc478225cffac6bc977eedfe51c7f4e79".to_owned()
        }),
        image_pull: None,
        region: runner.spec.region.clone(),
        instance_type: runner.spec.instance_type.clone(),
        memory_mib: 1024,
        cpu_millis: 1000,
        timeout_seconds: runner.spec.timeout_seconds,
        node_id: on_node.then(|| format!("bench-node-{:02}", i % 16)),
        lease_epoch: u64::from(on_node),
        created_at: now - 60_000,
        started_at: on_node.then_some(now - 55_000),
        completed_at: status.is_terminal().then_some(now - 1_000),
        error_code: None,
        error_message: None,
        pending_reason: (!on_node).then(|| "no node in fra has 1024 MiB free".to_owned()),
        stop_requested: false,
        warm_pin: None,
        container_registry_id: None,
        oom_killed: false,
        price_nano_usd_per_second: 11_574,
        queue_position: None,
        files: vec![],
        stop_grace_seconds: Some(10),
        timeline: Default::default(),
        trace_parent: None,
        attempt: 1,
        first_attempt_id: None,
        previous_attempt_id: None,
        next_attempt_id: None,
        retry_policy: None,
        not_before: None,
        retry_cause: None,
        schedule_id: None,
        scheduled_for: None,
        final_attempt: None,
        ephemeral: None,
        notification: None,
        isolation: Default::default(),
        runtime: None,
    }
}

/// Waits until etcd has a leader and serves a read.
async fn wait_healthy<S: Store>(store: &S) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.get("health").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("etcd never became healthy: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
