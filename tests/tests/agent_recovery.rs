//! End-to-end crash recovery of the node agent: `kill -9` of a real agent while its run executes.
//! The container keeps running under containerd; the restarted agent re-adopts it, keeps
//! capturing its output and reports its real exit — no run lost, no line lost or duplicated.

mod common;

use anyhow::{ensure, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::json;
use std::time::{Duration, Instant};

/// Kills the node's agent with SIGKILL, starts it again and waits until the scheduler has
/// the new process registered.
async fn crash_and_restart(f: &mut Fleet, node: &str) -> Result<()> {
    f.signal_agent(node, "KILL")?;
    f.restart_agent(node)?;
    // The old stream may not be noticed as closed yet; give the new process a moment to
    // register before trusting "ready".
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.wait_node_status(node, "ready", Duration::from_secs(15))
        .await?;
    Ok(())
}

#[tokio::test]
async fn killing_the_agent_ten_times_mid_run_loses_no_run_and_no_line() -> Result<()> {
    // ~36 s of output: twelve kill-and-restart rounds fit inside it even on a loaded machine
    // (CI once saw only nine of them land with half of this).
    const LINES: u64 = 800;
    const KILLS: u32 = 12;
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let command = format!(
        "i=1; while [ $i -le {LINES} ]; do echo out$i; echo err$i >&2; i=$((i+1)); sleep 0.04; done"
    );
    let runner = f.runner("fra", json!({"run_command": command})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;

    let mut kills_while_running = 0;
    for i in 0..KILLS {
        // Random-ish pauses between 250 and 850 ms, different each round.
        let pause = 250 + (u64::from(i) * 397 + 131) % 600;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let running = f.run(&runner, &run).await?["status"] == "running";
        crash_and_restart(&mut f, &node).await?;
        if running {
            kills_while_running += 1;
        }
    }
    ensure!(
        kills_while_running >= 10,
        "the run ended too early: only {kills_while_running} kills hit it running"
    );

    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0 && r["error_code"].is_null(),
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    let want_out: Vec<String> = (1..=LINES).map(|i| format!("out{i}")).collect();
    let want_err: Vec<String> = (1..=LINES).map(|i| format!("err{i}")).collect();
    let out = msgs(&logs, "stdout");
    let err = msgs(&logs, "stderr");
    ensure!(
        out == want_out,
        "stdout is out1..out{LINES} exactly once, in order: got {} lines: {out:?}",
        out.len()
    );
    ensure!(
        err == want_err,
        "stderr is err1..err{LINES} exactly once, in order: got {} lines: {err:?}",
        err.len()
    );
    let mut ids: Vec<u64> = logs.iter().filter_map(|l| l["id"].as_u64()).collect();
    ids.sort_unstable();
    let want_ids: Vec<u64> = (1..=2 * LINES).collect();
    ensure!(
        ids == want_ids,
        "every log id 1..={} exactly once",
        2 * LINES
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_agent_reports_the_real_exit_of_a_run_it_re_adopted() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("ams")]).await?;
    let node = f.node("ams").to_owned();
    let runner = f
        .runner(
            "ams",
            json!({"run_command": "echo begin; sleep 2; echo end >&2; exit 5"}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    crash_and_restart(&mut f, &node).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 5 && r["error_code"].is_null(),
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        msgs(&logs, "stdout") == ["begin"] && msgs(&logs, "stderr") == ["end"],
        "{logs:?}"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

#[tokio::test]
async fn the_timeout_still_fires_after_the_agent_restarts() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("ams")]).await?;
    let node = f.node("ams").to_owned();
    let runner = f
        .runner(
            "ams",
            json!({"run_command": "sleep 60", "timeout_seconds": 3}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    crash_and_restart(&mut f, &node).await?;
    let r = f
        .wait_for(&runner, &run, Duration::from_secs(20), |s| s != "running")
        .await?;
    let took = started.elapsed();
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 124 && r["error_code"] == "timeout",
        "{r}\n{}",
        f.logs()
    );
    // 3 s timeout from the start, plus up to the 2 s grace, plus polling slack.
    ensure!(
        took < Duration::from_secs(8),
        "timed out only after {took:?}"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_killed_before_a_run_starts_gets_it_back_and_runs_it() -> Result<()> {
    // A run that never started on the old process is forgotten by the new one; the scheduler
    // re-queues it and it runs to completion.
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"run_command": "echo once"})).await?;
    crash_and_restart(&mut f, &node).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["once"], "{logs:?}");
    Ok(())
}

/// SIGTERM with a shutdown grace shorter than the run: the agent drains, gives up waiting after
/// the grace and exits 0, leaving the run to containerd; the next agent process re-adopts it and
/// reports its real exit and every line, once.
#[tokio::test]
async fn a_run_outliving_the_shutdown_grace_is_re_adopted_by_the_next_agent() -> Result<()> {
    const LINES: u32 = 50;
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Only this test sends SIGTERM; the others kill with SIGKILL, where the grace plays no part.
    ONCE.call_once(|| std::env::set_var("BERTH_AGENT_SHUTDOWN_GRACE_SECONDS", "1"));
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let command = format!(
        "i=1; while [ $i -le {LINES} ]; do echo line$i; i=$((i+1)); sleep 0.1; done; exit 7"
    );
    let runner = f.runner("fra", json!({"run_command": command})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;

    f.signal_agent(&node, "TERM")?;
    let status = f.wait_agent_exit(&node, Duration::from_secs(15)).await?;
    ensure!(status.success(), "the draining agent exited with {status}");
    // The agent is gone but the run goes on under containerd.
    let r = f.run(&runner, &run).await?;
    ensure!(r["status"] == "running", "{r}");
    ensure!(
        f.containers(&node).await?.len() == 1,
        "the run's container outlives its agent"
    );

    f.restart_agent(&node)?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 7 && r["error_code"].is_null(),
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    let want: Vec<String> = (1..=LINES).map(|i| format!("line{i}")).collect();
    ensure!(msgs(&logs, "stdout") == want, "{logs:?}");
    f.wait_no_containers(&node).await?;
    Ok(())
}

/// A restarted agent reports the images it already holds (for image-locality scoring) from its
/// registration on, not only the ones it pulls again.
#[tokio::test]
async fn a_restarted_agent_reports_the_images_it_already_holds() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("ams")]).await?;
    let node = f.node("ams").to_owned();
    let runner = f.runner("ams", json!({"run_command": "true"})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    crash_and_restart(&mut f, &node).await?;
    let image = format!("{}/busybox:latest", f.env.registry);
    let held = f.cached_images(&node).await?;
    ensure!(
        held.contains(&image),
        "the restarted agent registered without {image}: {held:?}"
    );
    Ok(())
}
