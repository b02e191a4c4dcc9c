//! Sandboxed runs (issue #16) against real containerd, runc and gVisor's runsc: what the
//! sandbox changes for a run beside a container run on the same node, and where no node has
//! gVisor. (The whole run-path suite also runs sandboxed: deploy/test.sh runs it again with
//! `BERTH_TEST_ISOLATION=sandbox`.)

mod common;

use anyhow::{ensure, Context, Result};
use common::{msgs, pid_with_args, AgentSpec, Fleet, FleetOptions};
use serde_json::{json, Value};
use std::time::Duration;

/// Starts a run of `runner`, waits for its end, returns it and its stdout.
async fn finished(f: &Fleet, runner: &str) -> Result<(Value, Vec<String>)> {
    let run = f.start_run(runner, json!({})).await?;
    let r = f.wait_finished(runner, &run).await?;
    let logs = f.all_logs(runner, &run).await?;
    Ok((r, msgs(&logs, "stdout")))
}

fn value(out: &[String], key: &str) -> Result<String> {
    out.iter()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("no {key} in {out:?}"))
}

/// The same script in a container run and a sandboxed run on one node: the sandboxed one sees
/// gVisor's kernel and /proc, not the host's; the kernel's log and a syscall our seccomp
/// profile refuses are refused in both.
#[tokio::test]
async fn the_sandbox_gives_a_run_its_own_kernel() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let nodes = f.get("/v1/nodes").await?;
    ensure!(
        nodes["nodes"][0]["runtimes"] == json!(["runc", "runsc"]),
        "the node found gVisor: {nodes}"
    );
    let script = "echo kernel=$(uname -r); echo version=$(cat /proc/version); \
                  dmesg >/tmp/d 2>&1; echo dmesg=$? $(head -c 300 /tmp/d | tr '\\n' ' '); \
                  unshare -U true 2>/tmp/e; echo unshare-user=$? $(cat /tmp/e); \
                  echo tasks=$(ls /proc | grep -cE '^[0-9]+$')";
    let container = f
        .runner(
            "fra",
            json!({"run_command": script, "isolation": "container"}),
        )
        .await?;
    let sandbox = f
        .runner(
            "fra",
            json!({"run_command": script, "isolation": "sandbox"}),
        )
        .await?;
    let (rc, out_c) = finished(&f, &container).await?;
    let (rs, out_s) = finished(&f, &sandbox).await?;
    for (r, isolation, runtime) in [(&rc, "container", "runc "), (&rs, "sandbox", "runsc ")] {
        ensure!(
            r["status"] == "succeeded"
                && r["isolation"] == isolation
                && r["runtime"]
                    .as_str()
                    .is_some_and(|v| v.starts_with(runtime)),
            "{r}\n{}",
            f.logs()
        );
    }
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    ensure!(
        value(&out_c, "kernel")? == host_kernel,
        "a container shares the host's kernel: {out_c:?}"
    );
    let sandbox_kernel = value(&out_s, "kernel")?;
    ensure!(
        sandbox_kernel != host_kernel,
        "the sandbox answers for itself, not the host's {host_kernel}: {out_s:?}"
    );
    let host_version = std::fs::read_to_string("/proc/version")?.trim().to_owned();
    ensure!(
        value(&out_c, "version")? == host_version,
        "a container reads the host's /proc/version: {out_c:?}"
    );
    ensure!(
        value(&out_s, "version")? != host_version,
        "the sandbox's /proc is gVisor's: {out_s:?}"
    );
    // The kernel's log is refused to both (no CAP_SYSLOG; the profile refuses `syslog`).
    for (out, what) in [(&out_c, "container"), (&out_s, "sandbox")] {
        let v = value(out, "dmesg")?;
        ensure!(
            !v.starts_with('0') && v.contains("not permitted"),
            "{what}: dmesg refused: {v}"
        );
    }
    // The seccomp profile refuses a user namespace in both.
    for (out, what) in [(&out_c, "container"), (&out_s, "sandbox")] {
        let v = value(out, "unshare-user")?;
        ensure!(
            !v.starts_with('0') && v.contains("not permitted"),
            "{what}: unshare -U refused: {v}"
        );
    }
    Ok(())
}

/// A sandboxed run's processes live in gVisor's kernel: the host has no process of the run's
/// command, and the run sees none of the host's.
#[tokio::test]
async fn a_sandboxed_runs_processes_are_not_host_processes() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let marker = 4000 + std::process::id() % 1000;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": format!("echo tasks=$(ls /proc | grep -cE '^[0-9]+$'); exec sleep {marker}"),
                   "isolation": "sandbox", "timeout_seconds": 60}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let tasks = loop {
        let out = msgs(&f.all_logs(&runner, &run).await?, "stdout");
        if let Ok(v) = value(&out, "tasks") {
            break v;
        }
        ensure!(std::time::Instant::now() < deadline, "no output: {out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tasks: u32 = tasks.parse()?;
    ensure!(
        tasks <= 5,
        "the run sees only its own few tasks, not the host's: {tasks}"
    );
    ensure!(
        pid_with_args(&["sleep", &marker.to_string()]).is_none(),
        "the run's sleep is gVisor's task, not a host process"
    );
    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "canceled", "{r}");
    f.wait_no_containers(f.node("fra")).await?;
    Ok(())
}

/// Nodes without gVisor: a sandboxed run waits and says why, a container run of the same
/// runner's region runs meanwhile.
#[tokio::test]
async fn a_sandboxed_run_waits_where_no_node_has_gvisor() -> Result<()> {
    let f = Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            env: vec![("BERTH_AGENT_SANDBOX_RUNTIME".into(), "off".into())],
            ..FleetOptions::default()
        },
    )
    .await?;
    let nodes = f.get("/v1/nodes").await?;
    ensure!(nodes["nodes"][0]["runtimes"] == json!(["runc"]), "{nodes}");
    let sandbox = f
        .runner(
            "fra",
            json!({"run_command": "echo hi", "isolation": "sandbox"}),
        )
        .await?;
    let waiting = f.start_run(&sandbox, json!({})).await?;
    let plain = f
        .runner(
            "fra",
            json!({"run_command": "echo hi", "isolation": "container"}),
        )
        .await?;
    let (r, out) = finished(&f, &plain).await?;
    ensure!(r["status"] == "succeeded" && out == ["hi"], "{r} {out:?}");
    let w = f.run(&sandbox, &waiting).await?;
    ensure!(
        w["status"] == "pending"
            && w["pending_reason"]
                == "no node in fra can run sandboxed runs: none of its 1 has gVisor (runsc)",
        "{w}"
    );
    Ok(())
}
