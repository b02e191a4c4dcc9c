//! End-to-end: containerd dies (`kill -9`) and comes back under a running node agent. The test
//! never touches the shared containerd: it starts a private one (own root, state and sockets in
//! a temporary directory) and points its agent at it.
//!
//! - Runs going when containerd dies keep running and stay supervised: their lines keep
//!   arriving, a stop and a timeout still end them with the real outcome, one that exits by
//!   itself meanwhile is reported with its real exit code, and all are cleaned up; a run whose task really went away (its shim killed while containerd was down) ends
//!   `failed` with `task_failed` saying containerd lost it.
//! - A run submitted while containerd is down is not failed: it waits and runs once containerd
//!   is back.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{msgs, pid_with_args, AgentSpec, Fleet, FleetOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A containerd of this test only, configured as `deploy/lib.sh` configures the suite's.
struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateContainerd {
    async fn start() -> Result<PrivateContainerd> {
        // Next to the shared one (a file system containerd's overlayfs snapshotter works on).
        let base =
            std::env::var("BERTH_TEST_DATA_DIR").context("BERTH_TEST_DATA_DIR is not set")?;
        let dir = tempfile::Builder::new()
            .prefix("ctrd-restart-")
            .tempdir_in(base)?;
        let d = dir.path().display().to_string();
        for sub in ["root", "state", "opt"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"
  tcp_address = ""

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        std::fs::write(dir.path().join("config.toml"), config)?;
        let mut c = PrivateContainerd { dir, child: None };
        c.restart().await?;
        Ok(c)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Starts containerd (again) and waits until it answers.
    async fn restart(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.answers().await {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the private containerd did not answer within 30 s: {}",
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self) -> bool {
        use containerd_client::services::v1::version_client::VersionClient;
        let Ok(channel) = containerd_client::connect(self.socket()).await else {
            return false;
        };
        VersionClient::new(channel)
            .version(tonic::Request::new(()))
            .await
            .is_ok()
    }

    /// `kill -9` of containerd itself; its shims (and so the runs) keep running.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Pids of the shims this containerd started (their `-address` is its socket).
    fn shim_pids(&self) -> Vec<u32> {
        let socket = self.socket().display().to_string();
        processes()
            .into_iter()
            .filter(|(_, _, args)| {
                args.first().is_some_and(|a| a.contains("containerd-shim"))
                    && args.contains(&socket)
            })
            .map(|(pid, _, _)| pid)
            .collect()
    }

    /// The shim of the task `run_id`.
    fn shim_of(&self, run_id: &str) -> Option<u32> {
        let shims = self.shim_pids();
        processes()
            .into_iter()
            .find(|(pid, _, args)| shims.contains(pid) && args.iter().any(|a| a == run_id))
            .map(|(pid, _, _)| pid)
    }
}

/// (pid, parent pid, command line) of every process.
fn processes() -> Vec<(u32, u32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            Some((pid, ppid, args))
        })
        .collect()
}

/// `pids` and every process below them.
fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let all = processes();
    let mut found: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (pid, ppid, _) in &all {
            if *ppid == parent && !found.contains(pid) {
                found.push(*pid);
            }
        }
        i += 1;
    }
    found
}

fn kill_9(pids: &[u32]) {
    for pid in pids {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PrivateContainerd {
    /// Leaves nothing running or mounted, whatever the test did: containerd, its shims and the
    /// processes under them are killed by pid, the mounts under its directory unmounted.
    fn drop(&mut self) {
        let _ = self.kill();
        let shims = self.shim_pids();
        kill_9(&with_descendants(&shims));
        let dir = self.dir.path().display().to_string();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&dir))
            .collect();
        for m in mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

async fn fleet_on(containerd: &PrivateContainerd) -> Result<Fleet> {
    Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            containerd_socket: Some(containerd.socket().display().to_string()),
            ..Default::default()
        },
    )
    .await
}

async fn stdout_lines(f: &Fleet, runner: &str, run: &str) -> Result<usize> {
    Ok(msgs(&f.all_logs(runner, run).await?, "stdout").len())
}

/// Waits until the run printed more than `more_than` lines on stdout.
async fn wait_lines(f: &Fleet, runner: &str, run: &str, more_than: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = stdout_lines(f, runner, run).await?;
        if n > more_than {
            return Ok(n);
        }
        if Instant::now() > deadline {
            bail!(
                "run {run} printed {n} lines, not more than {more_than}: {}\n{}",
                f.run(runner, run).await?,
                f.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ticking(marker: &str) -> String {
    format!("M={marker}; i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.2; done")
}

#[tokio::test]
async fn runs_survive_a_containerd_restart_and_a_lost_task_ends_clearly() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let f = fleet_on(&containerd).await?;
    let node = f.node("fra").to_owned();
    let tag = std::process::id();
    let (mark_stop, mark_timeout, mark_lost) = (
        format!("stop{tag}"),
        format!("timeout{tag}"),
        format!("lost{tag}"),
    );
    let long = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let short = f.runner("fra", json!({"timeout_seconds": 20})).await?;
    let start = |runner: &str, marker: &str| {
        let body = json!({"command": ticking(marker), "stop_grace_seconds": 1});
        let runner = runner.to_owned();
        let f = &f;
        async move { f.start_run(&runner, body).await.map(|run| (runner, run)) }
    };
    let (stopped_runner, stopped) = start(&long, &mark_stop).await?;
    let (timed_out_runner, timed_out) = start(&short, &mark_timeout).await?;
    let (_, lost) = start(&long, &mark_lost).await?;
    // One that ends by itself about 2.4 s after its start: most likely while containerd is down.
    let ends = f
        .start_run(
            &long,
            json!({"command": format!(
                "M=ends{tag}; i=0; while [ $i -lt 12 ]; do i=$((i+1)); echo tick$i; sleep 0.2; done; exit 3"
            )}),
        )
        .await?;
    let runner_of = |run: &str| {
        if run == timed_out {
            timed_out_runner.clone()
        } else {
            stopped_runner.clone()
        }
    };
    for run in [&stopped, &timed_out, &lost] {
        f.wait_for(&runner_of(run), run, Duration::from_secs(60), |s| {
            s == "running"
        })
        .await?;
        wait_lines(&f, &runner_of(run), run, 2).await?;
    }

    containerd.kill()?;
    // The shim of one run goes too, with its processes: that task is really gone.
    let shim = containerd
        .shim_of(&lost)
        .with_context(|| format!("no shim for {lost}"))?;
    kill_9(&with_descendants(&[shim]));
    // Before the fix, the runs were failed within 2 s of containerd going away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for run in [&stopped, &timed_out] {
        let r = f.run(&runner_of(run), run).await?;
        ensure!(
            r["status"] == "running",
            "run {run} while containerd is down: {r}\n{}",
            f.logs()
        );
    }
    containerd.restart().await?;

    // The lost run ends, clearly.
    let r = f.wait_finished(&stopped_runner, &lost).await?;
    ensure!(
        r["status"] == "failed"
            && r["error_code"] == "task_failed"
            && r["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("containerd lost the task")),
        "a run whose task is gone: {r}\n{}",
        f.logs()
    );

    // The one that ended by itself meanwhile: its real ending, every line.
    let r = f.wait_finished(&long, &ends).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 3 && r["error_code"].is_null(),
        "a run that ended by itself: {r}\n{}",
        f.logs()
    );
    let want: Vec<String> = (1..=12).map(|i| format!("tick{i}")).collect();
    ensure!(
        msgs(&f.all_logs(&long, &ends).await?, "stdout") == want,
        "its lines"
    );

    // The others are still supervised: their lines keep coming.
    for run in [&stopped, &timed_out] {
        let r = f.run(&runner_of(run), run).await?;
        ensure!(r["status"] == "running", "after the restart: {r}");
        let n = stdout_lines(&f, &runner_of(run), run).await?;
        wait_lines(&f, &runner_of(run), run, n + 5).await?;
    }

    // A stop still works and reports the real outcome.
    f.post(
        &format!("/v1/runners/{stopped_runner}/runs/{stopped}/stop"),
        json!({}),
    )
    .await?;
    let r = f.wait_finished(&stopped_runner, &stopped).await?;
    ensure!(r["status"] == "canceled", "stopped: {r}\n{}", f.logs());

    // The timeout still counts from the start and ends the run as a timeout.
    let r: Value = f.wait_finished(&timed_out_runner, &timed_out).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 124 && r["error_code"] == "timeout",
        "timed out: {r}\n{}",
        f.logs()
    );

    for run in [&stopped, &timed_out, &lost, &ends] {
        f.assert_run_cleaned(&node, run).await?;
    }
    for marker in [&mark_stop, &mark_timeout, &mark_lost] {
        ensure!(
            pid_with_args(&[&format!("M={marker};")]).is_none(),
            "a process of the run marked {marker} still runs"
        );
    }
    ensure!(
        containerd.shim_pids().is_empty(),
        "shims left: {:?}",
        containerd.shim_pids()
    );
    drop(f);
    Ok(())
}

#[tokio::test]
async fn a_run_submitted_while_containerd_is_down_waits_and_runs_once_it_is_back() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let f = fleet_on(&containerd).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "echo hello"}))
        .await?;

    containerd.kill()?;
    // Let the agent notice (it asks containerd twice a second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = f.start_run(&runner, json!({})).await?;
    // Before the fix the run failed at once with image_pull_failed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = f.run(&runner, &run).await?;
    ensure!(
        r["status"] == "pending"
            && r["pending_reason"]
                .as_str()
                .is_some_and(|p| p.contains("draining")),
        "a run submitted while containerd is down: {r}\n{}",
        f.logs()
    );
    let shown = f.node_view(&node).await?.unwrap_or_default();
    ensure!(
        shown["status"] == "draining",
        "the node takes no runs while containerd is down: {shown}"
    );

    containerd.restart().await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["node_id"] == node.as_str(),
        "once containerd is back: {r}\n{}",
        f.logs()
    );
    ensure!(
        msgs(&f.all_logs(&runner, &run).await?, "stdout") == ["hello"],
        "its output"
    );
    f.wait_node_status(&node, "ready", Duration::from_secs(15))
        .await?;
    f.assert_run_cleaned(&node, &run).await?;
    drop(f);
    Ok(())
}

/// Ready sandboxes (issue #13 item 3) across a containerd kill and restart: the created task's
/// shim outlives containerd, so a run of the warmed runner afterwards still starts in its
/// sandbox (or, were it lost, in a container of its own) and succeeds.
#[tokio::test]
async fn a_ready_sandbox_serves_a_run_after_containerd_restarts() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let f = fleet_on(&containerd).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "echo after"}))
        .await?;
    f.post(
        &format!("/v1/runners/{runner}/warmup"),
        json!({"sandboxes": 1}),
    )
    .await?;
    let log = format!("agent-{node}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f.log_of(&log).contains("sandbox ready") {
        ensure!(Instant::now() < deadline, "no sandbox\n{}", f.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    containerd.kill()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    containerd.restart().await?;
    f.wait_node_status(&node, "ready", Duration::from_secs(30))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f
        .wait_for(&runner, &run, Duration::from_secs(60), |s| {
            matches!(s, "succeeded" | "failed" | "canceled")
        })
        .await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    ensure!(
        r["timeline"]["sandbox"] == true,
        "the sandbox did not survive the restart: {r}"
    );
    ensure!(msgs(&f.all_logs(&runner, &run).await?, "stdout") == ["after"]);
    Ok(())
}
