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
