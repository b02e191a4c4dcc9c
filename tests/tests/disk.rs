//! End-to-end: a run cannot fill its node's disk (issue #12, item 7). A run that writes past the
//! node's per-run limit (`--max-run-disk-mib`) is killed with `disk_limit_exceeded` and the node
//! goes on serving; a node whose snapshot filesystem falls below its reserve
//! (`--min-free-disk-mib`) takes no new runs — they wait, placed elsewhere or later — and takes
//! them again once space is back.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet};
use serde_json::json;
use std::time::{Duration, Instant};

/// Free MiB on the filesystem holding `path` (what `df` reports as available).
fn free_mib(path: &str) -> Result<u64> {
    let out = std::process::Command::new("df")
        .args(["-B1M", "--output=avail", path])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("df said {text:?}"))
}

#[tokio::test]
async fn a_run_that_writes_past_the_limit_is_killed_and_the_node_serves_on() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    f.restart_agent_with(&node, &["--max-run-disk-mib", "64"])
        .await?;
    let filler = f
        .runner(
            "fra",
            json!({"run_command": "echo filling; dd if=/dev/zero of=/fill bs=1M count=512; echo filled; sleep 120",
                   "timeout_seconds": 300}),
        )
        .await?;
    let run = f.start_run(&filler, json!({})).await?;
    let began = Instant::now();
    let ended = f
        .wait_for(&filler, &run, Duration::from_secs(60), |s| {
            matches!(s, "succeeded" | "failed" | "canceled")
        })
        .await?;
    ensure!(
        ended["status"] == "failed" && ended["error_code"] == "disk_limit_exceeded",
        "{ended}"
    );
    let message = ended["error_message"].as_str().unwrap_or_default();
    ensure!(message.contains("(64 MiB)"), "{message}");
    // Well before its 120 s sleep or its timeout.
    ensure!(
        began.elapsed() < Duration::from_secs(45),
        "took {:?}",
        began.elapsed()
    );

    let next = f
        .runner("fra", json!({"run_command": "echo still-serving"}))
        .await?;
    let run = f.start_run(&next, json!({})).await?;
    let r = f.wait_finished(&next, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let view = f.node_view(&node).await?.context("node listed")?;
    ensure!(view["status"] == "ready", "{view}");
    Ok(())
}

#[tokio::test]
async fn a_node_low_on_disk_takes_no_runs_until_space_is_back() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    // The fleet's directory and containerd's snapshots share the root filesystem here.
    let data = f.dir.path().to_string_lossy().into_owned();
    // A reserve 1 GiB below what is free now; a 2 GiB file then takes the node below it.
    let reserve = free_mib(&data)?.saturating_sub(1024).to_string();
    f.restart_agent_with(&node, &["--min-free-disk-mib", &reserve])
        .await?;
    let ballast = tempfile::NamedTempFile::new_in(&data)?;
    ballast.as_file().set_len(0)?;
    let status = std::process::Command::new("fallocate")
        .args(["-l", "2GiB"])
        .arg(ballast.path())
        .status()?;
    ensure!(status.success(), "fallocate failed");

    let runner = f
        .runner("fra", json!({"run_command": "echo placed"}))
        .await?;
    // The agent notices within its half-second probe; the run it refuses waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = f.start_run(&runner, json!({})).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = f.run(&runner, &run).await?;
        ensure!(r["status"] == "pending", "placed while low on disk: {r}");
        if r["pending_reason"]
            .as_str()
            .is_some_and(|p| p.contains("draining"))
        {
            break;
        }
        ensure!(Instant::now() < deadline, "never refused: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = f.log_of(&format!("agent-{node}"));
    ensure!(log.contains("low on disk"), "the agent did not say why");

    drop(ballast);
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    Ok(())
}
