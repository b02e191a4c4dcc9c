//! End-to-end: `berthctl` as a real process (the binary `cargo build --workspace --bins` puts
//! in `BERTH_BIN_DIR`) against a real fleet: exit codes, stdout and stderr apart, JSON and
//! table output, API errors naming the field, and Ctrl-C stopping a followed run.

mod common;

use anyhow::{anyhow, ensure, Context, Result};
use common::{AgentSpec, Fleet, TOKEN};
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What one `berthctl` invocation did.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn berthctl(f: &Fleet) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(f.env.bin_dir.join("berthctl"));
    cmd.env("BERTH_URL", &f.api_url)
        .env("BERTH_TOKEN", TOKEN)
        // Away from the checkout, so no `.berth/env` of a local fleet is consulted.
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run_cli(f: &Fleet, args: &[&str]) -> Result<Outcome> {
    let out = tokio::time::timeout(Duration::from_secs(120), berthctl(f).args(args).output())
        .await
        .with_context(|| format!("berthctl {args:?} did not finish"))?
        .with_context(|| format!("starting berthctl from {}", f.env.bin_dir.display()))?;
    Ok(Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The id `run … --follow` announces on stderr ("run ID created").
fn announced_run_id(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        l.strip_prefix("run ")
            .and_then(|r| r.strip_suffix(" created"))
            .map(str::to_owned)
    })
}

async fn create_runner(f: &Fleet, name: &str, region: &str) -> Result<String> {
    let o = run_cli(
        f,
        &[
            "runners",
            "create",
            "--name",
            name,
            "--image",
            "busybox",
            "--region",
            region,
            "--instance-type",
            "standard-s",
            "--timeout",
            "60",
            "--json",
        ],
    )
    .await?;
    ensure!(o.code == Some(0), "{o:?}\n{}", f.logs());
    let v: Value = serde_json::from_str(&o.stdout).with_context(|| o.stdout.clone())?;
    v["runner"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no runner id in {v}"))
}

#[tokio::test]
async fn berthctl_runs_follows_and_exits_with_the_runs_exit_code() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = create_runner(&f, "cli-e2e", "fra").await?;

    // A failing run: its exit code, its stdout and stderr lines each on their own stream.
    let o = run_cli(
        &f,
        &[
            "run",
            &runner,
            "--follow",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
    )
    .await?;
    ensure!(o.code == Some(7), "{o:?}\n{}", f.logs());
    ensure!(o.stdout.lines().any(|l| l == "out"), "{o:?}");
    ensure!(!o.stdout.contains("err"), "{o:?}");
    ensure!(o.stderr.lines().any(|l| l == "err"), "{o:?}");
    let run = announced_run_id(&o.stderr).with_context(|| format!("{o:?}"))?;

    // The same lines afterwards, paged, still apart.
    let logs = run_cli(&f, &["logs", &runner, &run]).await?;
    ensure!(logs.code == Some(0), "{logs:?}");
    ensure!(logs.stdout == "out\n", "{logs:?}");
    ensure!(logs.stderr == "err\n", "{logs:?}");

    // A succeeding run, with an environment variable and a shell command.
    let o = run_cli(
        &f,
        &[
            "run",
            &runner,
            "-e",
            "GREETING=hello there",
            "--command",
            "echo \"$GREETING\"",
            "--follow",
        ],
    )
    .await?;
    ensure!(o.code == Some(0), "{o:?}\n{}", f.logs());
    ensure!(o.stdout == "hello there\n", "{o:?}");

    // JSON as the API gives it, and tables.
    let o = run_cli(&f, &["runners", "list", "--json"]).await?;
    ensure!(o.code == Some(0), "{o:?}");
    let v: Value = serde_json::from_str(&o.stdout).with_context(|| o.stdout.clone())?;
    ensure!(
        v["runners"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["id"] == runner.as_str())),
        "{v}"
    );
    let o = run_cli(&f, &["runners", "list"]).await?;
    ensure!(
        o.stdout.starts_with("ID ") && o.stdout.contains(&runner),
        "{o:?}"
    );
    let o = run_cli(&f, &["runs", "list", &runner]).await?;
    ensure!(
        o.stdout.contains(&run) && o.stdout.contains("failed"),
        "{o:?}"
    );
    let o = run_cli(&f, &["nodes", "list"]).await?;
    ensure!(o.code == Some(0), "{o:?}");
    ensure!(o.stdout.contains(f.node("fra")), "{o:?}");

    // The finished runs are billed: usage by instance type lists them.
    let o = run_cli(&f, &["--json", "usage", "--group-by", "instance_type"]).await?;
    ensure!(o.code == Some(0), "{o:?}");
    let usage: serde_json::Value = serde_json::from_str(&o.stdout)?;
    ensure!(
        usage["usage"][0]["key"] == "standard-s" && usage["usage"][0]["runs"].as_u64() >= Some(2),
        "{usage}"
    );
    let o = run_cli(&f, &["usage", "--group-by", "planet"]).await?;
    ensure!(o.code == Some(1) && o.stderr.contains("group_by"), "{o:?}");

    // The API refuses a value: exit 1, and the field is named.
    let o = run_cli(
        &f,
        &[
            "runners",
            "create",
            "--name",
            "bad",
            "--image",
            "busybox",
            "--region",
            "fra",
            "--instance-type",
            "standard-s",
            "--timeout",
            "0",
        ],
    )
    .await?;
    ensure!(o.code == Some(1), "{o:?}");
    ensure!(o.stderr.contains("timeout_seconds"), "{o:?}");

    // Unknown ids are the API's 404, named too.
    let o = run_cli(&f, &["runners", "get", "0000-missing"]).await?;
    ensure!(o.code == Some(1) && o.stderr.contains("runner_id"), "{o:?}");
    Ok(())
}

#[tokio::test]
async fn ctrl_c_while_a_run_waits_stops_it_and_exits_130() -> Result<()> {
    // The only node is in fra, so a run in ams waits and says why.
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = create_runner(&f, "cli-e2e-waits", "ams").await?;
    let mut child = berthctl(&f)
        .args(["run", &runner, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id().context("berthctl has no pid")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = vec![];
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            let pending = line.starts_with("pending") && line.contains("ams");
            seen.push(line);
            if pending {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    ensure!(
        matches!(waiting, Ok(Ok(true))),
        "no pending progress: {waiting:?} {seen:?}\n{}",
        f.logs()
    );
    let run = seen
        .iter()
        .find_map(|l| announced_run_id(l))
        .with_context(|| format!("{seen:?}"))?;

    // The queue across runners shows it, with its position and why it waits.
    let o = run_cli(&f, &["runs", "list", "--status", "pending"]).await?;
    ensure!(o.code == Some(0), "{o:?}");
    let row = o
        .stdout
        .lines()
        .find(|l| l.contains(&run))
        .with_context(|| format!("the waiting run is not listed: {o:?}"))?;
    ensure!(
        row.contains("ams") && row.contains("pending") && row.contains(&runner),
        "{row}"
    );
    ensure!(row.contains("no node"), "no reason: {row}");
    let o = run_cli(&f, &["runs", "list", "--status", "running", "--json"]).await?;
    let v: Value = serde_json::from_str(&o.stdout)?;
    ensure!(v["runs"].as_array().is_some_and(Vec::is_empty), "{v}");
    let o = run_cli(&f, &["runs", "list", "--region", "fra"]).await?;
    ensure!(o.code == Some(0) && !o.stdout.contains(&run), "{o:?}");
    let o = run_cli(&f, &["runs", "list", &runner, "--status", "pending"]).await?;
    ensure!(
        o.code != Some(0) && o.stderr.contains("omit RUNNER"),
        "{o:?}"
    );

    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    ensure!(kill.success(), "kill -INT failed");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    let mut rest = vec![];
    while let Ok(Some(l)) = lines.next_line().await {
        rest.push(l);
    }
    ensure!(status.code() == Some(130), "{status:?} {seen:?} {rest:?}");
    let r = f.run(&runner, &run).await?;
    ensure!(r["status"] == "canceled", "{r}");
    Ok(())
}

#[tokio::test]
async fn missing_configuration_and_bad_usage_are_explained() -> Result<()> {
    let env = common::env()?;
    let dir = tempfile::tempdir()?;
    let out = tokio::process::Command::new(env.bin_dir.join("berthctl"))
        .args(["runners", "list"])
        .env_remove("BERTH_URL")
        .env_remove("BERTH_TOKEN")
        .current_dir(dir.path())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{out:?}");
    ensure!(
        stderr.contains("BERTH_URL") && stderr.contains("BERTH_TOKEN"),
        "{stderr}"
    );

    // A `.berth/env` in a parent directory is enough; an unreachable URL is named.
    std::fs::create_dir_all(dir.path().join(".berth"))?;
    std::fs::write(
        dir.path().join(".berth/env"),
        "BERTH_URL=http://127.0.0.1:9\nBERTH_TOKEN=t\n",
    )?;
    let sub = dir.path().join("deeper");
    std::fs::create_dir_all(&sub)?;
    let out = tokio::process::Command::new(env.bin_dir.join("berthctl"))
        .args(["nodes", "list"])
        .env_remove("BERTH_URL")
        .env_remove("BERTH_TOKEN")
        .current_dir(&sub)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{out:?}");
    ensure!(stderr.contains("http://127.0.0.1:9/v1/nodes"), "{stderr}");

    let out = tokio::process::Command::new(env.bin_dir.join("berthctl"))
        .args(["run", "r1", "--env", "NOEQUALS"])
        .output()
        .await?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn berthctl_run_uploads_local_files_read_only() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = create_runner(&f, "cli-e2e-files", "fra").await?;
    let local = f.dir.path().join("settings.conf");
    std::fs::write(&local, "answer=42\nmode=cli\n")?;
    let file = format!("{}:/etc/app/settings.conf:0640", local.display());
    let o = run_cli(
        &f,
        &[
            "run",
            &runner,
            "--file",
            &file,
            "--follow",
            "--",
            "sh",
            "-c",
            "cat /etc/app/settings.conf; stat -c %a /etc/app/settings.conf; \
             echo x >> /etc/app/settings.conf || echo read-only",
        ],
    )
    .await?;
    ensure!(o.code == Some(0), "{o:?}\n{}", f.logs());
    let out: Vec<&str> = o.stdout.lines().collect();
    ensure!(
        out == ["answer=42", "mode=cli", "640", "read-only"],
        "{o:?}"
    );
    // A file that is not there is refused before any request.
    let missing = format!("{}:/etc/x", f.dir.path().join("nope").display());
    let o = run_cli(&f, &["run", &runner, "--file", &missing]).await?;
    ensure!(o.code != Some(0) && o.stderr.contains("nope"), "{o:?}");
    Ok(())
}
