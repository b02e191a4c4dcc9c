//! Ready sandboxes (issue #13, item 3) on the real containerd: a warmup with `sandboxes` makes
//! its node keep containers created ahead for the runner's runs; a run with no overrides starts
//! in one (its timeline says so) and behaves like any run — output, env, exit code, stop,
//! timeout, cleanup, re-adoption after the agent is killed — and a sandbox serves one run only,
//! never a run of another runner or with an override, never after its runner changed.

mod common;

use anyhow::{ensure, Context, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const PREFIX: &str = "sbx-";

async fn sandboxes(f: &Fleet, node: &str) -> Result<BTreeSet<String>> {
    Ok(f.containers(node)
        .await?
        .into_iter()
        .filter(|c| c.starts_with(PREFIX))
        .collect())
}

/// Waits until the node holds exactly `count` sandboxes, none of them in `gone`.
async fn wait_sandboxes(
    f: &Fleet,
    node: &str,
    count: usize,
    gone: &BTreeSet<String>,
) -> Result<BTreeSet<String>> {
    wait_sandboxes_until(f, node, |now| now.len() == count && now.is_disjoint(gone)).await
}

async fn wait_sandboxes_until(
    f: &Fleet,
    node: &str,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = sandboxes(f, node).await?;
        // A container exists before its task: a sandbox is ready once the agent says so.
        let log = f.log_of(&format!("agent-{node}"));
        let ready = now
            .iter()
            .all(|id| log.contains(&format!("sandbox ready sandbox={id}")));
        if ready && done(&now) {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "{node} holds sandboxes {now:?}, not what the test waits for\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn warm_up(f: &Fleet, runner: &str, sandboxes: u32) -> Result<Value> {
    let r = f
        .post(
            &format!("/v1/runners/{runner}/warmup"),
            json!({ "sandboxes": sandboxes }),
        )
        .await?;
    ensure!(r["runner"]["warm_sandboxes"] == sandboxes, "{r}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = f.get(&format!("/v1/runners/{runner}")).await?["runner"].clone();
        if r["warmup_status"] == "ready" {
            return Ok(r);
        }
        ensure!(
            r["warmup_status"] == "pending" && Instant::now() < deadline,
            "warmup: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn in_sandbox(run: &Value) -> bool {
    run["timeline"]["sandbox"] == true
}

#[tokio::test]
async fn runs_of_a_warmed_runner_start_in_ready_sandboxes_used_once_each() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec {
        memory_mib: 8192,
        max_runs: 8,
        ..AgentSpec::new("fra")
    }])
    .await?;
    let node = f.node("fra").to_owned();
    let spec = json!({
        "run_command": "echo \"from $GREETING\"; echo to-stderr >&2; exit 7",
        "env_variables": [{"env_key": "GREETING", "env_val": "the sandbox"}],
    });
    let runner = f.runner("fra", spec.clone()).await?;
    let free_before = f.node_view(&node).await?.context("node")?["free_memory_mib"]
        .as_u64()
        .context("free memory")?;
    // Bad requests name the field.
    for (body, want) in [
        (json!({"sandboxes": 17}), 422),
        (json!({"sandboxes": -1}), 400),
        (json!({"sandboxes": "two"}), 400),
        (json!({"sandbox": 1}), 400),
    ] {
        let (status, answer) = f
            .request(
                reqwest::Method::POST,
                &format!("/v1/runners/{runner}/warmup"),
                Some(body.clone()),
            )
            .await?;
        ensure!(status == want, "{body} → {status} {answer}");
        ensure!(answer.to_string().contains("sandbox"), "{body} → {answer}");
    }
    let warm = warm_up(&f, &runner, 1).await?;
    ensure!(warm["warm_node_id"] == node.as_str(), "{warm}");
    let first = wait_sandboxes(&f, &node, 1, &BTreeSet::new()).await?;
    // The sandbox holds the run's memory on its node.
    let free_after = f.node_view(&node).await?.context("node")?["free_memory_mib"]
        .as_u64()
        .context("free memory")?;
    ensure!(
        free_before - free_after == 1024,
        "free memory {free_before} → {free_after} MiB"
    );

    // A run with no overrides starts in it and is an ordinary run.
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "failed" && r["exit_code"] == 7, "{r}");
    ensure!(
        in_sandbox(&r),
        "the run did not take the sandbox: {r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["from the sandbox"], "{logs:?}");
    ensure!(msgs(&logs, "stderr") == ["to-stderr"], "{logs:?}");
    f.assert_run_cleaned(&node, &run).await?;
    let used = first.iter().next().context("sandbox")?.clone();
    f.assert_run_cleaned(&node, &used).await?;
    // A fresh one replaces it; the used one never comes back.
    let second = wait_sandboxes(&f, &node, 1, &first).await?;

    // An override, or another runner with the same command: a container of their own.
    let overridden = f.start_run(&runner, json!({"command": "echo own"})).await?;
    let r = f.wait_finished(&runner, &overridden).await?;
    ensure!(r["status"] == "succeeded" && !in_sandbox(&r), "{r}");
    let twin = f.runner("fra", spec).await?;
    let other = f.start_run(&twin, json!({})).await?;
    let r = f.wait_finished(&twin, &other).await?;
    ensure!(r["exit_code"] == 7 && !in_sandbox(&r), "{r}");
    ensure!(
        sandboxes(&f, &node).await? == second,
        "a run that did not fit took or changed the sandbox"
    );

    // A changed runner: its sandbox is replaced, and the next run sees the change.
    let (status, patched) = f
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/runners/{runner}"),
            Some(json!({
                "env_variables": [{"env_key": "GREETING", "env_val": "the new spec"}],
            })),
        )
        .await?;
    ensure!(status == 200, "{status} {patched}");
    let third = wait_sandboxes(&f, &node, 1, &second).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(in_sandbox(&r), "{r}");
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["from the new spec"], "{logs:?}");
    let fourth = wait_sandboxes(&f, &node, 1, &third).await?;

    // Stop and timeout reach the process in a sandbox.
    let sleeper = f
        .runner(
            "fra",
            json!({"run_command": "sleep 300", "timeout_seconds": 2}),
        )
        .await?;
    warm_up(&f, &sleeper, 1).await?;
    let with_sleeper = wait_sandboxes(&f, &node, 2, &BTreeSet::new()).await?;
    let run = f.start_run(&sleeper, json!({})).await?;
    let r = f.wait_finished(&sleeper, &run).await?;
    ensure!(r["exit_code"] == 124 && in_sandbox(&r), "{r}");
    f.assert_run_cleaned(&node, &run).await?;
    let used: BTreeSet<String> = with_sleeper.difference(&fourth).cloned().collect();
    let refilled = wait_sandboxes(&f, &node, 2, &used).await?;
    let (status, patched) = f
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/runners/{sleeper}"),
            Some(json!({"timeout_seconds": 600})),
        )
        .await?;
    ensure!(status == 200, "{status} {patched}");
    let stale: BTreeSet<String> = refilled.difference(&fourth).cloned().collect();
    wait_sandboxes(&f, &node, 2, &stale).await?;
    let run = f.start_run(&sleeper, json!({})).await?;
    f.wait_for(&sleeper, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    ensure!(
        in_sandbox(&f.run(&sleeper, &run).await?),
        "not in a sandbox"
    );

    // The agent is killed while that run runs in a sandbox: the new process re-adopts the run
    // in its sandbox's container, sweeps the unused sandboxes and makes fresh ones.
    // The run's container and a fresh sandbox for each runner.
    let before = wait_sandboxes(&f, &node, 3, &BTreeSet::new()).await?;
    f.restart_agent_with(&node, &[]).await?;
    let after = wait_sandboxes_until(&f, &node, |now| {
        now.len() == 3 && now.intersection(&before).count() == 1
    })
    .await?;
    let kept: BTreeSet<String> = before.intersection(&after).cloned().collect();
    ensure!(
        f.run(&sleeper, &run).await?["status"] == "running",
        "the re-adopted run"
    );
    f.post(&format!("/v1/runners/{sleeper}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&sleeper, &run).await?;
    ensure!(r["status"] == "canceled", "{r}");
    f.assert_run_cleaned(&node, &run).await?;
    f.assert_run_cleaned(&node, kept.iter().next().context("kept")?)
        .await?;

    // Runners deleted: their sandboxes go, and their memory comes back.
    for r in [&runner, &sleeper, &twin] {
        let (status, body) = f
            .request(reqwest::Method::DELETE, &format!("/v1/runners/{r}"), None)
            .await?;
        ensure!(status == 204, "{status} {body}");
    }
    f.wait_no_containers(&node).await?;
    let free = f.node_view(&node).await?.context("node")?["free_memory_mib"]
        .as_u64()
        .context("free memory")?;
    ensure!(
        free == free_before,
        "free memory {free} MiB, was {free_before}"
    );
    Ok(())
}

/// A graceful stop removes the ready sandboxes with everything else prepared ahead.
#[tokio::test]
async fn a_stopping_agent_removes_its_sandboxes() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"run_command": "echo hi"})).await?;
    // berthctl asks for them too.
    let out = tokio::process::Command::new(f.env.bin_dir.join("berthctl"))
        .args(["warmup", &runner, "--sandboxes", "2"])
        .env("BERTH_URL", &f.api_url)
        .env("BERTH_TOKEN", common::TOKEN)
        .current_dir(f.dir.path())
        .output()
        .await?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("keeping 2 ready sandbox(es)"),
        "berthctl warmup: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_sandboxes(&f, &node, 2, &BTreeSet::new()).await?;
    f.signal_agent(&node, "TERM")?;
    f.wait_agent_exit(&node, Duration::from_secs(30)).await?;
    ensure!(
        f.containers(&node).await?.is_empty(),
        "left after a graceful stop: {:?}",
        f.containers(&node).await?
    );
    Ok(())
}

/// A sandbox whose shim died cannot start: the run that takes it removes it and creates its own
/// container, and succeeds; a fresh sandbox replaces the dead one.
#[tokio::test]
async fn a_run_whose_sandbox_died_starts_in_a_container_of_its_own() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "echo survived"}))
        .await?;
    warm_up(&f, &runner, 1).await?;
    let ready = wait_sandboxes(&f, &node, 1, &BTreeSet::new()).await?;
    let sandbox = ready.iter().next().context("a sandbox")?.clone();
    let shim = common::pid_with_args(&["containerd-shim", "-id", &sandbox])
        .context("the sandbox's shim")?;
    let status = std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()?;
    ensure!(status.success(), "kill -KILL {shim}");
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && !in_sandbox(&r),
        "{r}\n{}",
        f.logs()
    );
    ensure!(
        f.log_of(&format!("agent-{node}"))
            .contains("the sandbox does not start"),
        "the run did not try the dead sandbox first"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["survived"], "{logs:?}");
    f.assert_run_cleaned(&node, &run).await?;
    f.assert_run_cleaned(&node, &sandbox).await?;
    wait_sandboxes(&f, &node, 1, &ready).await?;
    Ok(())
}

/// A lease (and snapshot) left without a container — the agent was killed between preparing a
/// sandbox's snapshot and creating its container, so no journal and no container names it — is
/// removed at the next start.
#[tokio::test]
async fn a_lease_left_without_a_container_is_swept_at_start() -> Result<()> {
    use containerd_client::services::v1::{
        leases_client::LeasesClient, CreateRequest, ListRequest,
    };
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let channel = containerd_client::connect(&f.env.containerd_socket).await?;
    let ns: tonic::metadata::MetadataValue<_> = format!("berth-{node}").parse()?;
    let leftover = format!("berth-run-{PREFIX}{}", std::process::id());
    let mut leases = LeasesClient::new(channel);
    let mut create = tonic::Request::new(CreateRequest {
        id: leftover.clone(),
        labels: Default::default(),
    });
    create
        .metadata_mut()
        .insert("containerd-namespace", ns.clone());
    leases.create(create).await?;
    f.restart_agent_with(&node, &[]).await?;
    let mut list = tonic::Request::new(ListRequest { filters: vec![] });
    list.metadata_mut().insert("containerd-namespace", ns);
    let left: Vec<String> = leases
        .list(list)
        .await?
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.id)
        .collect();
    ensure!(!left.contains(&leftover), "still there: {left:?}");
    Ok(())
}

/// The largest warmup a runner may ask for (16 sandboxes) on one node: all sixteen are made, a
/// burst of sixteen runs starts in sandboxes, each in its own, each used once; sixteen fresh
/// ones replace them; deleting the runner removes every one.
#[tokio::test]
async fn sixteen_sandboxes_serve_a_burst_of_sixteen_runs() -> Result<()> {
    const N: usize = 16;
    // standard-xs (512 MiB): sixteen sandboxes and one run beside them need 8.5 GiB.
    let f = Fleet::start(&[AgentSpec {
        memory_mib: 9216,
        max_runs: 32,
        ..AgentSpec::new("fra")
    }])
    .await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo in $(hostname)"}),
        )
        .await?;
    warm_up(&f, &runner, N as u32).await?;
    let first = wait_sandboxes(&f, &node, N, &BTreeSet::new()).await?;
    let mut runs = Vec::new();
    for _ in 0..N {
        runs.push(f.start_run(&runner, json!({})).await?);
    }
    let mut hosts = BTreeSet::new();
    for run in &runs {
        let r = f.wait_finished(&runner, run).await?;
        ensure!(
            r["status"] == "succeeded" && in_sandbox(&r),
            "{r}\n{}",
            f.logs()
        );
        let logs = f.all_logs(&runner, run).await?;
        let out = msgs(&logs, "stdout");
        ensure!(out.len() == 1, "{run}: {out:?}");
        hosts.insert(out[0].clone());
    }
    ensure!(
        hosts.len() == N,
        "sixteen runs, one sandbox each: {hosts:?}"
    );
    // Each run's hostname is its sandbox's id: sixteen distinct sandboxes, mostly the ones made
    // ahead (a refill 250 ms after a take may serve one of the later POSTs: also a sandbox).
    let used: BTreeSet<String> = hosts
        .iter()
        .map(|h| h.trim_start_matches("in ").to_owned())
        .collect();
    ensure!(
        used.iter().all(|id| id.starts_with(PREFIX)) && !used.is_disjoint(&first),
        "{used:?} against the first sandboxes {first:?}"
    );
    // Sixteen fresh ones replace them, none of them one a run used.
    wait_sandboxes(&f, &node, N, &used).await?;
    let (status, _) = f
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/runners/{runner}"),
            None,
        )
        .await?;
    ensure!(status == 204, "delete: {status}");
    f.wait_no_containers(&node).await?;
    Ok(())
}

/// An agent frozen past its lease (the node is declared lost) keeps its ready sandbox; once it
/// runs again the node comes back, a run that waited meanwhile starts in that sandbox, and
/// nothing is left behind.
#[tokio::test]
async fn a_frozen_agent_serves_from_its_sandbox_once_it_is_back() -> Result<()> {
    let mut f = Fleet::start_with(
        &[AgentSpec::new("fra")],
        &["--node-ttl-seconds", "1", "--lost-grace-seconds", "1"],
    )
    .await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner("fra", json!({"run_command": "echo thawed"}))
        .await?;
    warm_up(&f, &runner, 1).await?;
    let ready = wait_sandboxes(&f, &node, 1, &BTreeSet::new()).await?;

    f.signal_agent(&node, "STOP")?;
    f.wait_node_status(&node, "lost", Duration::from_secs(20))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.run(&runner, &run).await?;
    ensure!(r["status"] == "pending", "no node to run on: {r}");
    f.signal_agent(&node, "CONT")?;

    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["node_id"] == node.as_str(),
        "{r}\n{}",
        f.logs()
    );
    ensure!(
        in_sandbox(&r),
        "the run did not use the sandbox kept through the freeze: {r}\n{}",
        f.logs()
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["thawed"], "{logs:?}");
    f.assert_run_cleaned(&node, &run).await?;
    let again = wait_sandboxes(&f, &node, 1, &ready).await?;
    let left: BTreeSet<String> = f.containers(&node).await?.into_iter().collect();
    ensure!(left == again, "only the new sandbox is left: {left:?}");
    Ok(())
}
