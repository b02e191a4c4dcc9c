//! Metrics (issue #14, item 1) on a real fleet: the scheduler, the API and the agent each serve
//! Prometheus' text format on `/metrics` of their `--metrics-listen` address, and runs move
//! what they should — runs created and ended by status, start latency and queue wait, placement,
//! the node's memory and liveness, requests by route template and code, open log streams, the
//! agent's starts, endings and log lines, and each running run's container (memory, CPU time).

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet, FleetOptions};
use serde_json::json;
use std::time::{Duration, Instant};

/// `N` distinct loopback ports nothing listens on now (the processes under test bind them right
/// after). All are held until each is chosen, so no port is handed out twice.
fn free_ports<const N: usize>() -> Result<[String; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected {N} ports"))
}

async fn scrape(addr: &str) -> Result<String> {
    let res = reqwest::get(format!("http://{addr}/metrics")).await?;
    ensure!(
        res.status().is_success(),
        "GET /metrics on {addr}: {}",
        res.status()
    );
    Ok(res.text().await?)
}

/// The value of the sample `name` whose labels include every one of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes `addr` until `check` passes (gauges are sampled every second).
async fn eventually(addr: &str, check: impl Fn(&str) -> Result<()>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = scrape(addr).await?;
        match check(&text) {
            Ok(()) => return Ok(text),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("metrics of {addr}:\n{text}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn expect(text: &str, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let got = value(text, name, labels);
    ensure!(got == Some(want), "{name}{labels:?} is {got:?}, not {want}");
    Ok(())
}

fn at_least(text: &str, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let got = value(text, name, labels).unwrap_or(0.0);
    ensure!(got >= want, "{name}{labels:?} is {got}, less than {want}");
    Ok(())
}

/// A fleet of one agent (in fra) whose scheduler, API and agent each serve metrics and health
/// on an address of their own: the fleet, the node's id, and those addresses.
async fn fleet_with_metrics() -> Result<(Fleet, String, [String; 3])> {
    let [sched, api, agent] = free_ports::<3>()?;
    let mut f = Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            scheduler_args: vec!["--metrics-listen".into(), sched.clone()],
            api_args: vec!["--metrics-listen".into(), api.clone()],
            ..FleetOptions::default()
        },
    )
    .await?;
    let node = f.node("fra").to_owned();
    // The agents take extra flags only on a restart.
    f.restart_agent_with(
        &node,
        &["--metrics-listen", &agent, "--max-log-lines-per-run", "50"],
    )
    .await?;
    Ok((f, node, [sched, api, agent]))
}

#[tokio::test]
async fn each_process_serves_metrics_that_follow_the_runs() -> Result<()> {
    let (f, node, [sched, api, agent]) = fleet_with_metrics().await?;

    let runner = f
        .runner("fra", json!({"run_command": "echo one; echo two"}))
        .await?;
    let ok = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &ok).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let bad = f.start_run(&runner, json!({"command": "exit 3"})).await?;
    let r = f.wait_finished(&runner, &bad).await?;
    ensure!(r["status"] == "failed", "{r}");
    let (status, _) = f.request(reqwest::Method::GET, "/v1/nope", None).await?;
    ensure!(status == 404);

    let fra = [("region", "fra")];
    let text = eventually(&sched, |t| {
        expect(t, "berth_runs_created_total", &fra, 2.0)?;
        expect(
            t,
            "berth_runs_ended_total",
            &[("region", "fra"), ("status", "succeeded")],
            1.0,
        )?;
        expect(
            t,
            "berth_runs_ended_total",
            &[("region", "fra"), ("status", "failed")],
            1.0,
        )?;
        expect(t, "berth_run_start_latency_seconds_count", &fra, 2.0)?;
        expect(t, "berth_queue_wait_seconds_count", &fra, 2.0)?;
        at_least(
            t,
            "berth_placement_attempts_total",
            &[("region", "fra"), ("result", "placed")],
            2.0,
        )?;
        expect(t, "berth_runs_active", &fra, 0.0)?;
        let n = [("node", node.as_str())];
        expect(t, "berth_node_memory_total_bytes", &n, 4096.0 * 1048576.0)?;
        expect(t, "berth_node_up", &n, 1.0)?;
        expect(t, "berth_node_runs", &n, 0.0)?;
        Ok(())
    })
    .await?;
    ensure!(
        text.contains("# TYPE berth_runs_ended_total counter")
            && text.contains("# HELP berth_runs_created_total"),
        "typed and described:\n{text}"
    );

    eventually(&api, |t| {
        expect(
            t,
            "berth_api_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/runners/{id}/runs"),
                ("code", "201"),
            ],
            2.0,
        )?;
        expect(
            t,
            "berth_api_requests_total",
            &[("method", "GET"), ("route", "unmatched"), ("code", "404")],
            1.0,
        )?;
        at_least(
            t,
            "berth_api_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/v1/runners")],
            1.0,
        )?;
        Ok(())
    })
    .await?;

    eventually(&agent, |t| {
        expect(
            t,
            "berth_agent_runs_ended_total",
            &[("reason", "exited")],
            2.0,
        )?;
        expect(
            t,
            "berth_agent_container_start_duration_seconds_count",
            &[("sandbox", "false")],
            2.0,
        )?;
        expect(t, "berth_agent_runs_running", &[], 0.0)?;
        // Present (at 0) though nothing was killed: alerts on it see the series.
        expect(t, "berth_agent_oom_kills_total", &[], 0.0)?;
        at_least(t, "berth_agent_log_lines_total", &[], 2.0)?;
        at_least(t, "berth_agent_log_bytes_total", &[], 6.0)?;
        at_least(t, "berth_agent_image_pulls_total", &[("result", "ok")], 1.0)?;
        Ok(())
    })
    .await?;

    // A log stream open now is counted until it closes; a running run is counted on its node.
    let long = f.start_run(&runner, json!({"command": "sleep 60"})).await?;
    f.wait_for(&runner, &long, Duration::from_secs(30), |s| s == "running")
        .await?;
    let stream = reqwest::Client::new()
        .get(format!(
            "{}/v1/runners/{runner}/runs/{long}/logs/stream",
            f.api_url
        ))
        .bearer_auth(common::TOKEN)
        .send()
        .await?;
    ensure!(stream.status().is_success(), "stream: {}", stream.status());
    eventually(&api, |t| expect(t, "berth_api_sse_streams_open", &[], 1.0)).await?;
    eventually(&agent, |t| {
        expect(t, "berth_agent_runs_running", &[], 1.0)?;
        // The run's container, read from its cgroup when scraped (OpenTelemetry's shape).
        at_least(t, "container_memory_usage_bytes", &[("run_id", &long)], 1.0)?;
        let cpu = value(t, "container_cpu_time_seconds_total", &[("run_id", &long)]);
        ensure!(cpu.is_some_and(|s| s >= 0.0), "cpu time: {cpu:?}");
        ensure!(
            t.contains("# TYPE container_cpu_time_seconds_total counter"),
            "typed"
        );
        Ok(())
    })
    .await?;
    eventually(&sched, |t| {
        expect(t, "berth_node_runs", &[("node", node.as_str())], 1.0)?;
        expect(t, "berth_runs_active", &fra, 1.0)
    })
    .await?;
    drop(stream);
    f.post(&format!("/v1/runners/{runner}/runs/{long}/stop"), json!({}))
        .await
        .context("stop")?;
    f.wait_finished(&runner, &long).await?;
    eventually(&api, |t| expect(t, "berth_api_sse_streams_open", &[], 0.0)).await?;
    eventually(&agent, |t| {
        expect(t, "berth_agent_runs_running", &[], 0.0)?;
        expect(
            t,
            "berth_agent_runs_ended_total",
            &[("reason", "stopped")],
            1.0,
        )?;
        let gone = value(t, "container_memory_usage_bytes", &[("run_id", &long)]);
        ensure!(
            gone.is_none(),
            "the ended run's container is still shown: {gone:?}"
        );
        Ok(())
    })
    .await?;
    eventually(&sched, |t| {
        expect(
            t,
            "berth_runs_ended_total",
            &[("region", "fra"), ("status", "canceled")],
            1.0,
        )
    })
    .await?;

    // Output past the log limit (50 lines here) is dropped and counted in bytes.
    let loud = f
        .start_run(&runner, json!({"command": "seq 1 2000"}))
        .await?;
    f.wait_finished(&runner, &loud).await?;
    eventually(&agent, |t| {
        expect(t, "berth_agent_log_limits_reached_total", &[], 1.0)?;
        // 2,000 lines of 1-4 digits and a newline, 50 of them kept: most of 8,893 bytes.
        at_least(t, "berth_agent_log_dropped_bytes_total", &[], 8000.0)
    })
    .await?;

    // A drained node's gauge says so, and goes back on resume.
    let n = [("node", node.as_str())];
    eventually(&sched, |t| expect(t, "berth_node_draining", &n, 0.0)).await?;
    f.post(&format!("/v1/nodes/{node}/drain"), json!({}))
        .await?;
    eventually(&sched, |t| expect(t, "berth_node_draining", &n, 1.0)).await?;
    f.post(&format!("/v1/nodes/{node}/resume"), json!({}))
        .await?;
    eventually(&sched, |t| expect(t, "berth_node_draining", &n, 0.0)).await?;
    Ok(())
}

/// `/readyz` of `base` (a URL without the path): its status code and body.
async fn readyz(base: &str) -> Result<(u16, serde_json::Value)> {
    let res = reqwest::get(format!("{base}/readyz")).await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await?))
}

/// The check `name` of a `/readyz` body passed.
fn check_ok(body: &serde_json::Value, name: &str) -> Option<bool> {
    body["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)?["ok"]
        .as_bool()
}

/// Polls `/readyz` of `base` until it answers `want` and `check` says so.
async fn wait_ready(
    base: &str,
    want: u16,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A process starting again does not listen yet: that is "not yet", not a failure.
        let answer = readyz(base).await;
        if let Ok((status, body)) = &answer {
            if *status == want && check(body) {
                return Ok(body.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{base}/readyz still answers {answer:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Health that means something (issue #14, item 3): every process answers `/healthz` while it
/// runs and `/readyz` with what it depends on — the scheduler its store and leadership, the API
/// a scheduler, the agent a scheduler session and containerd — and readiness follows a
/// scheduler killed and started again.
#[tokio::test]
async fn readiness_follows_what_each_process_depends_on() -> Result<()> {
    let (mut f, _node, [sched, api, agent]) = fleet_with_metrics().await?;
    let (sched, api, agent) = (
        format!("http://{sched}"),
        format!("http://{api}"),
        format!("http://{agent}"),
    );
    for base in [&sched, &api, &agent, &f.api_url] {
        let res = reqwest::get(format!("{base}/healthz")).await?;
        ensure!(
            res.status().is_success(),
            "{base}/healthz: {}",
            res.status()
        );
    }
    let body = wait_ready(&sched, 200, |b| {
        check_ok(b, "leader") == Some(true) && check_ok(b, "store") == Some(true)
    })
    .await?;
    ensure!(body["status"] == "ready", "{body}");
    wait_ready(&agent, 200, |b| {
        check_ok(b, "scheduler") == Some(true) && check_ok(b, "containerd") == Some(true)
    })
    .await?;
    for base in [&api, &f.api_url] {
        wait_ready(base, 200, |b| check_ok(b, "scheduler") == Some(true)).await?;
    }

    f.kill_scheduler()?;
    let body = wait_ready(&f.api_url, 503, |b| check_ok(b, "scheduler") == Some(false)).await?;
    ensure!(body["status"] == "not_ready", "{body}");
    wait_ready(&api, 503, |b| check_ok(b, "scheduler") == Some(false)).await?;
    // The agent lost its session, and containerd still answers it.
    wait_ready(&agent, 503, |b| {
        check_ok(b, "scheduler") == Some(false) && check_ok(b, "containerd") == Some(true)
    })
    .await?;
    let gone = reqwest::get(format!("{sched}/healthz")).await;
    ensure!(gone.is_err(), "a killed scheduler still answers: {gone:?}");

    f.start_scheduler()?;
    wait_ready(&sched, 200, |b| check_ok(b, "store") == Some(true)).await?;
    wait_ready(&f.api_url, 200, |b| check_ok(b, "scheduler") == Some(true)).await?;
    wait_ready(&agent, 200, |b| check_ok(b, "scheduler") == Some(true)).await?;
    Ok(())
}
