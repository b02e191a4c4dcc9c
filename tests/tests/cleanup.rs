//! End-to-end (issue 4, item 6): however a run ends — success, failure, timeout, stop of a
//! process that ignores SIGTERM, OOM kill, failed start — it carries uploaded files, and
//! afterwards nothing of it is left on its node: no task, container, snapshot, lease, shim
//! bundle, cgroup directory, output file or uploaded file (`Fleet::assert_run_cleaned`). Also:
//! the timeout counts from the process start, SIGTERM → grace → SIGKILL with a per-run grace, and
//! a process that handles SIGTERM ends by its own code path.

mod common;

use anyhow::{bail, ensure, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `hello` in base64, the content of every run's uploaded file here.
const HELLO_B64: &str = "aGVsbG8=";

/// `body` with two uploaded files added (after any it already has).
fn with_files(mut body: Value) -> Value {
    let mut files = body["files"].as_array().cloned().unwrap_or_default();
    files.extend([
        json!({"path": "/etc/berth/greeting", "content_base64": HELLO_B64}),
        json!({"path": "/opt/tool/bin/run.sh", "content_base64": HELLO_B64, "mode": 0o755}),
    ]);
    body["files"] = json!(files);
    body
}

async fn wait_line(f: &Fleet, runner: &str, run: &str, line: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = f.all_logs(runner, run).await?;
        if msgs(&logs, "stdout").iter().any(|m| m == line) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("run {run} never printed {line:?}: {logs:?}\n{}", f.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn millis(r: &Value, field: &str) -> Result<i64> {
    let text = r[field].as_str().unwrap_or_default();
    let t = time_of(text);
    ensure!(t.is_some(), "{field} is not a timestamp: {r}");
    Ok(t.unwrap_or_default())
}

/// An RFC 3339 timestamp (the API's format) as unix millis.
fn time_of(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Starts a run (with files) of a fresh runner made of `runner_extra`, waits for its end,
/// asserts the ending, then asserts that nothing of it is left on the node.
async fn ends_clean(
    f: &Fleet,
    runner_extra: Value,
    body: Value,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", runner_extra).await?;
    let run = f.start_run(&runner, with_files(body)).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(check(&r), "unexpected ending: {r}\n{}", f.logs());
    f.assert_run_cleaned(&node, &run).await?;
    Ok(r)
}

#[tokio::test]
async fn a_successful_run_leaves_nothing_behind() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let r = ends_clean(
        &f,
        json!({"run_command": "cat /etc/berth/greeting"}),
        json!({}),
        |r| r["status"] == "succeeded" && r["exit_code"] == 0,
    )
    .await?;
    let logs = f
        .all_logs(
            r["runner_id"].as_str().unwrap_or_default(),
            r["id"].as_str().unwrap_or_default(),
        )
        .await?;
    ensure!(msgs(&logs, "stdout") == ["hello"], "{logs:?}");
    Ok(())
}

#[tokio::test]
async fn a_failed_run_leaves_nothing_behind() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    ends_clean(&f, json!({"run_command": "exit 3"}), json!({}), |r| {
        r["status"] == "failed" && r["exit_code"] == 3
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_timed_out_run_leaves_nothing_behind() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    ends_clean(
        &f,
        json!({"run_command": "trap '' TERM; sleep 1000", "timeout_seconds": 1, "stop_grace_seconds": 1}),
        json!({}),
        |r| r["status"] == "failed" && r["exit_code"] == 124 && r["error_code"] == "timeout",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_stopped_run_that_ignores_sigterm_is_killed_after_its_grace_and_leaves_nothing(
) -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "trap '' TERM; echo ready; sleep 1000"}),
        )
        .await?;
    let run = f
        .start_run(&runner, with_files(json!({"stop_grace_seconds": 3})))
        .await?;
    wait_line(&f, &runner, &run, "ready").await?;
    let r = f.run(&runner, &run).await?;
    ensure!(r["stop_grace_seconds"] == 3, "{r}");
    let asked = berth_now_millis();
    let stopped = f
        .post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "canceled" && r["exit_code"] == 137,
        "SIGKILLed (128 + 9) after ignoring SIGTERM: {r} (stop answered {stopped})"
    );
    let killed_after = millis(&r, "completed_at")? - asked;
    ensure!(
        killed_after >= 2_900,
        "SIGKILL came only after the 3 s grace, not {killed_after} ms after the stop: {r}"
    );
    f.assert_run_cleaned(&node, &run).await?;
    Ok(())
}

#[tokio::test]
async fn a_process_that_handles_sigterm_ends_its_own_way_within_the_grace() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    // `wait` returns at once when a trapped signal arrives (a foreground sleep would not).
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": "trap 'echo got TERM; exit 42' TERM; echo ready; sleep 1000 & wait",
                "stop_grace_seconds": 60,
            }),
        )
        .await?;
    let run = f.start_run(&runner, with_files(json!({}))).await?;
    wait_line(&f, &runner, &run, "ready").await?;
    let asked = berth_now_millis();
    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "canceled" && r["exit_code"] == 42 && r["stop_grace_seconds"] == 60,
        "its own exit code, not SIGKILL's: {r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["ready", "got TERM"], "{logs:?}");
    let ended_after = millis(&r, "completed_at")? - asked;
    ensure!(
        ended_after < 60_000,
        "ended by its handler, not after the 60 s grace: {ended_after} ms"
    );
    f.assert_run_cleaned(&node, &run).await?;
    Ok(())
}

#[tokio::test]
async fn an_oom_killed_run_leaves_nothing_behind() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    ends_clean(
        &f,
        json!({
            "run_command": "x=a; while true; do x=\"$x$x\"; done",
            "instance_type": "standard-xs",
            "timeout_seconds": 60,
        }),
        json!({}),
        |r| r["status"] == "failed" && r["exit_code"] == 137 && r["oom_killed"] == true,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_run_that_cannot_start_leaves_nothing_behind() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    ends_clean(&f, json!({"argv": ["/no/such/command"]}), json!({}), |r| {
        r["status"] == "failed" && r["started_at"].is_null() && !r["error_code"].is_null()
    })
    .await?;
    // A file that cannot be mounted (its path is a directory in the image) fails the start too.
    ends_clean(
        &f,
        json!({"run_command": "true"}),
        json!({"files": [{"path": "/bin", "content_base64": HELLO_B64}]}),
        |r| r["status"] == "failed" && r["started_at"].is_null(),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_timeout_counts_from_the_process_start_not_from_the_run_creation() -> Result<()> {
    // One slot: the timed run waits behind a 6 s run before it starts.
    let f = Fleet::start(&[AgentSpec {
        max_runs: 1,
        ..AgentSpec::new("fra")
    }])
    .await?;
    let node = f.node("fra").to_owned();
    let blocker = f.runner("fra", json!({"run_command": "sleep 6"})).await?;
    let first = f.start_run(&blocker, json!({})).await?;
    f.wait_for(&blocker, &first, Duration::from_secs(30), |s| {
        s == "running"
    })
    .await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "echo started; sleep 1000", "timeout_seconds": 2, "stop_grace_seconds": 1}),
        )
        .await?;
    let run = f.start_run(&runner, with_files(json!({}))).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 124 && r["error_code"] == "timeout",
        "{r}"
    );
    let (created, started, completed) = (
        millis(&r, "created_at")?,
        millis(&r, "started_at")?,
        millis(&r, "completed_at")?,
    );
    ensure!(
        started - created >= 2_000,
        "the run waited for the slot longer than its timeout: {r}"
    );
    ensure!(
        completed - started >= 2_000,
        "it still ran its full 2 s timeout after starting: {r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["started"], "{logs:?}");
    f.assert_run_cleaned(&node, &run).await?;
    f.assert_run_cleaned(&node, &first).await?;
    Ok(())
}

fn berth_now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
