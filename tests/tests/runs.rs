//! End-to-end: real scheduler, API and agents driving real containerd and runc.

mod common;

use anyhow::{ensure, Context, Result};
use common::{msgs, read_sse, AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn echo_succeeds_with_stdout_and_stderr_apart_and_in_order() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "for i in 1 2 3; do echo out$i; echo err$i >&2; done"}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0,
        "{r}\n{}",
        f.logs()
    );
    ensure!(r["node_id"] == f.node("fra"), "{r}");
    ensure!(
        r["started_at"].is_string() && r["completed_at"].is_string(),
        "{r}"
    );
    // The run says how it was isolated and which runtime ran it.
    let (isolation, runtime) = if common::sandboxed() {
        ("sandbox", "runsc ")
    } else {
        ("container", "runc ")
    };
    ensure!(
        r["isolation"] == isolation
            && r["runtime"]
                .as_str()
                .is_some_and(|v| v.starts_with(runtime)),
        "{r}"
    );
    ensure!(
        r["image_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        msgs(&logs, "stdout") == ["out1", "out2", "out3"],
        "{logs:?}"
    );
    ensure!(
        msgs(&logs, "stderr") == ["err1", "err2", "err3"],
        "{logs:?}"
    );
    let ids: Vec<u64> = logs.iter().filter_map(|l| l["id"].as_u64()).collect();
    ensure!(
        ids == (1..=6).collect::<Vec<u64>>(),
        "ids increase without gaps: {ids:?}"
    );
    // The exit is reported first, the container cleaned up right after.
    f.wait_no_containers(f.node("fra")).await?;
    Ok(())
}

/// Parses an RFC 3339 timestamp of the API into unix microseconds.
fn micros(v: &Value) -> Option<i128> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() / 1_000)
}

#[tokio::test]
async fn the_timeline_shows_each_step_of_a_run_in_order() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"run_command": "echo hi"})).await?;
    // Pending: only the scheduler's steps so far (or more, if it is quick).
    let created = f
        .post(&format!("/v1/runners/{runner}/runs"), json!({}))
        .await?;
    ensure!(
        created["run"]["timeline"]["created_at"].is_string(),
        "{created}"
    );
    let run = created["run"]["id"].as_str().context("id")?.to_owned();
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    let t = &r["timeline"];
    let mut steps = vec![
        "created_at",
        "assigned_at",
        "received_at",
        "image_ready_at",
        "prepared_at",
    ];
    // Only with a network namespace per run (the default fleet has one).
    if t["network_ready_at"].is_string() {
        steps.push("network_ready_at");
    }
    steps.extend([
        "task_created_at",
        "started_at",
        "exited_at",
        "exit_reported_at",
        "ended_at",
    ]);
    let mut previous = 0;
    for step in steps {
        let at = micros(&t[step]).with_context(|| format!("no {step} in {t}"))?;
        ensure!(at >= previous, "{step} before the step above it: {t}");
        previous = at;
    }
    // Microseconds, not milliseconds: not every step lands on a whole millisecond.
    let whole_ms = ["created_at", "received_at", "task_created_at", "started_at"]
        .iter()
        .filter_map(|s| micros(&t[*s]))
        .all(|us| us % 1_000 == 0);
    ensure!(!whole_ms, "{t}");
    // The run's started_at is the timeline's start, to the millisecond.
    let started = micros(&r["started_at"]).context("started_at")?;
    let tl_started = micros(&t["started_at"]).context("timeline started_at")?;
    ensure!((tl_started - started).abs() < 1_000, "{r}");
    Ok(())
}

#[tokio::test]
async fn argv_and_env_overrides_apply_to_one_run() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": "echo runner-default $GREETING",
                "env_variables": [{"env_key": "GREETING", "env_val": "hello"}],
            }),
        )
        .await?;
    let run = f
        .start_run(
            &runner,
            json!({
                "argv": ["sh", "-c", "echo override $GREETING"],
                "env_variables": [{"env_key": "GREETING", "env_val": "bonjour"}],
            }),
        )
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    ensure!(
        r["argv"] == json!(["sh", "-c", "echo override $GREETING"]) && r["command"].is_null(),
        "{r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["override bonjour"], "{logs:?}");
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_finished(&runner, &run).await?;
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        msgs(&logs, "stdout") == ["runner-default hello"],
        "the runner's defaults are untouched: {logs:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_non_zero_exit_fails_the_run_with_its_code() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo before; exit 3"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "failed" && r["exit_code"] == 3, "{r}");
    ensure!(msgs(&f.all_logs(&runner, &run).await?, "stdout") == ["before"]);
    Ok(())
}

#[tokio::test]
async fn a_timeout_fails_the_run_with_124() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"argv": ["sleep", "30"], "timeout_seconds": 1}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f
        .wait_for(&runner, &run, Duration::from_secs(20), |s| {
            s != "pending" && s != "running"
        })
        .await?;
    ensure!(r["status"] == "failed" && r["exit_code"] == 124, "{r}");
    ensure!(r["error_code"] == "timeout", "{r}");
    // 1 s timeout + 2 s grace; `sleep` ignores nothing, so it ends at SIGTERM.
    let took = r["duration_seconds"].as_u64().context("duration")?;
    ensure!(
        took <= 5,
        "ended {took} s after start, not within a few seconds"
    );
    // The exit is reported first, the container cleaned up right after.
    f.wait_no_containers(f.node("fra")).await?;
    Ok(())
}

#[tokio::test]
async fn stopping_a_running_run_cancels_it_and_leaves_nothing_in_containerd() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo started; sleep 60"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let node = f.node("fra").to_owned();
    ensure!(
        f.containers(&node).await? == vec![run.clone()],
        "the run's container exists while it runs"
    );
    let stopped = f
        .post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    ensure!(
        stopped["run"]["status"] == "canceled",
        "{stopped}\n{}",
        f.logs()
    );
    let again = f
        .post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    ensure!(
        again["run"] == stopped["run"],
        "stopping a finished run changes nothing"
    );
    // The agent cleans up right after reporting the exit.
    f.wait_no_containers(&node).await?;
    ensure!(
        !f.cgroup_dir("memory", &node, &run).exists(),
        "cgroup directory removed"
    );
    Ok(())
}

#[tokio::test]
async fn the_memory_limit_is_in_the_runs_cgroup() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({
                // runc shows the run its cgroup; gVisor has no cgroupfs inside, and tells the
                // run its memory as the machine's total instead.
                "run_command": "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null \
                    || awk '/^MemTotal:/ { print $2 * 1024 }' /proc/meminfo; sleep 30",
                "instance_type": "standard-xs",
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let node = f.node("fra").to_owned();
    let limit_file = f
        .cgroup_dir("memory", &node, &run)
        .join("memory.limit_in_bytes");
    let host_view = std::fs::read_to_string(&limit_file)
        .with_context(|| format!("reading {}", limit_file.display()))?;
    ensure!(
        host_view.trim() == (512u64 * 1024 * 1024).to_string(),
        "host sees {host_view}"
    );
    // The container sees the same limit from inside.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = f.all_logs(&runner, &run).await?;
        if let Some(first) = msgs(&logs, "stdout").first() {
            ensure!(
                first == &(512u64 * 1024 * 1024).to_string(),
                "container sees {first}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no output from the run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_run_for_ams_lands_on_the_ams_agent() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra"), AgentSpec::new("ams")]).await?;
    for region in ["ams", "fra"] {
        let runner = f.runner(region, json!({"run_command": "echo hi"})).await?;
        let run = f.start_run(&runner, json!({})).await?;
        let r = f.wait_finished(&runner, &run).await?;
        ensure!(r["status"] == "succeeded", "{r}");
        ensure!(
            r["node_id"] == f.node(region) && r["region"] == region,
            "{r}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_run_that_does_not_fit_waits_and_starts_when_capacity_frees() -> Result<()> {
    let f = Fleet::start(&[AgentSpec {
        region: "ams",
        memory_mib: 1024,
        max_runs: 8,
    }])
    .await?;
    let runner = f
        .runner("ams", json!({"run_command": "sleep 2; echo done"}))
        .await?;
    let first = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &first, Duration::from_secs(30), |s| s == "running")
        .await?;
    let second = f.start_run(&runner, json!({})).await?;
    let waiting = f.run(&runner, &second).await?;
    ensure!(
        waiting["status"] == "pending" && waiting["node_id"].is_null(),
        "{waiting}"
    );
    ensure!(
        waiting["pending_reason"] == "no node in ams with 1024 MiB free: 1 full",
        "the run says why it waits: {waiting}"
    );
    let r1 = f.wait_finished(&runner, &first).await?;
    ensure!(r1["status"] == "succeeded", "{r1}");
    let r2 = f.wait_finished(&runner, &second).await?;
    ensure!(r2["status"] == "succeeded", "{r2}");
    let (end1, start2) = (
        r1["completed_at"].as_str().unwrap_or(""),
        r2["started_at"].as_str().unwrap_or(""),
    );
    ensure!(
        start2 >= end1,
        "the second run started ({start2}) only after the first ended ({end1})"
    );
    Ok(())
}

#[tokio::test]
async fn sse_delivers_every_line_then_the_state_and_resumes() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "i=1; while [ $i -le 300 ]; do echo line$i; i=$((i+1)); done; sleep 1; echo last >&2; exit 7"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    // Connect while the run is pending or running: lines arrive live, then the state.
    let path = format!("/v1/runners/{runner}/runs/{run}/logs/stream");
    let events = read_sse(&f, &path, None, Duration::from_secs(60)).await?;
    let (state, logs) = events.split_last().context("no events")?;
    ensure!(
        state.event == "state",
        "the last event is the state: {state:?}"
    );
    let st: Value = serde_json::from_str(&state.data)?;
    ensure!(st == json!({"status": "failed", "exit_code": 7}), "{st}");
    ensure!(
        logs.iter().all(|e| e.event == "log"),
        "only log events before the state"
    );
    ensure!(logs.len() == 301, "every line once: got {}", logs.len());
    for (i, e) in logs.iter().enumerate() {
        let want_id = (i + 1).to_string();
        ensure!(
            e.id.as_deref() == Some(want_id.as_str()),
            "SSE id is the log id: {e:?}"
        );
        let line: Value = serde_json::from_str(&e.data)?;
        let want = if i < 300 {
            format!("line{}", i + 1)
        } else {
            "last".to_owned()
        };
        ensure!(line["msg"] == want.as_str(), "{line}");
    }
    // Resume with Last-Event-ID and with ?after_id=.
    let resumed = read_sse(&f, &path, Some("299"), Duration::from_secs(30)).await?;
    let ids: Vec<Option<String>> = resumed.iter().map(|e| e.id.clone()).collect();
    ensure!(
        ids == vec![Some("300".into()), Some("301".into()), None],
        "{resumed:?}"
    );
    let resumed = read_sse(
        &f,
        &format!("{path}?after_id=301"),
        None,
        Duration::from_secs(30),
    )
    .await?;
    ensure!(
        resumed.len() == 1 && resumed[0].event == "state",
        "{resumed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn logs_paginate_with_after_id() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "for i in $(seq 1 25); do echo n$i; done"}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_finished(&runner, &run).await?;
    let base = format!("/v1/runners/{runner}/runs/{run}/logs");
    let page1 = f.get(&format!("{base}?limit=10")).await?;
    let page2 = f
        .get(&format!(
            "{base}?limit=10&after_id={}",
            page1["next_after_id"]
        ))
        .await?;
    let page3 = f
        .get(&format!(
            "{base}?limit=10&after_id={}",
            page2["next_after_id"]
        ))
        .await?;
    let texts = |p: &Value| {
        msgs(
            p["logs"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            "stdout",
        )
    };
    ensure!(
        texts(&page1) == (1..=10).map(|i| format!("n{i}")).collect::<Vec<_>>(),
        "{page1}"
    );
    ensure!(
        texts(&page2) == (11..=20).map(|i| format!("n{i}")).collect::<Vec<_>>(),
        "{page2}"
    );
    ensure!(
        texts(&page3) == (21..=25).map(|i| format!("n{i}")).collect::<Vec<_>>(),
        "{page3}"
    );
    ensure!(page1["has_more"] == true && page2["has_more"] == true && page3["has_more"] == false);
    let (status, body) = f
        .request(reqwest::Method::GET, &format!("{base}?limit=0"), None)
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "limit",
        "{status} {body}"
    );
    Ok(())
}

#[tokio::test]
async fn restarting_the_control_plane_mid_run_loses_no_run_and_no_line() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "i=1; while [ $i -le 20 ]; do echo tick$i; i=$((i+1)); sleep 0.2; done"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    f.kill_scheduler()?;
    // The run keeps going on the node while the control plane is down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = f.request(reqwest::Method::GET, "/v1/runners", None).await?;
    ensure!(
        status == 503,
        "the API says the scheduler is unavailable, got {status}"
    );
    f.start_scheduler()?;
    f.wait_ready().await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0,
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    let want: Vec<String> = (1..=20).map(|i| format!("tick{i}")).collect();
    ensure!(
        msgs(&logs, "stdout") == want,
        "every line exactly once: {logs:?}"
    );
    // And the restarted control plane places new runs.
    let next = f
        .start_run(&runner, json!({"command": "echo after-restart"}))
        .await?;
    let r = f.wait_finished(&runner, &next).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    Ok(())
}

#[tokio::test]
async fn a_batch_fans_out_one_run_per_item_with_its_own_env() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo item=$ITEM"}))
        .await?;
    let items: Vec<Value> = (1..=3)
        .map(|i| json!({"env_variables": [{"env_key": "ITEM", "env_val": format!("n{i}")}]}))
        .collect();
    let created = f
        .post(
            &format!("/v1/runners/{runner}/runs/batch"),
            json!({"runs": items}),
        )
        .await?;
    let runs = created["runs"].as_array().context("runs")?;
    ensure!(runs.len() == 3, "{created}");
    for (i, run) in runs.iter().enumerate() {
        let id = run["id"].as_str().context("id")?;
        let r = f.wait_finished(&runner, id).await?;
        ensure!(r["status"] == "succeeded", "{r}");
        let logs = f.all_logs(&runner, id).await?;
        ensure!(
            msgs(&logs, "stdout") == [format!("item=n{}", i + 1)],
            "{logs:?}"
        );
    }
    let bad = json!({"runs": [{}, {"env_variables": [{"env_key": "1X", "env_val": "v"}]}]});
    let (status, body) = f
        .request(
            reqwest::Method::POST,
            &format!("/v1/runners/{runner}/runs/batch"),
            Some(bad),
        )
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "runs[1].env_variables[0].env_key",
        "{status} {body}"
    );
    let (status, body) = f
        .request(
            reqwest::Method::POST,
            &format!("/v1/runners/{runner}/runs/batch"),
            Some(json!({"runs": []})),
        )
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "runs",
        "{status} {body}"
    );
    let all = f.get(&format!("/v1/runners/{runner}/runs")).await?;
    ensure!(
        all["runs"].as_array().map(Vec::len) == Some(3),
        "a rejected batch creates nothing: {all}"
    );
    Ok(())
}
