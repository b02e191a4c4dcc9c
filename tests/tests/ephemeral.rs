//! End-to-end: ephemeral nodes (issue #15), `berthctl run RUNNER --here` as a CI job would run
//! it: the real berthctl starts a real one-shot `berth-node-agent` on this machine's containerd,
//! which enrolls with a registration token, takes exactly its run (the fleet node beside it
//! with room takes none of it, and it takes none of the fleet's), streams the logs back, leaves,
//! and berthctl exits with the run's exit code. A CI job killed with kill -9 (berthctl and the
//! agent) ends the run `node_lost` within the node TTL; the agent started again on the same
//! state cleans up what the killed one left.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet, TOKEN};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `berthctl run RUNNER --here …` as a CI job starts it: the API's URL and a key, the
/// registration token and the agent's settings in its environment.
async fn here(
    f: &Fleet,
    state: &Path,
    runner: &str,
    extra: &[&str],
) -> Result<tokio::process::Command> {
    let token = std::fs::read_to_string(f.registration_token_file("fra").await?)?;
    let mut cmd = tokio::process::Command::new(f.env.bin_dir.join("berthctl"));
    cmd.env("BERTH_URL", &f.api_url)
        .env("BERTH_TOKEN", TOKEN)
        .env("BERTH_REGISTRATION_TOKEN", token.trim())
        .env("BERTH_AGENT_SCHEDULER", f.scheduler_urls())
        .env("BERTH_AGENT_CONTAINERD_SOCKET", &f.env.containerd_socket)
        .env("BERTH_AGENT_NETWORK", "none")
        .env("BERTH_AGENT_MEMORY_MIB", "2048")
        .env("BERTH_AGENT_CPUS", "1")
        .env_remove("BERTH_CLUSTER_TOKEN")
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .args(["run", runner, "--here", "--state-dir"])
        .arg(state)
        .args(extra);
    Ok(cmd)
}

/// The run id berthctl announces on stderr ("run ID created; …").
fn announced(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        l.strip_prefix("run ")
            .and_then(|r| r.split_once(" created"))
            .map(|(id, _)| id.to_owned())
    })
}

#[tokio::test]
async fn run_here_takes_exactly_its_run_streams_it_and_exits_with_its_code() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let fleet_node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({})).await?;
    let state = f.dir.path().join("ci-job");
    let ci = here(
        &f,
        &state,
        &runner,
        &[
            "--command",
            "echo from-the-ci-job; sleep 4; echo bye >&2; exit 3",
        ],
    )
    .await?
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;

    // While it runs, runs of the fleet go to the fleet node only.
    let mut ephemeral = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ephemeral.is_none() {
        ensure!(
            Instant::now() < deadline,
            "no ephemeral node came up\n{}",
            f.logs()
        );
        let nodes = f.get("/v1/nodes").await?;
        ephemeral = nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["id"].as_str())
            .find(|id| id.starts_with("eph-"))
            .map(str::to_owned);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ephemeral = ephemeral.context("ephemeral node")?;
    let mut fleet_runs = Vec::new();
    for _ in 0..3 {
        fleet_runs.push(
            f.start_run(&runner, json!({"command": "echo fleet"}))
                .await?,
        );
    }
    for run in &fleet_runs {
        let done = f.wait_finished(&runner, run).await?;
        ensure!(done["status"] == "succeeded", "{done}");
        ensure!(
            done["node_id"] == fleet_node.as_str(),
            "a fleet run went elsewhere: {done}"
        );
        ensure!(done["ephemeral"].is_null(), "{done}");
    }

    let out = tokio::time::timeout(Duration::from_secs(120), ci.wait_with_output())
        .await
        .context("berthctl run --here did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(3),
        "exit {:?}\nstdout: {stdout}\nstderr: {stderr}\n{}",
        out.status.code(),
        f.logs()
    );
    ensure!(stdout.contains("from-the-ci-job"), "stdout: {stdout}");
    ensure!(stderr.contains("bye"), "stderr: {stderr}");
    ensure!(
        !stdout.contains("berthclaim_") && !stderr.contains("berthclaim_"),
        "the claim leaked"
    );
    let run_id = announced(&stderr).with_context(|| format!("no run id in {stderr}"))?;

    // The record: its ephemeral node ran it, the fleet node did not; its logs are stored.
    let run = f.run(&runner, &run_id).await?;
    ensure!(run["status"] == "failed" && run["exit_code"] == 3, "{run}");
    ensure!(run["node_id"] == ephemeral.as_str(), "{run}");
    ensure!(run["ephemeral"]["node_id"] == ephemeral.as_str(), "{run}");
    ensure!(ephemeral == format!("eph-{run_id}"), "{ephemeral}");
    ensure!(
        run["ephemeral_claim"].is_null(),
        "a read shows the claim: {run}"
    );
    let logs = f.all_logs(&runner, &run_id).await?;
    ensure!(
        common::msgs(&logs, "stdout") == ["from-the-ci-job"],
        "{logs:?}"
    );
    ensure!(common::msgs(&logs, "stderr") == ["bye"], "{logs:?}");

    // It left: gone from the fleet, nothing left in containerd, its state removed.
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.node_view(&ephemeral).await?.is_some() {
        ensure!(Instant::now() < deadline, "{ephemeral} still listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.wait_no_containers(&ephemeral).await?;
    ensure!(
        !state.exists(),
        "the job's state dir is left: {}",
        state.display()
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_ci_job_ends_the_run_node_lost_and_a_restart_cleans_up() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({})).await?;
    let state = f.dir.path().join("ci-job");
    let stderr_path = f.dir.path().join("ci-job.stderr");
    let mut ci = here(
        &f,
        &state,
        &runner,
        &["--command", "echo started; sleep 300"],
    )
    .await?
    .process_group(0)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&stderr_path)?)
    .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        if let Some(id) = announced(&std::fs::read_to_string(&stderr_path)?) {
            break id;
        }
        ensure!(
            Instant::now() < deadline,
            "berthctl announced no run\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    f.wait_for(&runner, &run_id, Duration::from_secs(60), |s| {
        s == "running"
    })
    .await?;
    let logs_seen = async {
        loop {
            let logs = f.all_logs(&runner, &run_id).await?;
            if common::msgs(&logs, "stdout") == ["started"] {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), logs_seen)
        .await
        .context("the run's first line never arrived")??;

    // The CI job is killed: berthctl and its agent, at once.
    let pgid = ci.id().context("berthctl pid")?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()?;
    ensure!(killed.success(), "kill -KILL -{pgid}");
    let _ = ci.wait().await;
    let at = Instant::now();
    let ended = f
        .wait_for(&runner, &run_id, Duration::from_secs(30), |s| {
            s != "running"
        })
        .await?;
    let took = at.elapsed();
    ensure!(
        ended["status"] == "failed" && ended["error_code"] == "node_lost",
        "{ended}"
    );
    eprintln!("the killed job's run ended node_lost {took:?} after the kill");
    let node = format!("eph-{run_id}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while f.node_view(&node).await?.is_some() {
        ensure!(
            Instant::now() < deadline,
            "{node} still listed after its loss"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The killed agent's container still runs on this machine. The same agent started again
    // on the job's state re-adopts it, registers to deliver what it holds, is told the run is
    // over, stops and removes it, and leaves with success.
    ensure!(
        !f.containers(&node).await?.is_empty(),
        "the container went by itself?"
    );
    let again = tokio::process::Command::new(f.env.bin_dir.join("berth-node-agent"))
        .args([
            "--scheduler",
            &f.scheduler_urls(),
            "--node-id",
            &node,
            "--region",
            "fra",
        ])
        .args(["--memory-mib", "2048", "--cpus", "1", "--network", "none"])
        .args(["--containerd-socket", &f.env.containerd_socket])
        .args(["--ephemeral-run-id", &run_id, "--ephemeral-claim-file"])
        .arg(state.join("ephemeral.claim"))
        .arg("--state-dir")
        .arg(state.join("agent"))
        .env_remove("BERTH_CLUSTER_TOKEN")
        .env_remove("BERTH_REGISTRATION_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its log in a file, so that a hang still shows what it did.
        .stderr(std::fs::File::create(state.join("again.log"))?)
        .kill_on_drop(true)
        .status();
    let log = || std::fs::read_to_string(state.join("again.log")).unwrap_or_default();
    let status = match tokio::time::timeout(Duration::from_secs(60), again).await {
        Ok(status) => status?,
        Err(_) => anyhow::bail!("the restarted agent did not leave within 60 s:\n{}", log()),
    };
    ensure!(status.success(), "{status:?}\n{}", log());
    f.wait_no_containers(&node).await?;
    let after: Value = f.run(&runner, &run_id).await?;
    ensure!(
        after["error_code"] == "node_lost",
        "the ending changed: {after}"
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_agent_stops_the_run_and_berthctl_fails() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({})).await?;
    let state = f.dir.path().join("ci-job");
    // The agent offers less memory than the run's instance type needs: refused at register.
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        here(&f, &state, &runner, &["--command", "echo never"])
            .await?
            .env("BERTH_AGENT_MEMORY_MIB", "16")
            .output(),
    )
    .await
    .context("berthctl did not finish")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(stderr.contains("this node offers 16 MiB"), "{stderr}");
    let run_id = announced(&stderr).with_context(|| format!("no run id in {stderr}"))?;
    let run = f.run(&runner, &run_id).await?;
    ensure!(run["status"] == "canceled", "{run}");
    ensure!(run["node_id"].is_null(), "{run}");
    Ok(())
}
