//! End-to-end: secret environment variables reach the container but never the API, the logs or
//! the store file in clear.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet};
use reqwest::Method;
use serde_json::json;

const SECRET: &str = "s3cr3t-Token-8812";

#[tokio::test]
async fn secrets_reach_the_container_and_nowhere_else() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner("fra", json!({
            "run_command": "echo token=$API_TOKEN; [ \"$API_TOKEN\" = \"$EXPECTED\" ] && echo value-matches; echo plain=$PLAIN",
            "env_variables": [
                {"env_key": "API_TOKEN", "env_val": SECRET, "secret": true},
                {"env_key": "EXPECTED", "env_val": SECRET, "secret": true},
                {"env_key": "PLAIN", "env_val": "visible"},
            ],
        }))
        .await?;
    let shown = f.get(&format!("/v1/runners/{runner}")).await?;
    ensure!(
        !shown.to_string().contains(SECRET),
        "the API never returns a secret: {shown}"
    );
    ensure!(
        shown["runner"]["env_variables"][0]
            == json!({"env_key": "API_TOKEN", "env_val": null, "secret": true}),
        "{shown}"
    );
    ensure!(
        shown["runner"]["env_variables"][2] == json!({"env_key": "PLAIN", "env_val": "visible"}),
        "{shown}"
    );

    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let lines: Vec<String> = f
        .all_logs(&runner, &run)
        .await?
        .iter()
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        lines == ["token=[redacted]", "value-matches", "plain=visible"],
        "{lines:?}"
    );

    // A PATCH that sends the variables back as the API shows them keeps the secret values.
    let vars = shown["runner"]["env_variables"].clone();
    let (status, patched) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{runner}"),
            Some(json!({"env_variables": vars, "timeout_seconds": 30})),
        )
        .await?;
    ensure!(status == 200, "{status} {patched}");
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_finished(&runner, &run).await?;
    let lines: Vec<String> = f
        .all_logs(&runner, &run)
        .await?
        .iter()
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        lines.contains(&"value-matches".to_owned()),
        "the secret survived the PATCH: {lines:?}"
    );

    let store = std::fs::read(f.dir.path().join("scheduler/state.redb")).context("store")?;
    ensure!(
        !store.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "secret in clear in the store"
    );
    ensure!(!f.logs().contains(SECRET), "secret in a process log");
    Ok(())
}

/// Every file and directory the scheduler and the agent write — the store, the agent's
/// journals, a run's output while it runs — is private to the service (no group or other
/// permission bits): before, they were 0644 in 0755 directories and any local user could read
/// a run's secret output during the run (issue #12, item 3).
#[tokio::test]
async fn files_the_services_write_are_private_to_them() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": "echo token=$API_TOKEN; echo started; sleep 1000",
                "env_variables": [{"env_key": "API_TOKEN", "env_val": SECRET, "secret": true}],
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    // While the run runs: its journal and output exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let logs = f.all_logs(&runner, &run).await?;
        if logs.iter().any(|l| l["msg"] == "started") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the run never printed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let agent_dir = f.dir.path().join(format!("agent-{}", f.node("fra")));
    let mut seen = 0;
    let mut open = Vec::new();
    let mut stack = vec![agent_dir.clone(), f.scheduler_data_dir()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).with_context(|| path.display().to_string())?;
        if meta.file_type().is_symlink() {
            continue;
        }
        seen += 1;
        if meta.permissions().mode() & 0o077 != 0 {
            open.push(format!(
                "{} {:o}",
                path.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    ensure!(seen > 5, "walked too little: {seen} entries");
    ensure!(open.is_empty(), "readable by others: {open:#?}");
    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    Ok(())
}

/// What a run's secrets and the fleet's tokens leave behind (issue #12, item 3): while a run
/// with a secret runs, no file the scheduler or the agent keeps as state holds it (the agent's
/// `run.json` seals the environment; only the run's own output files hold what it printed, 0600),
/// no process's command line holds a token or credential, and a secret that a long line's 64 KiB
/// cut would have split is still redacted.
#[tokio::test]
async fn no_secret_or_token_on_disk_or_on_a_command_line_and_none_split_by_a_cut() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    // 65,531 bytes, then the secret across the 65,536-byte cut, then more: one line.
    let runner = f
        .runner(
            "fra",
            json!({
                "run_command": "head -c 65531 /dev/zero | tr '\\0' x; printf '%s' \"$API_TOKEN\"; echo yyyy; echo started; sleep 1000",
                "env_variables": [{"env_key": "API_TOKEN", "env_val": SECRET, "secret": true}],
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let logs = loop {
        let logs = f.all_logs(&runner, &run).await?;
        if logs.iter().any(|l| l["msg"] == "started") {
            break logs;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the run never printed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let texts: Vec<&str> = logs.iter().filter_map(|l| l["msg"].as_str()).collect();
    let joined = texts.concat();
    ensure!(
        !joined.contains(SECRET),
        "the secret is in the stored lines"
    );
    ensure!(joined.contains("[redacted]yyyy"), "not redacted whole");
    for t in &texts {
        for k in 4..SECRET.len() {
            ensure!(
                !t.ends_with(&SECRET[..k]) && !t.starts_with(&SECRET[k..]),
                "a piece holds part of the secret: …{}",
                &t[t.len().saturating_sub(40)..]
            );
        }
    }

    // State files: neither the secret nor a token in clear, and the journal's spec (base64
    // protobuf) without it either.
    let tokens: Vec<String> = [common::TOKEN, common::CLUSTER_TOKEN]
        .iter()
        .map(|t| t.to_string())
        .chain(
            std::fs::read_dir(f.dir.path())?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".token"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|t| t.trim().to_owned()),
        )
        .collect();
    ensure!(tokens.len() >= 3, "no registration token found: {tokens:?}");
    let agent_dir = f.dir.path().join(format!("agent-{}", f.node("fra")));
    let credential = std::fs::read_to_string(agent_dir.join("node.credential"))?
        .trim()
        .to_owned();
    let mut stack = vec![agent_dir.clone(), f.scheduler_data_dir()];
    let mut journals = 0;
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
            continue;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        // The run's own output, as it printed it, and the line log numbering it.
        if matches!(name.as_deref(), Some("stdout" | "stderr" | "lines")) {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        ensure!(!has(SECRET), "the secret in clear in {}", path.display());
        for t in &tokens {
            ensure!(!has(t), "a token in clear in {}", path.display());
        }
        if name.as_deref() == Some("run.json") {
            journals += 1;
            let file: serde_json::Value = serde_json::from_slice(&bytes)?;
            use base64::Engine as _;
            let spec = base64::engine::general_purpose::STANDARD
                .decode(file["spec"].as_str().context("spec")?)?;
            ensure!(
                !spec.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "the secret is in the journal's spec"
            );
        }
    }
    ensure!(journals == 1, "{journals} run journals seen");

    // Command lines are readable by every local user.
    let mut looked = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        looked += 1;
        let text = String::from_utf8_lossy(&cmdline);
        for t in tokens.iter().chain([&credential, &SECRET.to_owned()]) {
            ensure!(
                !text.contains(t.as_str()),
                "a secret on a command line: {}",
                text.replace('\0', " ")
            );
        }
    }
    ensure!(looked > 5, "read {looked} command lines");
    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    Ok(())
}
