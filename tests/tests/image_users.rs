//! End-to-end: an image's `USER` applied as Docker applies it (issue #12, item 4), against real
//! containerd and runc, with images `deploy/format-images.py` builds: busybox plus a layer
//! holding its own `/etc/passwd` and `/etc/group` (users app 1000 and svc 1001; app also in
//! groups extra 2000 and more 2001).

mod common;

use anyhow::{ensure, Result};
use common::{b64, AgentSpec, Fleet};
use serde_json::{json, Value};

/// Runs `command` in `image_name` (with `run` merged into the run's body); returns the finished
/// run and its stdout lines.
async fn run_in(
    f: &Fleet,
    image_name: &str,
    command: &str,
    run: Value,
) -> Result<(Value, Vec<String>)> {
    let runner = f
        .runner(
            "fra",
            json!({"image_name": image_name, "run_command": command}),
        )
        .await?;
    let id = f.start_run(&runner, run).await?;
    let r = f.wait_finished(&runner, &id).await?;
    let logs = f.all_logs(&runner, &id).await?;
    let out = logs
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect();
    Ok((r, out))
}

/// `USER app`: its uid, its primary group, every group that lists it, and its home; a 0600
/// uploaded file is the user's own and readable. (Before: a named USER ran as root.)
#[tokio::test]
async fn a_named_user_runs_with_its_ids_supplementary_groups_and_home() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let secret = b64(b"only-for-app\n");
    let (r, out) = run_in(
        &f,
        "users/named",
        "id -u; id -g; id -G; echo HOME=$HOME; cat /run/secret; stat -c '%u:%g %a' /run/secret",
        json!({"files": [{"path": "/run/secret", "content_base64": secret, "mode": 0o600}]}),
    )
    .await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    ensure!(
        out == [
            "1000",
            "1000",
            "1000 2000 2001",
            "HOME=/home/app",
            "only-for-app",
            "1000:1000 600"
        ],
        "{out:?}"
    );
    Ok(())
}

/// `USER app:svc`: the named group replaces the primary one and no supplementary group is
/// added; `HOME` set by the run wins over the passwd entry's.
#[tokio::test]
async fn user_and_group_names_resolve_and_a_run_home_wins() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (r, out) = run_in(
        &f,
        "users/group",
        "id -u; id -g; id -G; echo HOME=$HOME",
        json!({"env_variables": [{"env_key": "HOME", "env_val": "/work"}]}),
    )
    .await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    ensure!(out == ["1000", "1001", "1001", "HOME=/work"], "{out:?}");
    Ok(())
}

/// `USER ghost`, which the image's /etc/passwd lacks: the run fails before it starts, with
/// `invalid_user` and a message naming the user — never as root.
#[tokio::test]
async fn a_user_the_image_lacks_fails_the_run_instead_of_running_as_root() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (r, out) = run_in(&f, "users/ghost", "id -u", json!({})).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "invalid_user",
        "{r}"
    );
    let message = r["error_message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("ghost") && message.contains("/etc/passwd"),
        "{r}"
    );
    ensure!(r["started_at"].is_null(), "never started: {r}");
    ensure!(out.is_empty(), "nothing ran: {out:?}");
    // The node stays usable and left no image view behind.
    let (r, out) = run_in(&f, "busybox", "id -u; echo HOME=$HOME", json!({})).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    ensure!(
        out == ["0", "HOME=/root"],
        "root's home from busybox's passwd: {out:?}"
    );
    Ok(())
}
