//! End-to-end limits of the node agent (issue 4, items 3 and 9) against real containerd, runc and
//! the kernel's cgroups: a memory bomb is OOM-killed and reported as such, a fork bomb stays
//! inside its pids limit while the node keeps serving, a log flood is cut at the per-run cap
//! without the run blocking or the disk filling, and SIGTERM drains the agent gracefully.
//!
//! Every hostile run here has a short timeout and runs inside the memory, CPU and pids limits
//! the spec sets; the first test checks those limits on a harmless run before any bomb runs.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{msgs, pid_with_args, AgentSpec, Fleet};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The per-run log cap every agent of this test binary runs with. The harness starts agents with
/// fixed flags but they inherit this process's environment, so the cap is set through the
/// agent's `BERTH_AGENT_MAX_LOG_BYTES_PER_RUN`.
const LOG_CAP_BYTES: u64 = 1024 * 1024;
const MIB: u64 = 1024 * 1024;
/// Default of the agent's `--pids-limit`.
const PIDS_LIMIT: u64 = 1024;

/// Sets the agents' environment once, before any test of this binary starts a fleet.
fn agent_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(
            "BERTH_AGENT_MAX_LOG_BYTES_PER_RUN",
            LOG_CAP_BYTES.to_string(),
        );
    });
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn agent_pid(node: &str) -> Result<u32> {
    pid_with_args(&["berth-node-agent", "--node-id", node])
        .with_context(|| format!("no agent process for {node}"))
}

fn rss_mib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024)
}

/// (state, exit status as waitpid reports it) of a process, from /proc/<pid>/stat; None when
/// the pid is gone.
fn proc_state(pid: u32) -> Option<(char, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 52 of stat is the exit code; `rest` starts at field 3.
    let exit_code = fields.get(52 - 3)?.parse().ok()?;
    Some((state, exit_code))
}

async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, done: F) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn echo_succeeds(f: &Fleet, region: &str, word: &str) -> Result<()> {
    let runner = f
        .runner(region, json!({"run_command": format!("echo {word}")}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "follow-up run: {r}");
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == [word], "{logs:?}");
    Ok(())
}

#[tokio::test]
async fn a_memory_bomb_is_oom_killed_and_reported_and_the_node_keeps_working() -> Result<()> {
    agent_env();
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();

    // First the limits themselves, on a harmless run of the same instance type.
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "sleep 30", "instance_type": "standard-xs", "timeout_seconds": 60}),
        )
        .await?;
    let calm = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &calm, Duration::from_secs(30), |s| s == "running")
        .await?;
    let memory = f.cgroup_dir("memory", &node, &calm);
    let limit = (512 * MIB).to_string();
    ensure!(read_trimmed(&memory.join("memory.limit_in_bytes"))? == limit);
    ensure!(
        read_trimmed(&memory.join("memory.memsw.limit_in_bytes"))? == limit,
        "memory + swap is capped at the memory limit: no swapping instead of the OOM kill"
    );
    let pids = f.cgroup_dir("pids", &node, &calm);
    ensure!(read_trimmed(&pids.join("pids.max"))? == PIDS_LIMIT.to_string());
    f.post(&format!("/v1/runners/{runner}/runs/{calm}/stop"), json!({}))
        .await?;

    // The bomb: the string doubles until it no longer fits in 512 MiB.
    let bomb_runner = f
        .runner(
            "fra",
            json!({
                "run_command": "echo growing; x=a; while true; do x=\"$x$x\"; done",
                "instance_type": "standard-xs",
                "timeout_seconds": 60,
            }),
        )
        .await?;
    let bomb = f.start_run(&bomb_runner, json!({})).await?;
    let r = f.wait_finished(&bomb_runner, &bomb).await?;
    ensure!(
        r["status"] == "failed"
            && r["exit_code"] == 137
            && r["oom_killed"] == true
            && r["error_code"] == "oom_killed",
        "{r}\n{}",
        f.logs()
    );
    // Both sources saw it: the cgroup's counter (v1 here) and containerd's OOM event.
    ensure!(
        f.log_of(&format!("agent-{node}"))
            .lines()
            .any(|l| l.contains("containerd reported an OOM kill") && l.contains(&bomb)),
        "no OOM event from containerd for {bomb}"
    );
    let took = r["duration_seconds"].as_u64().unwrap_or(u64::MAX);
    ensure!(took < 60, "killed by the kernel, not by the timeout: {r}");
    let logs = f.all_logs(&bomb_runner, &bomb).await?;
    ensure!(msgs(&logs, "stdout") == ["growing"], "{logs:?}");

    f.wait_no_containers(&node).await?;
    ensure!(
        !f.cgroup_dir("memory", &node, &bomb).exists(),
        "the run's cgroup is removed"
    );
    f.wait_node_status(&node, "ready", Duration::from_secs(5))
        .await?;
    echo_succeeds(&f, "fra", "after-the-bomb").await?;
    Ok(())
}

#[tokio::test]
async fn a_fork_bomb_stays_inside_its_pids_limit_and_the_node_keeps_serving() -> Result<()> {
    agent_env();
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner(
            "fra",
            json!({
                // `sleep` first (no fork is left later), then a self-replicating function; the shell waits.
                "run_command": "sleep 60 & b() { b | b & }; b; wait",
                "instance_type": "standard-xs",
                "timeout_seconds": 5,
            }),
        )
        .await?;
    let bomb = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &bomb, Duration::from_secs(30), |s| s == "running")
        .await?;
    let pids = f.cgroup_dir("pids", &node, &bomb);
    ensure!(read_trimmed(&pids.join("pids.max"))? == PIDS_LIMIT.to_string());

    // While it rages: the bomb hits its limit (its population swings as forks fail and shells
    // exit, so watch the peak and the cgroup's count of refused forks, not one sample), never
    // exceeds it, and the node still runs other work.
    //
    // Under gVisor (`BERTH_TEST_ISOLATION=sandbox`) the bomb's processes are the sandbox
    // kernel's tasks, each backed by a host stub process (ptrace platform) in the same pids
    // cgroup: when a fork is refused the busybox shell gives up ("can't fork", exit 2), so the
    // run may end before the watch does, and the cgroup goes with it.
    let sandboxed = common::sandboxed();
    let mut peak = 0u64;
    let watch_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < watch_until {
        let current = read_trimmed(&pids.join("pids.current"));
        if sandboxed && current.is_err() && !pids.exists() {
            break;
        }
        let current: u64 = current?.parse()?;
        ensure!(current <= PIDS_LIMIT, "{current} processes: over the limit");
        peak = peak.max(current);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = read_trimmed(&pids.join("pids.events"))
        .ok()
        .and_then(|e| {
            e.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    eprintln!("fork bomb: peak {peak} processes, {refused} forks refused at the limit");
    ensure!(
        sandboxed || peak > 100 && refused > 0,
        "the bomb never reached its limit: peak {peak}, refused {refused}"
    );
    let before = Instant::now();
    echo_succeeds(&f, "fra", "still-serving").await?;
    let nodes = f.get("/v1/nodes").await?;
    ensure!(nodes["nodes"][0]["status"] == "ready", "{nodes}");
    let still = f.run(&runner, &bomb).await?;
    ensure!(
        sandboxed || still["status"] == "running",
        "the other run finished while the bomb was still running ({:?} after): {still}",
        before.elapsed()
    );

    // The timeout ends it (or, sandboxed, its shell gave up first); nothing of it remains.
    let r = f.wait_finished(&runner, &bomb).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 124 && r["error_code"] == "timeout"
            || sandboxed && r["status"] == "failed" && r["exit_code"] != 0,
        "{r}"
    );
    f.wait_no_containers(&node).await?;
    wait_until(
        "the bomb's pids cgroup is gone",
        Duration::from_secs(10),
        || !pids.exists(),
    )
    .await?;
    echo_succeeds(&f, "fra", "after-the-bomb").await?;
    Ok(())
}

#[tokio::test]
async fn a_log_flood_is_cut_at_the_cap_with_one_marker_and_nothing_grows() -> Result<()> {
    agent_env();
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    // 100-character lines, as fast as `yes` writes them.
    let line = "0123456789".repeat(10);
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": format!("echo first >&2; sleep 1; yes {line}"),
                "instance_type": "standard-xs",
                "timeout_seconds": 10,
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let agent = agent_pid(&node)?;
    let scheduler_dir = f.dir.path().join("scheduler");
    let scheduler = pid_with_args(&["berth-scheduler", &scheduler_dir.to_string_lossy()])
        .context("no scheduler process")?;
    let raw_stdout: PathBuf = f
        .dir
        .path()
        .join(format!("agent-{node}"))
        .join("runs")
        .join(&run)
        .join("stdout");

    // While it floods: memory stays flat and the raw output does not pile up on disk.
    let mut peak_agent = 0;
    let mut peak_scheduler = 0;
    let mut written = 0;
    let mut peak_disk = 0;
    while f.run(&runner, &run).await?["status"] == "running" {
        peak_agent = peak_agent.max(rss_mib(agent)?);
        peak_scheduler = peak_scheduler.max(rss_mib(scheduler)?);
        if let Ok(meta) = std::fs::metadata(&raw_stdout) {
            use std::os::unix::fs::MetadataExt as _;
            written = written.max(meta.len());
            peak_disk = peak_disk.max(meta.blocks() * 512);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "flood: {written} bytes written, peak {peak_disk} on disk, agent RSS {peak_agent} MiB, scheduler RSS {peak_scheduler} MiB"
    );
    ensure!(
        written > 20 * LOG_CAP_BYTES,
        "the run wrote only {written} bytes"
    );
    ensure!(
        peak_disk < 256 * MIB,
        "{peak_disk} bytes of raw output on disk for {written} written"
    );
    ensure!(peak_agent < 200, "agent RSS reached {peak_agent} MiB");
    ensure!(
        peak_scheduler < 300,
        "scheduler RSS reached {peak_scheduler} MiB"
    );

    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["exit_code"] == 124,
        "the run kept running until its timeout: {r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    let (marker, kept) = logs.split_last().context("no log lines")?;
    let expected =
        format!("[berth] log limit of {LOG_CAP_BYTES} bytes reached; further output dropped");
    ensure!(
        marker["stream"] == "stderr" && marker["msg"] == expected.as_str(),
        "the last line is the marker: {marker}"
    );
    ensure!(
        msgs(&logs, "stderr") == ["first", expected.as_str()],
        "one marker, last on stderr: {:?}",
        msgs(&logs, "stderr")
    );
    let bytes: u64 = kept
        .iter()
        .map(|l| l["msg"].as_str().map_or(0, |m| m.len() as u64 + 1))
        .sum();
    ensure!(
        bytes <= LOG_CAP_BYTES && bytes > LOG_CAP_BYTES - 2 * 101,
        "{bytes} bytes of lines kept for a cap of {LOG_CAP_BYTES}"
    );
    ensure!(
        kept.iter().skip(1).all(|l| l["msg"] == line.as_str()),
        "every kept stdout line is whole"
    );

    f.wait_no_containers(&node).await?;
    let run_dir = raw_stdout
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    wait_until(
        "the run's state dir is removed",
        Duration::from_secs(10),
        || !run_dir.exists(),
    )
    .await?;
    echo_succeeds(&f, "fra", "after-the-flood").await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_the_agent_its_run_finishes_and_it_exits_0() -> Result<()> {
    agent_env();
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "sleep 3; echo done"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let agent = agent_pid(&node)?;
    let signalled = Instant::now();
    f.signal_agent(&node, "TERM")?;

    // A run created while the agent drains is not started there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late_runner = f
        .runner("fra", json!({"run_command": "echo too-late"}))
        .await?;
    let late = f.start_run(&late_runner, json!({})).await?;

    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["exit_code"] == 0,
        "{r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["done"], "{logs:?}");

    wait_until("the agent exits", Duration::from_secs(15), || {
        proc_state(agent).is_none_or(|(state, _)| state == 'Z' || state == 'X')
    })
    .await?;
    let exited_after = signalled.elapsed();
    ensure!(
        exited_after < Duration::from_secs(30),
        "exited {exited_after:?} after SIGTERM, beyond the grace"
    );
    if let Some((_, status)) = proc_state(agent) {
        ensure!(status == 0, "the agent exited with wait status {status}");
    }
    let late_run = f.run(&late_runner, &late).await?;
    ensure!(
        late_run["status"] == "pending"
            || (late_run["status"] == "failed" && late_run["error_code"] == "node_draining"),
        "a run assigned while draining never starts there: {late_run}"
    );
    f.wait_no_containers(&node).await?;
    Ok(())
}

/// The instance type's CPU share becomes the run's CFS quota: standard-xs has 500 millicores,
/// so 50 ms of CPU time per 100 ms period; a run that spins is throttled at it.
#[tokio::test]
async fn a_run_gets_its_instance_types_cpu_quota_and_is_throttled_at_it() -> Result<()> {
    agent_env();
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    // Spins for 4 s of wall time (a single process wants a whole core), then says so.
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": "end=$(( $(date +%s) + 4 )); while [ $(date +%s) -lt $end ]; do :; done; echo spun",
                "instance_type": "standard-xs",
                "timeout_seconds": 60,
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let cpu = f.cgroup_dir("cpu", &node, &run);
    ensure!(read_trimmed(&cpu.join("cpu.cfs_period_us"))? == "100000");
    ensure!(
        read_trimmed(&cpu.join("cpu.cfs_quota_us"))? == "50000",
        "500 millicores = 50 ms per 100 ms period"
    );
    // Watch the cgroup's own count of periods in which it hit the quota while the run spins.
    let mut throttled = 0u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while throttled == 0 && Instant::now() < deadline {
        let Ok(stat) = std::fs::read_to_string(cpu.join("cpu.stat")) else {
            break; // the run ended and its cgroup is gone
        };
        throttled = stat
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        throttled > 0,
        "a spinning run on half a core is throttled at its quota"
    );
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["spun"], "{logs:?}");
    Ok(())
}
