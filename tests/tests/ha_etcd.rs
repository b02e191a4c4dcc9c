//! The control plane on etcd, end to end (issue #11): a private 3-member etcd cluster on
//! loopback, two schedulers campaigning on it (only the leader listens), the API and the
//! agents given both scheduler addresses, real containers.
//!
//! - `kill -9` of the leader in the middle of a burst, several rounds in one run: every
//!   acknowledged run reaches one terminal state, every log line is stored exactly once, and the
//!   history of what the clients saw is checked against the run model (`ha/history.rs`).
//! - SIGSTOP of the leader past its lease, the standby takes over, SIGCONT: nothing the old
//!   leader would write (it would declare the nodes it stopped hearing from lost and fail their
//!   runs) lands; it steps down.
//! - etcd outages: one member of three killed mid-burst changes nothing the clients see; all
//!   members down makes the API answer 503 with a JSON error while a run keeps running on its
//!   node, and when etcd is back everything catches up with no run or log line lost.

mod common;
#[path = "ha/history.rs"]
mod history;

use anyhow::{bail, ensure, Context, Result};
use berth_core::testkit::etcd::EtcdCluster;
use berth_core::RunStatus;
use common::{AgentSpec, Fleet, FleetOptions, TOKEN};
use history::{History, Op};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests here each run a whole fleet with containers under load and kill or freeze parts of
/// it on a schedule: one at a time, so that they do not starve each other of the two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fleet on `etcd` with both scheduler slots campaigning (slot 0 leads).
async fn ha_fleet(etcd: &EtcdCluster, agents: &[AgentSpec]) -> Result<Fleet> {
    let mut fleet = Fleet::start_opts(
        agents,
        FleetOptions {
            standby_scheduler: true,
            store: Some(etcd.store_url()),
            ..Default::default()
        },
    )
    .await?;
    fleet.start_candidate(1).await?;
    Ok(fleet)
}

fn agents(n: usize) -> Vec<AgentSpec> {
    (0..n)
        .map(|_| AgentSpec {
            region: "fra",
            memory_mib: 16 * 1024,
            max_runs: 16,
        })
        .collect()
}

/// A runner (in `fra`) whose runs print `n1` … `n{lines}`, one line every `pace` seconds
/// (none: at once), and those lines.
async fn numbered_runner(
    fleet: &Fleet,
    lines: usize,
    pace: Option<&str>,
) -> Result<(String, Vec<String>)> {
    let sleep = pace.map(|p| format!(" sleep {p};")).unwrap_or_default();
    let command = format!("i=1; while [ $i -le {lines} ]; do echo n$i; i=$((i+1));{sleep} done");
    let runner = fleet
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": command}),
        )
        .await?;
    Ok((runner, (1..=lines).map(|i| format!("n{i}")).collect()))
}

fn status_of(v: &Value) -> Option<RunStatus> {
    serde_json::from_value(v["run"]["status"].clone()).ok()
}

/// What one client does and records: POSTs with idempotency keys (retried through failovers
/// with the same key) and GETs of runs.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    api: String,
    runner: String,
    history: Arc<History>,
    /// Answers the model does not allow at all (a 500, a 4xx on a valid request).
    errors: Arc<Mutex<Vec<String>>>,
}

impl Client {
    fn new(fleet: &Fleet, runner: &str, history: Arc<History>) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()?,
            api: fleet.api_url.clone(),
            runner: runner.to_owned(),
            history,
            errors: Arc::default(),
        })
    }

    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Creates a run, retrying with the same key until acknowledged (or `within` passes).
    async fn create(&self, key: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let invoked = Instant::now();
            let res = self
                .http
                .post(format!("{}/v1/runners/{}/runs", self.api, self.runner))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", key)
                .json(&json!({}))
                .send()
                .await;
            let (status, body) = match res {
                Ok(r) => {
                    let status = r.status().as_u16();
                    (status, r.json::<Value>().await.unwrap_or(Value::Null))
                }
                Err(_) => (0, Value::Null),
            };
            match status {
                200 | 201 => {
                    let id = body["run"]["id"].as_str().map(str::to_owned);
                    self.history.record(
                        invoked,
                        Op::Create {
                            key: key.to_owned(),
                            run_id: id.clone(),
                        },
                    );
                    if id.is_none() {
                        self.error(format!("{key}: {status} without a run id: {body}"));
                    }
                    return id;
                }
                // The scheduler is failing over (or the request's fate is unknown): retry.
                0 | 503 | 504 => {
                    if status == 503 && body["code"] != json!("unavailable") {
                        self.error(format!("{key}: 503 without the JSON error: {body}"));
                    }
                    self.history.record(
                        invoked,
                        Op::Create {
                            key: key.to_owned(),
                            run_id: None,
                        },
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    self.error(format!("{key}: POST answered {status}: {body}"));
                    return None;
                }
            }
        }
        self.error(format!("{key}: not acknowledged within {within:?}"));
        None
    }

    /// Reads a run and records what it saw; `None` when the API could not answer (not recorded:
    /// a failed read observes nothing).
    async fn read(&self, run_id: &str) -> Option<Option<RunStatus>> {
        let invoked = Instant::now();
        let res = self
            .http
            .get(format!(
                "{}/v1/runners/{}/runs/{run_id}",
                self.api, self.runner
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let seen = match status {
            200 => match status_of(&body) {
                Some(s) => Some(s),
                None => {
                    self.error(format!("{run_id}: no status in {body}"));
                    return None;
                }
            },
            404 => None,
            503 | 504 => return None,
            _ => {
                self.error(format!("{run_id}: GET answered {status}: {body}"));
                return None;
            }
        };
        self.history.record(
            invoked,
            Op::Read {
                run_id: run_id.to_owned(),
                status: seen,
            },
        );
        Some(seen)
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// `n` runs from `concurrency` clients; calls `midway` once `trigger` runs are acknowledged.
/// Returns the acknowledged run ids.
async fn burst(
    client: &Client,
    tag: &str,
    n: usize,
    concurrency: usize,
    trigger: usize,
    midway: impl FnOnce() -> Result<()>,
) -> Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, acked) = (client.clone(), next.clone(), acked.clone());
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                if let Some(id) = client
                    .create(&format!("{tag}-{i}"), Duration::from_secs(90))
                    .await
                {
                    acked.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                }
            }
        }));
    }
    let mut midway = Some(midway);
    while tasks.iter().any(|t| !t.is_finished()) {
        let count = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
        if count >= trigger {
            if let Some(f) = midway.take() {
                f()?;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await?;
    }
    if let Some(f) = midway.take() {
        f()?;
    }
    let ids = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(ids)
}

/// Reads random acknowledged runs until `stop`, so the history holds reads across the failover.
fn spawn_reader(
    client: Client,
    ids: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let id = {
                let ids = ids.lock().unwrap_or_else(|p| p.into_inner());
                (!ids.is_empty()).then(|| ids[i.wrapping_mul(7919) % ids.len()].clone())
            };
            if let Some(id) = id {
                client.read(&id).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Reads every run until all are terminal (recording each read); returns the final statuses.
async fn settle(
    client: &Client,
    ids: &[String],
    within: Duration,
) -> Result<BTreeMap<String, RunStatus>> {
    let deadline = Instant::now() + within;
    let mut done = BTreeMap::new();
    loop {
        for id in ids {
            if done.contains_key(id) {
                continue;
            }
            if let Some(Some(s)) = client.read(id).await {
                if s.is_terminal() {
                    done.insert(id.clone(), s);
                }
            }
        }
        if done.len() == ids.len() {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            let mut waiting = Vec::new();
            for id in ids.iter().filter(|id| !done.contains_key(*id)).take(5) {
                waiting.push(format!("{id}: {:?}", client.read(id).await));
            }
            anyhow::bail!(
                "{} of {} runs not terminal after {within:?}; some of them: {waiting:?}",
                ids.len() - done.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `e` first (what a truncated CI excerpt shows), then the tails of the fleet's logs.
/// Each run's record as the API shows it (status, error code and message, node, attempts):
/// what a failure message needs to say why a run did not succeed.
async fn explain(fleet: &Fleet, runner: &str, ids: &[&String]) -> String {
    let mut out = String::new();
    for id in ids.iter().take(10) {
        match fleet.run(runner, id).await {
            Ok(v) => out.push_str(&format!("\n  {id}: {v}")),
            Err(e) => out.push_str(&format!("\n  {id}: (not read: {e:#})")),
        }
        out.push('\n');
        out.push_str(&fleet.log_lines_about(id, 20));
    }
    out
}

fn with_logs(e: anyhow::Error, fleet: &Fleet) -> anyhow::Error {
    anyhow::anyhow!("{e:#}\n---- the fleet's logs (tails)\n{}", fleet.logs())
}

/// Every run printed exactly `expected` (stdout), each line once, in order.
async fn check_logs(
    fleet: &Fleet,
    runner: &str,
    ids: &[String],
    expected: &[String],
) -> Result<()> {
    for id in ids {
        let logs = fleet.all_logs(runner, id).await?;
        let lines = common::msgs(&logs, "stdout");
        if lines != expected {
            let run = explain(fleet, runner, &[id]).await;
            bail!(with_logs(
                anyhow::anyhow!("run {id}: stored lines {lines:?}, expected {expected:?}{run}"),
                fleet
            ));
        }
        let ids: BTreeSet<u64> = logs.iter().filter_map(|l| l["id"].as_u64()).collect();
        ensure!(ids.len() == logs.len(), "run {id}: a line id repeats");
    }
    Ok(())
}

fn check_history(history: &History, client: &Client) -> Result<()> {
    let events = history.events();
    let violations = history::check(&events);
    ensure!(violations.is_empty(), "history violations: {violations:#?}");
    let unfinished = history::unfinished(&events);
    ensure!(
        unfinished.is_empty(),
        "runs not terminal at the end: {unfinished:?}"
    );
    let errors = client.errors();
    ensure!(errors.is_empty(), "answers outside the model: {errors:#?}");
    Ok(())
}

/// Every one of `n` creations acknowledged; if not, the error says what the API answered the
/// others (the client's record of answers outside the model) and carries the fleet's logs.
fn check_acknowledged(
    ids: &[String],
    n: usize,
    client: &Client,
    fleet: &Fleet,
    what: &str,
) -> Result<()> {
    if ids.len() == n {
        return Ok(());
    }
    Err(with_logs(
        anyhow::anyhow!(
            "{what}: {} of {n} acknowledged; answers outside the model: {:#?}",
            ids.len(),
            client.errors()
        ),
        fleet,
    ))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kill -9 of the leader mid-burst, several rounds; each round's killed scheduler rejoins as
/// the standby for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_leader_mid_burst_loses_and_doubles_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // The first round is the burst of 1,000 runs; the next ones repeat the failover
    // with smaller bursts.
    let rounds = env_usize("BERTH_HA_ROUNDS", 3);
    let first_runs = env_usize("BERTH_HA_FIRST_RUNS", 1000);
    let later_runs = env_usize("BERTH_HA_RUNS", 200);
    let etcd = EtcdCluster::start(3)?;
    let mut fleet = ha_fleet(&etcd, &agents(2)).await?;
    let (runner, expected) = numbered_runner(&fleet, 3, None).await?;
    let history = Arc::new(History::default());
    let client = Client::new(&fleet, &runner, history.clone())?;
    let mut takeovers = Vec::new();
    for round in 0..rounds {
        let runs = if round == 0 { first_runs } else { later_runs };
        let leader = fleet.wait_leader(Duration::from_secs(30)).await?;
        let standby = 1 - leader;
        let standby_addr: std::net::SocketAddr = fleet
            .slot_addr(standby)
            .context("standby address")?
            .parse()?;
        let takeover = Arc::new(Mutex::new(None));
        let ids = {
            let fleet = &mut fleet;
            let takeover = takeover.clone();
            burst(
                &client,
                &format!("r{round}"),
                runs,
                32,
                runs / 3,
                move || {
                    let killed = Instant::now();
                    fleet.signal_slot(leader, "KILL")?;
                    // Time until the standby accepts connections (it listens once it leads).
                    std::thread::spawn(move || {
                        while killed.elapsed() < Duration::from_secs(60) {
                            let probe = std::net::TcpStream::connect_timeout(
                                &standby_addr,
                                Duration::from_millis(100),
                            );
                            if probe.is_ok() {
                                *takeover.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(killed.elapsed());
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    });
                    Ok(())
                },
            )
            .await?
        };
        let now_leads = fleet.wait_leader(Duration::from_secs(30)).await?;
        ensure!(
            now_leads == standby,
            "slot {now_leads} leads, expected the standby {standby}"
        );
        let took = *takeover.lock().unwrap_or_else(|p| p.into_inner());
        takeovers.push(took.context("the standby never listened after the kill")?);
        // The killed one rejoins as the next round's standby.
        fleet.start_candidate(leader).await?;
        let shared = Arc::new(Mutex::new(ids.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = spawn_reader(client.clone(), shared, stop.clone());
        // Real containers, each with its own network: on a loaded 2-core CI machine a run's
        // whole life can take a few hundred milliseconds, so the bound grows with the burst.
        let within = Duration::from_secs(300).max(Duration::from_millis(600) * runs as u32);
        let finals = settle(&client, &ids, within).await;
        stop.store(true, Ordering::SeqCst);
        reader.await?;
        let finals = finals.map_err(|e| with_logs(e, &fleet))?;
        let failed: Vec<_> = finals
            .iter()
            .filter(|(_, s)| **s != RunStatus::Succeeded)
            .map(|(id, _)| id)
            .collect();
        if !failed.is_empty() {
            let why = explain(&fleet, &runner, &failed).await;
            bail!(with_logs(
                anyhow::anyhow!("round {round}: {} runs did not succeed:{why}", failed.len()),
                &fleet
            ));
        }
        check_acknowledged(&ids, runs, &client, &fleet, &format!("round {round}"))?;
        check_logs(&fleet, &runner, &ids, &expected).await?;
        check_history(&history, &client)?;
    }
    eprintln!(
        "kill -9 rounds: {rounds} (first {first_runs} runs, then {later_runs}); kill to standby listening: {takeovers:?}"
    );
    Ok(())
}

/// A runner's `max_concurrent_runs` holds across a `kill -9` of the leader mid-burst: the new
/// leader counts the runs holding slots from the active runs it loads and reads the cap from the
/// runner, so no more than the cap of its runs ever hold a node, before, during or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_cap_holds_across_a_failover() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const CAP: usize = 3;
    let etcd = EtcdCluster::start(3)?;
    let mut fleet = ha_fleet(&etcd, &agents(2)).await?;
    let runner = fleet
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "sleep 0.2; echo done",
                   "max_concurrent_runs": CAP}),
        )
        .await?;
    let history = Arc::new(History::default());
    let client = Client::new(&fleet, &runner, history.clone())?;
    let leader = fleet.wait_leader(Duration::from_secs(30)).await?;
    let ids = {
        let fleet = &mut fleet;
        burst(&client, "cap", 150, 16, 50, move || {
            fleet.signal_slot(leader, "KILL")
        })
        .await?
    };
    let now_leads = fleet.wait_leader(Duration::from_secs(30)).await?;
    ensure!(now_leads == 1 - leader, "slot {now_leads} leads");
    check_acknowledged(&ids, 150, &client, &fleet, "the burst across the kill")?;
    let finals = settle(&client, &ids, Duration::from_secs(300))
        .await
        .map_err(|e| with_logs(e, &fleet))?;
    let failed: Vec<_> = finals
        .iter()
        .filter(|(_, s)| **s != RunStatus::Succeeded)
        .map(|(id, _)| id)
        .collect();
    if !failed.is_empty() {
        let why = explain(&fleet, &runner, &failed).await;
        bail!(with_logs(
            anyhow::anyhow!("{} runs did not succeed:{why}", failed.len()),
            &fleet
        ));
    }
    let (held, ran) = common::caps::peaks(&fleet, &runner, &ids).await?;
    eprintln!("cap {CAP} across a failover: at most {held} held a node, {ran} ran at once");
    ensure!(
        held <= CAP && ran <= CAP,
        "held {held}, ran {ran}: over the cap {CAP}"
    );
    ensure!(held == CAP, "the cap was never reached ({held})");
    check_history(&history, &client)?;
    Ok(())
}

/// A schedule's fire happens exactly once across `kill -9` of the leader at fire time: the run
/// and the schedule's next fire time are one etcd transaction, so the new leader either finds
/// the fire done or does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedule_fires_exactly_once_across_leader_kills_at_fire_time() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdCluster::start(3)?;
    let mut fleet = ha_fleet(&etcd, &agents(1)).await?;
    let runner = fleet
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo tick"}),
        )
        .await?;
    let s = fleet
        .post(
            &format!("/v1/runners/{runner}/schedules"),
            json!({"cron": "*/2 * * * * *"}),
        )
        .await?["schedule"]
        .clone();
    let id = s["id"].as_str().context("schedule id")?.to_owned();
    let path = format!("/v1/runners/{runner}/schedules/{id}");
    let first = common::instant(&s["next_fire_at"]).context("first fire")?;
    for offset_ms in [0u64, 150] {
        let leader = fleet.wait_leader(Duration::from_secs(30)).await?;
        let next = common::instant(&fleet.get(&path).await?["schedule"]["next_fire_at"])
            .context("next")?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let wait = u64::try_from((next - now).max(0)).unwrap_or(0);
        tokio::time::sleep(Duration::from_nanos(wait) + Duration::from_millis(offset_ms)).await;
        fleet.signal_slot(leader, "KILL")?;
        let now_leads = fleet.wait_leader(Duration::from_secs(30)).await?;
        ensure!(now_leads == 1 - leader, "slot {now_leads} leads");
        fleet.start_candidate(leader).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let (status, v) = fleet
        .request(reqwest::Method::PATCH, &path, Some(json!({"paused": true})))
        .await?;
    ensure!(status == 200, "{status} {v}");
    let runs = fleet
        .get(&format!("/v1/runners/{runner}/runs?limit=1000"))
        .await?["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let fires: Vec<i128> = runs
        .iter()
        .filter_map(|r| common::instant(&r["scheduled_for"]))
        .collect();
    ensure!(fires.len() == runs.len(), "a run without its fire time");
    let n = common::each_fire_once(first, &fires, 2_000_000_000)?;
    eprintln!("{n} fires, each once, across 2 leader kills at fire time");
    Ok(())
}

/// SIGSTOP the leader for longer than its lease and the nodes' lost timeout, let the standby
/// take over, SIGCONT: the old leader must commit nothing (it would declare the nodes lost and
/// fail their runs) and step down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_frozen_past_its_lease_commits_nothing_when_it_resumes() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdCluster::start(3)?;
    let mut fleet = ha_fleet(&etcd, &agents(1)).await?;
    let leader = fleet.wait_leader(Duration::from_secs(30)).await?;
    let old_log = if leader == 0 {
        "scheduler"
    } else {
        "scheduler-standby"
    };
    let (runner, expected) = numbered_runner(&fleet, 150, Some("0.1")).await?;
    let history = Arc::new(History::default());
    let client = Client::new(&fleet, &runner, history.clone())?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            client
                .create(&format!("before-{i}"), Duration::from_secs(30))
                .await
                .context("create")?,
        );
    }
    for id in &ids {
        fleet
            .wait_for(&runner, id, Duration::from_secs(60), |s| s == "running")
            .await?;
    }
    fleet.signal_slot(leader, "STOP")?;
    let frozen = Instant::now();
    // The standby leads once the frozen leader's lease is gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.leader_slot() != Some(1 - leader) {
        ensure!(
            Instant::now() < deadline,
            "the standby never took over\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New runs go to the new leader meanwhile.
    for i in 0..3 {
        ids.push(
            client
                .create(&format!("during-{i}"), Duration::from_secs(60))
                .await
                .context("create")?,
        );
    }
    // Past the node TTL and lost grace (3 s + 4 s) from the frozen leader's point of view.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(frozen.elapsed())).await;
    fleet.signal_slot(leader, "CONT")?;
    let resumed = Instant::now();
    // It steps down: it stops listening and campaigns again.
    loop {
        let log = fleet.log_of(old_log);
        if log.contains("leadership ended; rejoining as a standby")
            && log.matches("standby: campaigning").count() >= 2
        {
            break;
        }
        ensure!(
            resumed.elapsed() < Duration::from_secs(20),
            "the old leader did not step down\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        fleet.leader_slot() == Some(1 - leader),
        "the new leader must still lead"
    );
    let finals = settle(&client, &ids, Duration::from_secs(120)).await?;
    let failed: Vec<_> = finals
        .iter()
        .filter(|(_, s)| **s != RunStatus::Succeeded)
        .collect();
    ensure!(
        failed.is_empty(),
        "runs did not succeed (a deposed leader's write landed?): {failed:?}\n{}",
        fleet.logs()
    );
    check_logs(&fleet, &runner, &ids, &expected).await?;
    for (node, _) in &fleet.nodes {
        let view = fleet.node_view(node).await?.context("node listed")?;
        ensure!(view["status"] == json!("ready"), "node {node}: {view}");
    }
    check_history(&history, &client)?;
    let old = fleet.log_of(old_log);
    eprintln!(
        "frozen leader: refused writes after resuming: {}",
        old.matches("write refused").count()
    );
    Ok(())
}

/// One etcd member down mid-burst: nothing visible. One member frozen past the write timeout:
/// nothing visible either. All down: 503 with a JSON error, the run on the node keeps running;
/// etcd back: the run finishes with every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_outages_lose_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut etcd = EtcdCluster::start(3)?;
    let fleet = ha_fleet(&etcd, &agents(2)).await?;
    let leader = fleet.wait_leader(Duration::from_secs(30)).await?;
    let (runner, expected) = numbered_runner(&fleet, 3, None).await?;
    let history = Arc::new(History::default());
    let client = Client::new(&fleet, &runner, history.clone())?;

    // One member of three.
    let mut killed = false;
    let ids = burst(&client, "member", 150, 16, 50, || {
        killed = true;
        etcd.kill(0).map_err(Into::into)
    })
    .await?;
    ensure!(killed);
    settle(&client, &ids, Duration::from_secs(180)).await?;
    check_logs(&fleet, &runner, &ids, &expected).await?;
    ensure!(
        fleet.leader_slot() == Some(leader),
        "losing one etcd member changed the leader\n{}",
        fleet.logs()
    );
    check_history(&history, &client)?;
    etcd.restart(0)?;
    etcd.wait_serving(Duration::from_secs(20))?;

    // One member frozen (its connections stay open but nothing is answered) for longer than a
    // write may take in all: a follower, the one the first phase most likely moved the
    // scheduler to. (A frozen Raft leader revokes, on waking, the leases that expired by its
    // own clock: etcd 3.4.23 ends the leadership there; see ARCHITECTURE.md.)
    let leader_member = etcd.raft_leader()?;
    let frozen = if leader_member == 1 { 2 } else { 1 };
    let frozen_pid = etcd.pid(frozen).context("the member runs")?;
    let ids = burst(&client, "frozen", 150, 16, 30, || {
        etcd.signal(frozen, "STOP")?;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(12));
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &frozen_pid.to_string()])
                .status();
        });
        Ok(())
    })
    .await?;
    check_acknowledged(
        &ids,
        150,
        &client,
        &fleet,
        &format!("while etcd member {frozen} was frozen"),
    )?;
    settle(&client, &ids, Duration::from_secs(180)).await?;
    check_logs(&fleet, &runner, &ids, &expected).await?;
    ensure!(
        fleet.leader_slot() == Some(leader),
        "a frozen etcd member changed the leader\n{}",
        fleet.logs()
    );
    check_history(&history, &client)?;
    // Thawed by now (the burst and its settling outlast the freeze).
    etcd.signal(frozen, "CONT")?;

    // All of them, while a run is running.
    let (long, long_expected) = numbered_runner(&fleet, 400, Some("0.1")).await?;
    let long_client = Client::new(&fleet, &long, history.clone())?;
    let run = long_client
        .create("outage", Duration::from_secs(30))
        .await
        .context("create")?;
    fleet
        .wait_for(&long, &run, Duration::from_secs(60), |s| s == "running")
        .await?;
    for i in 0..etcd.len() {
        etcd.kill(i)?;
    }
    // The API answers 503 with the JSON error (no scheduler leads without etcd).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = fleet
            .http
            .get(format!("{}/v1/runners/{long}/runs/{run}", fleet.api_url))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if status == 503 {
            ensure!(body["code"] == json!("unavailable"), "{body}");
            break;
        }
        ensure!(status == 200, "GET answered {status}: {body}");
        ensure!(
            Instant::now() < deadline,
            "the API kept answering 200 without etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The run keeps running on its node meanwhile (its container is alive).
    let node = &fleet.nodes[0].0;
    let other = &fleet.nodes[1].0;
    let containers = [
        fleet.containers(node).await?,
        fleet.containers(other).await?,
    ]
    .concat();
    ensure!(
        containers.iter().any(|c| c.contains(&run)),
        "the run's container is gone during the outage: {containers:?}"
    );
    for i in 0..etcd.len() {
        etcd.restart(i)?;
    }
    etcd.wait_serving(Duration::from_secs(30))?;
    fleet.wait_leader(Duration::from_secs(60)).await?;
    let finals = settle(
        &long_client,
        std::slice::from_ref(&run),
        Duration::from_secs(120),
    )
    .await?;
    ensure!(finals[&run] == RunStatus::Succeeded, "{finals:?}");
    check_logs(&fleet, &long, &[run], &long_expected).await?;
    check_history(&history, &long_client)?;
    Ok(())
}
