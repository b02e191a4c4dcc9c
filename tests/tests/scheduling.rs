//! End-to-end scheduling behaviour with real agents: lost nodes and fencing (agents stopped and
//! killed by signal), agent restarts, drain/resume, warmup pins, the catalog.

mod common;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Heartbeat every second; lost after 1 s TTL + 1 s grace of silence.
const FAST_LOSS: &[&str] = &["--node-ttl-seconds", "1", "--lost-grace-seconds", "1"];

#[tokio::test]
async fn a_silent_agent_is_declared_lost_and_its_run_fenced_when_it_returns() -> Result<()> {
    let mut f = Fleet::start_with(&[AgentSpec::new("fra")], FAST_LOSS).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "echo started; sleep 60"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;

    f.signal_agent(&node, "STOP")?; // a hung or partitioned agent: its container keeps running
    let r = f
        .wait_for(&runner, &run, Duration::from_secs(20), |s| s != "running")
        .await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "node_lost",
        "never stuck in running: {r}"
    );
    f.wait_node_status(&node, "lost", Duration::from_secs(5))
        .await?;
    ensure!(
        f.containers(&node).await? == vec![run.clone()],
        "the container still runs on the silent node"
    );

    f.signal_agent(&node, "CONT")?;
    // Its stale lease is rejected and the container killed, so the run never executes twice.
    f.wait_no_containers(&node).await?;
    f.wait_node_status(&node, "ready", Duration::from_secs(15))
        .await?;
    let r = f.run(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "node_lost",
        "a fenced run stays failed: {r}"
    );
    // The node works again.
    let next = f
        .start_run(&runner, json!({"command": "echo back"}))
        .await?;
    let r = f.wait_finished(&runner, &next).await?;
    ensure!(
        r["status"] == "succeeded" && r["node_id"] == node.as_str(),
        "{r}"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_agent_that_restarts_re_adopts_its_run_and_leaves_no_container() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("ams")]).await?;
    let node = f.node("ams").to_owned();
    let runner = f
        .runner("ams", json!({"run_command": "sleep 3; exit 7"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    f.signal_agent(&node, "KILL")?;
    f.restart_agent(&node)?;
    // The new agent process (new boot id) re-adopts the container and reports its real exit.
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 7 && r["error_code"].is_null(),
        "{r}"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

#[tokio::test]
async fn a_drained_node_gets_no_new_runs_until_resumed() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let long = f
        .runner("fra", json!({"run_command": "sleep 2; echo finished"}))
        .await?;
    let running = f.start_run(&long, json!({})).await?;
    f.wait_for(&long, &running, Duration::from_secs(30), |s| s == "running")
        .await?;

    let drained = f
        .post(&format!("/v1/nodes/{node}/drain"), json!({}))
        .await?;
    ensure!(
        drained["node"]["status"] == "draining" && drained["node"]["draining"] == true,
        "{drained}"
    );
    let waiting = f.start_run(&long, json!({"command": "echo after"})).await?;
    let w = f.run(&long, &waiting).await?;
    ensure!(
        w["status"] == "pending"
            && w["pending_reason"] == "no node in fra with 1024 MiB free: 1 draining",
        "{w}"
    );
    ensure!(w["queue_position"] == 1, "{w}");
    // The run that was already there finishes normally.
    let r = f.wait_finished(&long, &running).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    ensure!(
        f.run(&long, &waiting).await?["status"] == "pending",
        "still no new leases"
    );

    let resumed = f
        .post(&format!("/v1/nodes/{node}/resume"), json!({}))
        .await?;
    ensure!(resumed["node"]["status"] == "ready", "{resumed}");
    let r = f.wait_finished(&long, &waiting).await?;
    ensure!(
        r["status"] == "succeeded" && r["queue_position"].is_null(),
        "{r}"
    );
    let (status, body) = f
        .request(
            reqwest::Method::POST,
            "/v1/nodes/no-such-node/drain",
            Some(json!({})),
        )
        .await?;
    ensure!(
        status == 404 && body["errors"][0]["field"] == "node_id",
        "{status} {body}"
    );
    Ok(())
}

async fn wait_warm(f: &Fleet, runner: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = f.get(&format!("/v1/runners/{runner}")).await?["runner"].clone();
        if r["warmup_status"] != "pending" {
            return Ok(r);
        }
        ensure!(Instant::now() < deadline, "warmup still pending: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn warmup_pulls_on_a_node_and_pins_the_next_run_there() -> Result<()> {
    // Best fit alone would choose the smaller node; the pin must win.
    let f = Fleet::start(&[
        AgentSpec {
            region: "fra",
            memory_mib: 2048,
            max_runs: 8,
        },
        AgentSpec {
            region: "fra",
            memory_mib: 8192,
            max_runs: 8,
        },
    ])
    .await?;
    let (small, big) = (f.nodes[0].0.clone(), f.nodes[1].0.clone());
    f.post(&format!("/v1/nodes/{small}/drain"), json!({}))
        .await?;
    let runner = f.runner("fra", json!({"run_command": "echo warm"})).await?;
    let (status, accepted) = f
        .request(
            reqwest::Method::POST,
            &format!("/v1/runners/{runner}/warmup"),
            None,
        )
        .await?;
    ensure!(status == 202, "{status} {accepted}");
    ensure!(
        accepted["runner"]["warmup_status"] == "pending"
            && accepted["runner"]["warmed_at"].is_null(),
        "{accepted}"
    );
    let warm = wait_warm(&f, &runner).await?;
    ensure!(
        warm["warmup_status"] == "ready" && warm["warmed_at"].is_string(),
        "{warm}"
    );
    ensure!(warm["warm_node_id"] == big.as_str(), "{warm}");
    f.post(&format!("/v1/nodes/{small}/resume"), json!({}))
        .await?;

    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["node_id"] == big.as_str() && r["warm_pin"] == big.as_str(),
        "{r}"
    );
    // The node reports the image it holds with its next heartbeat.
    let image = format!("{}/busybox:latest", f.env.registry);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = f.cached_images(&big).await?;
        if held.contains(&image) {
            break;
        }
        ensure!(Instant::now() < deadline, "image never reported: {held:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Without a pin, image locality still beats best fit: the small node lacks the image.
    let other = f.runner("fra", json!({"run_command": "echo cold"})).await?;
    let run = f.start_run(&other, json!({})).await?;
    let r = f.wait_finished(&other, &run).await?;
    ensure!(
        r["node_id"] == big.as_str() && r["warm_pin"].is_null(),
        "{r}"
    );
    Ok(())
}

#[tokio::test]
async fn warmup_of_an_image_that_cannot_be_pulled_reports_a_clear_error() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "echo x", "image_tag": "no-such-tag"}),
        )
        .await?;
    f.request(
        reqwest::Method::POST,
        &format!("/v1/runners/{runner}/warmup"),
        None,
    )
    .await?;
    let r = wait_warm(&f, &runner).await?;
    ensure!(
        r["warmup_status"] == "failed" && r["warmed_at"].is_null(),
        "{r}"
    );
    let error = r["warmup_error"].as_str().unwrap_or_default();
    ensure!(
        error.starts_with("image_pull_failed:") && error.contains("no-such-tag"),
        "{r}"
    );
    Ok(())
}

#[tokio::test]
async fn the_catalog_comes_from_a_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("catalog.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({
            "regions": ["mars"],
            "instance_types": [{"slug": "tiny", "cpu_millis": 250, "memory_mib": 128, "price_per_second_usd": 0.000001}],
        }))?,
    )?;
    let path = path.to_string_lossy().into_owned();
    let f = Fleet::start_with(&[AgentSpec::new("mars")], &["--catalog", &path]).await?;
    let types = f.get("/v1/instance_types").await?;
    ensure!(
        types["instance_types"][0]["slug"] == "tiny"
            && types["instance_types"].as_array().map(Vec::len) == Some(1),
        "{types}"
    );
    let regions = f.get("/v1/regions").await?;
    ensure!(regions["regions"] == json!([{"slug": "mars"}]), "{regions}");
    let (status, body) = f
        .request(
            reqwest::Method::POST,
            "/v1/runners",
            Some(json!({
            "name": "earthling", "image_name": "busybox", "image_tag": "latest",
            "region": "fra", "instance_type": "standard-s"})),
        )
        .await?;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    ensure!(
        status == 422 && fields == ["region", "instance_type"],
        "{status} {body}"
    );
    let runner = f.runner("mars", json!({"run_command": "cat /sys/fs/cgroup/memory/memory.limit_in_bytes", "instance_type": "tiny"})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        logs.first().and_then(|l| l["msg"].as_str()) == Some("134217728"),
        "the tiny type's 128 MiB limit applies: {logs:?}"
    );
    Ok(())
}
