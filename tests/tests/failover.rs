//! End-to-end scheduler failover as the clients see it (issue #11, item 4): the API and the
//! agent are given two scheduler addresses; the scheduler on the first dies (kill -9) or
//! freezes (SIGSTOP) while runs execute and a log stream is open; a second scheduler then
//! starts on the other address over the same state, as a standby that won the election would.
//! (The election itself is etcd's business and is tested with it; here a second process over
//! the same embedded store stands in for the new leader.) The agent must register there by
//! itself, the runs finish, the open SSE stream delivers every line exactly once and ends, and
//! the API answers 503 or succeeds in the gap, never 500.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{read_sse_at, AgentSpec, Fleet, FleetOptions, SseEvent, TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Lines each run prints, numbered, about 20 a second: the runs outlast the failover.
const LINES: usize = 300;

fn numbered_lines_command() -> String {
    format!("i=1; while [ $i -le {LINES} ]; do echo n$i; i=$((i+1)); sleep 0.05; done")
}

async fn two_address_fleet() -> Result<Fleet> {
    Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            standby_scheduler: true,
            ..Default::default()
        },
    )
    .await
}

/// POSTs a run with an `Idempotency-Key`; returns the status, the body and how long it took.
async fn post_run(
    http: reqwest::Client,
    api_url: String,
    runner: String,
    key: &'static str,
) -> Result<(u16, Value, Duration)> {
    let started = Instant::now();
    let res = http
        .post(format!("{api_url}/v1/runners/{runner}/runs"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&json!({}))
        .send()
        .await?;
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    Ok((status, body, started.elapsed()))
}

/// The stream carried every line `n1..n{LINES}` once, in order, with rising ids, and ended with
/// the run's state.
fn check_stream(events: &[SseEvent]) -> Result<()> {
    let errors: Vec<&SseEvent> = events.iter().filter(|e| e.event == "error").collect();
    ensure!(errors.is_empty(), "error events: {errors:?}");
    let mut last_id = 0u64;
    let mut lines = Vec::new();
    for e in events.iter().filter(|e| e.event == "log") {
        let id: u64 = e.id.as_deref().unwrap_or("").parse().context("log id")?;
        ensure!(
            id > last_id,
            "id {id} after {last_id}: a line doubled or out of order"
        );
        last_id = id;
        let v: Value = serde_json::from_str(&e.data)?;
        lines.push(v["msg"].as_str().unwrap_or("").to_owned());
    }
    let want: Vec<String> = (1..=LINES).map(|i| format!("n{i}")).collect();
    if lines != want {
        let missing: Vec<&String> = want.iter().filter(|w| !lines.contains(w)).collect();
        bail!(
            "{} lines, {} missing (first {:?}); first lines {:?}",
            lines.len(),
            missing.len(),
            missing.first(),
            &lines[..lines.len().min(5)]
        );
    }
    let last = events.last().context("an empty stream")?;
    ensure!(
        last.event == "state",
        "the stream did not end with the state: {last:?}"
    );
    let state: Value = serde_json::from_str(&last.data)?;
    ensure!(state["status"] == "succeeded", "{state}");
    Ok(())
}

/// Every stored line of a run, exactly once (through the paged endpoint).
async fn check_stored(f: &Fleet, runner: &str, run: &str) -> Result<()> {
    let logs = f.all_logs(runner, run).await?;
    let msgs: Vec<&str> = logs.iter().filter_map(|l| l["msg"].as_str()).collect();
    let want: Vec<String> = (1..=LINES).map(|i| format!("n{i}")).collect();
    ensure!(
        msgs == want,
        "run {run}: {} lines stored, want {LINES} once each",
        msgs.len()
    );
    Ok(())
}

/// Waits (bounded) until `log` holds `marker` more than `before` times.
async fn wait_logged(
    f: &Fleet,
    log: &str,
    marker: &str,
    before: usize,
    within: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + within;
    while f.log_of(log).matches(marker).count() <= before {
        ensure!(
            Instant::now() < deadline,
            "no new `{marker}` in {log} within {within:?}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Instant::now())
}

/// Waits until the first lines of `run` are stored.
async fn wait_some_lines(f: &Fleet, runner: &str, run: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.all_logs(runner, run).await?.len() < 10 {
        ensure!(Instant::now() < deadline, "no lines stored\n{}", f.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_scheduler_is_replaced_on_the_other_address_and_no_line_is_lost_or_doubled(
) -> Result<()> {
    let mut f = two_address_fleet().await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": numbered_lines_command()}))
        .await?;
    let runs = [
        f.start_run(&runner, json!({})).await?,
        f.start_run(&runner, json!({})).await?,
    ];
    for run in &runs {
        f.wait_for(&runner, run, Duration::from_secs(30), |s| s == "running")
            .await?;
    }
    let sse = tokio::spawn(read_sse_at(
        f.http.clone(),
        format!(
            "{}/v1/runners/{runner}/runs/{}/logs/stream",
            f.api_url, runs[0]
        ),
        None,
        Duration::from_secs(120),
    ));
    wait_some_lines(&f, &runner, &runs[0]).await?;

    f.kill_scheduler()?;
    // No scheduler listens anywhere: a POST tries both addresses for the failover budget,
    // then answers 503 (it never reached a scheduler, so the client may send it again).
    let (status, body, took) =
        post_run(f.http.clone(), f.api_url.clone(), runner.clone(), "gap-1").await?;
    ensure!(
        status == 503 && body["code"] == "unavailable",
        "a POST with no scheduler up: {status} {body}"
    );
    eprintln!("POST with no scheduler up: 503 after {took:?}");
    // A POST sent just before the standby listens waits for it and succeeds.
    let waiting = tokio::spawn(post_run(
        f.http.clone(),
        f.api_url.clone(),
        runner.clone(),
        "gap-2",
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let registrations = f
        .log_of("scheduler-standby")
        .matches("node registered")
        .count();
    let data = f.scheduler_data_dir();
    let listening = f.start_standby(&data).await?;
    let (status, body, _) = waiting.await??;
    let answered = listening.elapsed();
    ensure!(
        (200..300).contains(&status),
        "a POST waiting for the standby: {status} {body}"
    );
    let gap_run = body["run"]["id"].as_str().context("run id")?.to_owned();
    let registered = wait_logged(
        &f,
        "scheduler-standby",
        "node registered",
        registrations,
        Duration::from_secs(15),
    )
    .await?;
    eprintln!(
        "after the standby listened: the waiting POST answered within {answered:?}, the agent registered within {:?}",
        registered.duration_since(listening)
    );
    // The client's retry of the POST that got 503 creates its run now (once).
    let (status, body, _) =
        post_run(f.http.clone(), f.api_url.clone(), runner.clone(), "gap-1").await?;
    ensure!((200..300).contains(&status), "{status} {body}");
    let retried = body["run"]["id"].as_str().context("run id")?.to_owned();
    let (_, again, _) =
        post_run(f.http.clone(), f.api_url.clone(), runner.clone(), "gap-1").await?;
    ensure!(
        again["run"]["id"] == retried.as_str(),
        "the key was honoured: {again}"
    );

    for run in runs.iter().chain([&gap_run, &retried]) {
        let r = f
            .wait_for(&runner, run, Duration::from_secs(90), |s| {
                matches!(s, "succeeded" | "failed" | "canceled")
            })
            .await?;
        ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    }
    let events = tokio::time::timeout(Duration::from_secs(30), sse)
        .await
        .context("the SSE stream did not end with its run")???;
    check_stream(&events)?;
    for run in &runs {
        check_stored(&f, &runner, run).await?;
    }
    ensure!(
        f.node_view(&node)
            .await?
            .is_some_and(|n| n["status"] == "ready"),
        "the node is ready on the new scheduler"
    );
    Ok(())
}

/// A frozen scheduler (SIGSTOP) still completes TCP handshakes and keeps its connections open,
/// but answers nothing: the clients' HTTP/2 keepalive must give it up. Its embedded store stays
/// locked by the frozen process, so the second scheduler runs over a copy taken after the
/// freeze (a frozen process writes nothing more; the copy is what it had committed).
#[tokio::test]
async fn a_frozen_scheduler_is_left_for_the_other_address_within_seconds() -> Result<()> {
    let mut f = two_address_fleet().await?;
    let runner = f
        .runner("fra", json!({"run_command": numbered_lines_command()}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let sse = tokio::spawn(read_sse_at(
        f.http.clone(),
        format!("{}/v1/runners/{runner}/runs/{run}/logs/stream", f.api_url),
        None,
        Duration::from_secs(120),
    ));
    wait_some_lines(&f, &runner, &run).await?;

    f.signal_scheduler("STOP")?;
    let copy = f.dir.path().join("scheduler-copy");
    copy_dir(&f.scheduler_data_dir(), &copy)?;
    let registrations = f
        .log_of("scheduler-standby")
        .matches("node registered")
        .count();
    let listening = f.start_standby(&copy).await?;
    // The agent's session to the frozen one is given up by its keepalive (1 s + 2 s), then it
    // registers with the standby.
    let registered = wait_logged(
        &f,
        "scheduler-standby",
        "node registered",
        registrations,
        Duration::from_secs(15),
    )
    .await?;
    // The API's next read finds the standby too.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v) = f.request(reqwest::Method::GET, "/v1/nodes", None).await?;
        if status == 200 {
            break;
        }
        ensure!(
            status == 503 && Instant::now() < deadline,
            "GET /v1/nodes while the scheduler is frozen: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api_back = listening.elapsed();
    eprintln!(
        "after the standby listened: the agent registered within {:?}, the API answered within {api_back:?}",
        registered.duration_since(listening)
    );
    let r = f
        .wait_for(&runner, &run, Duration::from_secs(90), |s| {
            matches!(s, "succeeded" | "failed" | "canceled")
        })
        .await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    let events = tokio::time::timeout(Duration::from_secs(30), sse)
        .await
        .context("the SSE stream did not end with its run")???;
    check_stream(&events)?;
    check_stored(&f, &runner, &run).await?;
    f.kill_scheduler()?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}
