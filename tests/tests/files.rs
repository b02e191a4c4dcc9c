//! End-to-end: files uploaded with a run (issue 4, item 5) against real containerd and runc.
//! They appear read-only at their paths with their modes and exact content, the API never
//! returns their content, bad input is refused naming the field, and the node's copy goes with
//! the run.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{msgs, AgentSpec, Fleet};
use reqwest::Method;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

/// Standard base64 with padding (what the API takes), written here so the test depends on no
/// encoder of the code under test.
fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(ABC[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

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
        "cat /etc/berth/config.json; echo",
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
    ensure!(out[0] == CONFIG, "exact content: {out:?}");
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
    // Cleanup comes before the exit report, so the copy is gone by the time the run has ended.
    ensure!(
        !host.exists(),
        "uploaded files left on the node after the run"
    );
    f.assert_run_cleaned(&node, &run).await?;

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

/// POSTs a run and returns (status, the fields its errors name).
async fn refused(f: &Fleet, runner: &str, body: Value) -> Result<(u16, Vec<String>)> {
    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/runs"),
            Some(body),
        )
        .await?;
    let fields = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str().map(str::to_owned))
        .collect();
    Ok((status, fields))
}

#[tokio::test]
async fn bad_files_are_refused_naming_the_field() -> Result<()> {
    // No node: accepted runs stay pending, which is all this test needs.
    let f = Fleet::start(&[]).await?;
    let runner = f.runner("fra", json!({"run_command": "true"})).await?;
    let ok = b64(b"x");
    let file = |path: &str| json!({"path": path, "content_base64": ok});
    let one = |item: Value| json!({ "files": [item] });
    let path = "files[0].path".to_owned();
    for (body, status, field) in [
        (one(file("relative/x")), 422, path.clone()),
        (one(file("/")), 422, path.clone()),
        (one(file("/etc/")), 422, path.clone()),
        (one(file("/etc/../x")), 422, path.clone()),
        (one(file("/etc/./x")), 422, path.clone()),
        (one(file("/a//b")), 422, path.clone()),
        (one(file("/proc/x")), 422, path.clone()),
        (one(file("/sys/kernel/x")), 422, path.clone()),
        (one(file("/dev/x")), 422, path.clone()),
        (one(file("/a\u{0}b")), 422, path.clone()),
        (
            one(file(&format!("/{}", "a".repeat(4096)))),
            422,
            path.clone(),
        ),
        (
            json!({"files": [file("/x"), file("/x")]}),
            422,
            "files[1].path".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": "not base64!"})),
            422,
            "files[0].content_base64".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": "eA"})),
            422,
            "files[0].content_base64".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": 512})),
            422,
            "files[0].mode".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": -1})),
            422,
            "files[0].mode".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": "0755"})),
            400,
            "files[0].mode".to_owned(),
        ),
        (one(json!({"content_base64": ok})), 422, path.clone()),
        (
            one(json!({"path": "/x", "content": ok})),
            400,
            "files[0].content".to_owned(),
        ),
        (
            json!({"stop_grace_seconds": 0}),
            422,
            "stop_grace_seconds".to_owned(),
        ),
        (
            json!({"stop_grace_seconds": 301}),
            422,
            "stop_grace_seconds".to_owned(),
        ),
    ] {
        let got = refused(&f, &runner, body.clone()).await?;
        ensure!(
            got == (status, vec![field.clone()]),
            "{body}: expected {status} naming {field}, got {got:?}"
        );
    }

    // Count: 64 files pass, 65 do not.
    let many = |n: usize| {
        let files: Vec<Value> = (0..n).map(|i| file(&format!("/f/{i}"))).collect();
        json!({ "files": files })
    };
    ensure!(refused(&f, &runner, many(64)).await?.0 == 201);
    ensure!(refused(&f, &runner, many(65)).await? == (422, vec!["files".to_owned()]));
    // Size: exactly 1 MiB decoded passes (its JSON body is over 1.3 MB), one byte more does not.
    let sized = |a: usize, b: usize| {
        json!({"files": [
            {"path": "/a", "content_base64": b64(&vec![1u8; a])},
            {"path": "/b", "content_base64": b64(&vec![2u8; b])},
        ]})
    };
    let half = 512 * 1024;
    ensure!(refused(&f, &runner, sized(half, half)).await?.0 == 201);
    ensure!(refused(&f, &runner, sized(half, half + 1)).await? == (422, vec!["files".to_owned()]));
    // Grace boundaries: 1 and 300 pass.
    for g in [1, 300] {
        ensure!(
            refused(&f, &runner, json!({"stop_grace_seconds": g}))
                .await?
                .0
                == 201
        );
    }

    // A batch names the item.
    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/runs/batch"),
            Some(json!({"runs": [{}, {"files": [file("/ok"), file("/proc/1")]}]})),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "runs[1].files[1].path",
        "{status} {v}"
    );
    // The runner's own grace is checked too.
    let (status, v) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(json!({
                "name": "grace", "image_name": "busybox", "image_tag": "latest",
                "region": "fra", "instance_type": "standard-s", "stop_grace_seconds": 301,
            })),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "stop_grace_seconds",
        "{status} {v}"
    );
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
    ensure!(
        !host.exists(),
        "uploaded files left after the re-adopted run ended"
    );
    f.assert_run_cleaned(&node, &run).await?;
    Ok(())
}
