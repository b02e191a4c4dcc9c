//! End-to-end node loss with real agents (issue #10): a node declared lost ends its runs
//! `node_lost` for good — when its agent speaks again it kills and cleans up their containers,
//! none of their later lines is stored, and the node takes no new run while the stale container
//! still holds its capacity — and an agent whose scheduler is gone still stops on SIGTERM within
//! its grace.

mod common;

use anyhow::{ensure, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::json;
use std::time::{Duration, Instant};

/// Heartbeat every second; lost after 1 s TTL + 1 s grace of silence.
const FAST_LOSS: &[&str] = &["--node-ttl-seconds", "1", "--lost-grace-seconds", "1"];

#[tokio::test]
async fn a_lost_node_kills_its_stale_run_stores_none_of_its_late_lines_and_is_never_overcommitted(
) -> Result<()> {
    // Room for exactly one standard-s run (1024 MiB).
    let mut f = Fleet::start_with(
        &[AgentSpec {
            memory_mib: 1024,
            ..AgentSpec::new("fra")
        }],
        FAST_LOSS,
    )
    .await?;
    let node = f.node("fra").to_owned();
    // Prints ten lines a second for ever. The shell is the container's init, so SIGTERM does
    // nothing: stopping it takes the whole stop grace, then SIGKILL — a long window in which
    // the stale container still runs on the node.
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "i=0; while :; do i=$((i+1)); echo line$i; sleep 0.1; done"}),
        )
        .await?;
    let lost = f
        .start_run(&runner, json!({"stop_grace_seconds": 4}))
        .await?;
    f.wait_for(&runner, &lost, Duration::from_secs(30), |s| s == "running")
        .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.all_logs(&runner, &lost).await?.len() < 5 {
        ensure!(Instant::now() < deadline, "no lines stored\n{}", f.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    f.signal_agent(&node, "STOP")?; // hung or partitioned: its container keeps printing
    let r = f
        .wait_for(&runner, &lost, Duration::from_secs(20), |s| s != "running")
        .await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "node_lost",
        "{r}"
    );
    f.wait_node_status(&node, "lost", Duration::from_secs(5))
        .await?;
    let stored_at_end = f.all_logs(&runner, &lost).await?.len();
    // A run that waits for the node's one slot of memory.
    let waiting = f
        .start_run(&runner, json!({"command": "echo second"}))
        .await?;
    let r = f.run(&runner, &waiting).await?;
    ensure!(r["status"] == "pending" && r["node_id"].is_null(), "{r}");
    // Let the stopped agent's container write a few seconds of lines nobody reads yet.
    tokio::time::sleep(Duration::from_secs(2)).await;

    f.signal_agent(&node, "CONT")?;
    // Until the stale container is gone the waiting run must not be placed on the node: it
    // has memory for one run only. (The run is read first: placed, then the stale container
    // seen still there, means both held the node at once.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut polls_while_stale = 0;
    loop {
        let w = f.run(&runner, &waiting).await?;
        let containers = f.containers(&node).await?;
        if !containers.contains(&lost) {
            break;
        }
        polls_while_stale += 1;
        ensure!(
            w["node_id"].is_null(),
            "over-committed: {waiting} was placed on {node} while the stale container of {lost} still ran there ({containers:?}): {w}\n{}",
            f.logs()
        );
        ensure!(
            Instant::now() < deadline,
            "the stale container of {lost} still runs on {node}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        polls_while_stale > 0,
        "the stale container was gone before it could be observed: the test proves nothing"
    );
    f.assert_run_cleaned(&node, &lost).await?;

    // The node works again: the waiting run goes there once the stale one is gone.
    let w = f.wait_finished(&runner, &waiting).await?;
    ensure!(
        w["status"] == "succeeded" && w["node_id"] == node.as_str(),
        "{w}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &waiting).await?;
    ensure!(msgs(&logs, "stdout") == ["second"], "{logs:?}");

    let r = f.run(&runner, &lost).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "node_lost",
        "a lost run stays lost: {r}"
    );
    let stored_later = f.all_logs(&runner, &lost).await?.len();
    ensure!(
        stored_later == stored_at_end,
        "lines stored after the run's final state: {stored_at_end} at the end, {stored_later} later"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

/// Sends SIGTERM to the node's agent and returns how long it took to exit.
async fn terminate(f: &mut Fleet, node: &str, at_most: Duration) -> Result<Duration> {
    let begin = Instant::now();
    f.signal_agent(node, "TERM")?;
    let status = f.wait_agent_exit(node, at_most).await?;
    ensure!(status.success(), "the agent exited with {status}");
    Ok(begin.elapsed())
}

#[tokio::test]
async fn an_agent_without_a_scheduler_stops_on_sigterm_within_its_grace() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "echo begin; sleep 3; echo end >&2"}),
        )
        .await?;

    // 1. Its run ends while the scheduler is down, so its exit cannot be acknowledged. With
    //    nothing left running the agent exits at once (not after its 30 s default grace); the
    //    next start reports the run from its journal.
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    f.kill_scheduler()?;
    f.wait_no_containers(&node).await?;
    let took = terminate(&mut f, &node, Duration::from_secs(8)).await?;
    ensure!(
        took < Duration::from_secs(8),
        "waited {took:?} for a scheduler that is not there"
    );
    f.start_scheduler()?;
    f.restart_agent(&node)?;
    f.wait_ready().await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0,
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        msgs(&logs, "stdout") == ["begin"] && msgs(&logs, "stderr") == ["end"],
        "{logs:?}"
    );

    // 2. A run still going when the scheduler is gone: the agent gives it its grace (3 s
    //    here), then exits and leaves it to containerd; the next start re-adopts it.
    f.restart_agent_with(&node, &["--shutdown-grace-seconds", "3"])
        .await?;
    f.wait_node_status(&node, "ready", Duration::from_secs(15))
        .await?;
    let long = f
        .start_run(
            &runner,
            json!({"command": "echo begin; sleep 8; echo end >&2"}),
        )
        .await?;
    f.wait_for(&runner, &long, Duration::from_secs(30), |s| s == "running")
        .await?;
    f.kill_scheduler()?;
    let took = terminate(&mut f, &node, Duration::from_secs(10)).await?;
    ensure!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "the run got its grace, then the agent exited: {took:?}"
    );
    ensure!(
        f.containers(&node).await? == vec![long.clone()],
        "the run keeps going under containerd"
    );
    f.start_scheduler()?;
    f.restart_agent(&node)?;
    f.wait_ready().await?;
    let r = f.wait_finished(&runner, &long).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0,
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &long).await?;
    ensure!(
        msgs(&logs, "stdout") == ["begin"] && msgs(&logs, "stderr") == ["end"],
        "{logs:?}"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}
