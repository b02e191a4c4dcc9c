//! End-to-end: files uploaded with a run (issue 4, item 5) against real containerd and runc.
//! They appear read-only at their paths with their modes and exact content, the API never
//! returns their content, and the node's copy goes with the run. (Bad input refused naming the
//! field: the in-process `api/tests/contract/files.rs`.)

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{b64, msgs, AgentSpec, Fleet};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

/// Waits until the run has printed `line` on stdout.
async fn wait_line(f: &Fleet, runner: &str, run: &str, line: &str) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = f.all_logs(runner, run).await?;
        if msgs(&logs, "stdout").iter().any(|m| m == line) {
            return Ok(logs);
        }
        if Instant::now() > deadline {
            bail!("run {run} never printed {line:?}: {logs:?}\n{}", f.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CONFIG: &str = r#"{"database": "postgres://db:5432/app", "workers": 4}"#;
const SCRIPT: &str = "#!/bin/sh\necho \"script ran with $1 as uid $(id -u)\"\n";

#[tokio::test]
async fn uploaded_files_are_read_only_with_their_mode_and_content_and_go_with_the_run() -> Result<()>
{
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"run_command": "true"})).await?;
    // Bytes that are not text, to compare digests inside and out.
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let command = [
        // Reversed: the run's own output is stored as its logs, which are not sealed; the scan
        // of the store below is about what Berth keeps of the upload itself.
        "rev /etc/berth/config.json | tr -d '\\n'; echo",
        "/work/a/b/script.sh first-arg",
        "stat -c 'mode %n %a' /etc/berth/config.json /work/a/b/script.sh /data/blob",
        "sha256sum /data/blob",
        "echo overwrite > /etc/berth/config.json || echo write-refused",
        "rm /work/a/b/script.sh || echo rm-refused",
        "echo checks-done",
        "sleep 1000 & wait",
    ]
    .join("; ");
    let run = f
        .start_run(
            &runner,
            json!({
                "command": command,
                "files": [
                    {"path": "/etc/berth/config.json", "content_base64": b64(CONFIG.as_bytes())},
                    {"path": "/work/a/b/script.sh", "content_base64": b64(SCRIPT.as_bytes()), "mode": 0o755},
                    {"path": "/data/blob", "content_base64": b64(&blob), "mode": 0o640},
                ],
            }),
        )
        .await?;
    let logs = wait_line(&f, &runner, &run, "checks-done").await?;
    let out = msgs(&logs, "stdout");
    let err = msgs(&logs, "stderr");
    let reversed: String = CONFIG.chars().rev().collect();
    ensure!(out[0] == reversed, "exact content (reversed): {out:?}");
    ensure!(out[1] == "script ran with first-arg as uid 0", "{out:?}");
    ensure!(
        out[2..5]
            == [
                "mode /etc/berth/config.json 444",
                "mode /work/a/b/script.sh 755",
                "mode /data/blob 640"
            ],
        "modes as requested (0o444 by default): {out:?}"
    );
    let inside_sha = out[5].split_whitespace().next().unwrap_or_default();
    ensure!(out.contains(&"write-refused".to_owned()), "{out:?}");
    ensure!(out.contains(&"rm-refused".to_owned()), "{out:?}");
    ensure!(
        err.iter()
            .any(|l| l.contains("/etc/berth/config.json") && l.contains("Read-only file system")),
        "even root gets EROFS: {err:?}"
    );

    // The API shows path, mode, size and digest — never the content.
    let r = f.run(&runner, &run).await?;
    let files = r["files"].as_array().context("files")?;
    ensure!(files.len() == 3, "{r}");
    ensure!(
        files[0]
            == json!({
                "path": "/etc/berth/config.json", "mode": 0o444, "size_bytes": CONFIG.len(),
                "sha256": files[0]["sha256"],
            }),
        "{r}"
    );
    ensure!(
        files[2]["size_bytes"] == blob.len() && files[2]["sha256"] == inside_sha,
        "{r}"
    );
    let listed = f
        .get(&format!("/v1/runners/{runner}/runs"))
        .await?
        .to_string();
    for text in [r.to_string(), listed] {
        ensure!(!text.contains("content_base64") && !text.contains(&b64(CONFIG.as_bytes())));
        ensure!(!text.contains("postgres://"), "{text}");
    }

    // The node's copy: private directory, one file per upload with its mode, while it runs.
    let host = f.run_state_dir(&node, &run).join("files");
    ensure!(std::fs::metadata(&host)?.mode() & 0o777 == 0o700);
    ensure!(std::fs::read(host.join("0"))? == CONFIG.as_bytes());
    ensure!(std::fs::metadata(host.join("1"))?.mode() & 0o777 == 0o755);
    ensure!(std::fs::read(host.join("2"))? == blob);
    let journal = std::fs::read_to_string(f.run_state_dir(&node, &run).join("run.json"))?;
    ensure!(!journal.contains(&b64(CONFIG.as_bytes())[..40]));

    // While it runs, the cleanup check sees every piece of it (so it is not vacuous).
    let live = f.run_leftovers(&node, &run).await?;
    for piece in [
        "task",
        "container",
        "snapshot",
        "lease",
        "shim bundle",
        "cgroup",
        "agent state",
    ] {
        ensure!(
            live.iter().any(|l| l.starts_with(piece)),
            "{piece} not seen while running: {live:?}"
        );
    }

    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "canceled", "{r}");
    // The exit is reported first and the node cleans up right after: the copy goes with the
    // rest (assert_run_cleaned waits for that), and the files directory is part of it.
    f.assert_run_cleaned(&node, &run).await?;
    ensure!(
        !host.exists(),
        "uploaded files left on the node after the run"
    );

    // Sealed at rest: neither the content nor its base64 is in the store file; nor in any log.
    let store = std::fs::read(f.dir.path().join("scheduler/state.redb")).context("store")?;
    let b64_config = b64(CONFIG.as_bytes());
    for needle in [CONFIG, &b64_config[..40], &b64(SCRIPT.as_bytes())[..20]] {
        ensure!(
            !store.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "file content in clear in the store: {needle}"
        );
        ensure!(!f.logs().contains(needle), "file content in a process log");
    }
    Ok(())
}

#[tokio::test]
async fn a_re_adopted_run_keeps_its_files_until_its_end_and_leftovers_go_at_agent_start(
) -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    // On SIGTERM it reads its file once more: after the agent's restart, the mount still works.
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "trap 'cat /etc/berth/config.json; echo; exit 0' TERM; echo ready; sleep 1000 & wait"}),
        )
        .await?;
    let run = f
        .start_run(
            &runner,
            json!({"files": [{"path": "/etc/berth/config.json", "content_base64": b64(CONFIG.as_bytes())}]}),
        )
        .await?;
    wait_line(&f, &runner, &run, "ready").await?;
    let host = f.run_state_dir(&node, &run).join("files");
    ensure!(host.join("0").is_file());
    // Something an agent died while creating: a run directory without a journal.
    let orphan = f.agent_state_dir(&node).join("runs/orphan-run");
    std::fs::create_dir_all(orphan.join("files"))?;
    std::fs::write(orphan.join("files/0"), "left over")?;

    f.signal_agent(&node, "KILL")?;
    f.restart_agent(&node)?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.wait_node_status(&node, "ready", Duration::from_secs(15))
        .await?;
    ensure!(!orphan.exists(), "leftovers are removed at start");
    ensure!(
        std::fs::read(host.join("0"))? == CONFIG.as_bytes(),
        "the re-adopted run keeps its files"
    );

    f.post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "canceled" && r["exit_code"] == 0, "{r}");
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == ["ready", CONFIG], "{logs:?}");
    // Cleaned up right after the exit is reported (assert_run_cleaned waits for it).
    f.assert_run_cleaned(&node, &run).await?;
    ensure!(
        !host.exists(),
        "uploaded files left after the re-adopted run ended"
    );
    Ok(())
}
