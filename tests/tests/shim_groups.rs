//! Runs sharing containerd shims (`--shim-group-size`, issue #13 item 5) on the real containerd:
//! runs of a group are served by one shim process and behave like any run (output, exit code,
//! cleanup), and a shim that dies ends the runs of its group only.

mod common;

use anyhow::{ensure, Context, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The shim serving a run: the parent of the run's first process.
fn shim_of(f: &Fleet, node: &str, run: &str) -> Result<u32> {
    let procs = std::fs::read_to_string(f.cgroup_dir("memory", node, run).join("cgroup.procs"))
        .with_context(|| format!("run {run}'s cgroup"))?;
    let pid: u32 = procs
        .lines()
        .next()
        .context("no process in the run's cgroup")?
        .parse()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // pid (comm) state ppid ...: the command may hold spaces, the fields after ')' do not.
    let after = stat.rsplit_once(')').context("stat")?.1;
    let ppid: u32 = after.split_whitespace().nth(1).context("ppid")?.parse()?;
    let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline"))?;
    ensure!(
        String::from_utf8_lossy(&cmdline).contains("containerd-shim"),
        "the parent of run {run}'s process is not a shim"
    );
    Ok(ppid)
}

#[tokio::test]
async fn runs_share_shims_by_group_and_a_dead_shim_ends_only_its_group() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec {
        memory_mib: 8192,
        max_runs: 8,
        ..AgentSpec::new("fra")
    }])
    .await?;
    let node = f.node("fra").to_owned();
    f.restart_agent_with(&node, &["--shim-group-size", "3"])
        .await?;

    // A run of a group behaves like any run: its output, its exit code, its cleanup.
    let short = f
        .runner(
            "fra",
            json!({"run_command": "echo grouped; echo oops >&2; exit 3"}),
        )
        .await?;
    let one = f.start_run(&short, json!({})).await?;
    let r = f.wait_finished(&short, &one).await?;
    ensure!(r["status"] == "failed" && r["exit_code"] == 3, "{r}");
    let logs = f.all_logs(&short, &one).await?;
    ensure!(msgs(&logs, "stdout") == ["grouped"], "{logs:?}");
    ensure!(msgs(&logs, "stderr") == ["oops"], "{logs:?}");
    f.assert_run_cleaned(&node, &one).await?;

    // Six sleeping runs: two shims of three.
    let sleeper = f.runner("fra", json!({"run_command": "sleep 300"})).await?;
    let mut runs = Vec::new();
    for _ in 0..6 {
        runs.push(f.start_run(&sleeper, json!({})).await?);
    }
    for run in &runs {
        f.wait_for(&sleeper, run, Duration::from_secs(60), |s| s == "running")
            .await?;
    }
    let mut by_shim: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for run in &runs {
        by_shim
            .entry(shim_of(&f, &node, run)?)
            .or_default()
            .push(run.clone());
    }
    let sizes: Vec<usize> = by_shim.values().map(Vec::len).collect();
    ensure!(sizes == [3, 3], "runs per shim: {by_shim:?}");

    // One shim dies: its three runs end, the other three keep running.
    let (&dead, victims) = by_shim.iter().next().context("a shim")?;
    let victims: BTreeSet<String> = victims.iter().cloned().collect();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &dead.to_string()])
        .status()?;
    ensure!(status.success(), "kill -KILL {dead}");
    for run in &victims {
        let r = f
            .wait_for(&sleeper, run, Duration::from_secs(30), |s| {
                matches!(s, "succeeded" | "failed" | "canceled")
            })
            .await?;
        ensure!(r["status"] == "failed", "{r}");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for run in runs.iter().filter(|r| !victims.contains(*r)) {
            let r = f.run(&sleeper, run).await?;
            ensure!(r["status"] == "running", "a run of another shim ended: {r}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Stopped, the others go too, and nothing is left of any of them.
    for run in runs.iter().filter(|r| !victims.contains(*r)) {
        f.post(&format!("/v1/runners/{sleeper}/runs/{run}/stop"), json!({}))
            .await?;
    }
    for run in &runs {
        f.wait_finished(&sleeper, run).await?;
    }
    for run in &runs {
        f.assert_run_cleaned(&node, run).await?;
    }
    f.wait_no_containers(&node).await?;
    ensure!(
        std::fs::metadata(format!("/proc/{dead}")).is_err(),
        "the killed shim is still there"
    );
    Ok(())
}
