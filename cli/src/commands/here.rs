//! `berthctl run RUNNER --here`: runs one run on this machine, as an ephemeral node of the fleet
//! (e.g. inside a CI job). It creates the run with `ephemeral: true`, starts `berth-node-agent`
//! in one-shot mode for it (the node `eph-<run id>`, in the run's region, with the run's claim
//! in a private file), follows the run's logs like `run --follow`, and exits with the run's exit
//! code. The agent enrolls with the registration token it finds as it always does
//! (`BERTH_REGISTRATION_TOKEN` or `--registration-token-file`) and reaches the scheduler given by
//! `--scheduler` or `BERTH_AGENT_SCHEDULER`; every other agent setting comes from its
//! `BERTH_AGENT_*` environment. SIGINT or SIGTERM stops the run, waits for the agent to report
//! it, then exits.

use super::follow::{self, FinalState, Terminal, INTERRUPTED};
use super::{err_line, id, out, report_end, run_body, CommandError, Ctx};
use crate::args::RunArgs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the agent has, after its run ended, to deliver its last reports and leave.
const AGENT_LEAVE: Duration = Duration::from_secs(60);

pub async fn run_here(ctx: &Ctx, a: RunArgs) -> Result<u8, CommandError> {
    let runner = id("runner", &a.runner)?;
    let agent = agent_binary(a.agent_bin.as_deref())?;
    let mut body = run_body(&a)?;
    if let Some(b) = body.as_object_mut() {
        b.insert("ephemeral".into(), serde_json::json!(true));
    }
    let created = ctx
        .client
        .post(&format!("/v1/runners/{runner}/runs"), Some(&body))
        .await?;
    let run = &created.json["run"];
    let field = |name: &str, v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| CommandError::Outcome(format!("no {name} in the API's answer")))
    };
    let run_id = field("run id", &run["id"])?;
    let region = field("region", &run["region"])?;
    let node_id = field("ephemeral node id", &run["ephemeral"]["node_id"])?;
    let claim = field("ephemeral claim", &run["ephemeral_claim"])?;
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/berth/{node_id}")));
    let claim_file = write_private(&dir, "ephemeral.claim", &claim)?;
    if ctx.json {
        // The claim is a secret: never printed.
        let mut shown = created.json.clone();
        if let Some(r) = shown["run"].as_object_mut() {
            r.remove("ephemeral_claim");
        }
        out(&format!("{shown}\n"));
    }
    err_line(&format!(
        "run {run_id} created; running it here as ephemeral node {node_id}"
    ));
    let mut command = tokio::process::Command::new(&agent);
    command
        .arg("--node-id")
        .arg(&node_id)
        .arg("--region")
        .arg(&region)
        .arg("--ephemeral-run-id")
        .arg(&run_id)
        .arg("--ephemeral-claim-file")
        .arg(&claim_file)
        .arg("--state-dir")
        .arg(dir.join("agent"));
    if let Some(s) = &a.scheduler {
        command.arg("--scheduler").arg(s);
    }
    // This one-shot node is not the machine's own node: the settings of a joined agent
    // (/etc/berth/node-agent.toml: its node ID, credential, state) must not leak into it. A
    // config file of its own may still be named with BERTH_NODE_AGENT_CONFIG.
    if std::env::var_os("BERTH_NODE_AGENT_CONFIG").is_none() {
        command.arg("--config").arg("/dev/null");
    }
    if let Some(t) = &a.registration_token_file {
        command.arg("--registration-token-file").arg(t);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        // The run's lines go to stdout; the agent says only what goes wrong.
        command.env("RUST_LOG", "warn");
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            stop(ctx, &runner, &run_id).await;
            return Err(CommandError::Input(format!(
                "cannot start {}: {e}",
                agent.display()
            )));
        }
    };
    let following = async {
        follow::wait_while_pending(&ctx.client, &runner, &run_id, !ctx.json).await?;
        follow::stream_logs(
            &ctx.client,
            &runner,
            &run_id,
            &mut Terminal { json: ctx.json },
        )
        .await
    };
    let mut following = std::pin::pin!(following);
    let mut agent_exit = None;
    let end: Result<FinalState, CommandError> = loop {
        tokio::select! {
            end = &mut following => break end,
            status = child.wait(), if agent_exit.is_none() => {
                let status = status.map_err(|e| CommandError::Outcome(format!("waiting for the agent: {e}")))?;
                agent_exit = Some(status);
                if !status.success() && still_waiting(ctx, &runner, &run_id).await {
                    // Refused, or it could not start: the run would wait for nothing.
                    err_line(&format!("the node agent exited ({status}) before taking run {run_id}; stopping the run"));
                    stop(ctx, &runner, &run_id).await;
                }
            }
            () = signalled() => {
                err_line(&format!("interrupted: stopping run {run_id}"));
                stop(ctx, &runner, &run_id).await;
                leave(&mut child, agent_exit.is_some()).await;
                return Ok(INTERRUPTED);
            }
        }
    };
    let state = end?;
    let code = report_end(&ctx.client, &runner, &run_id, &state).await;
    let left = match agent_exit {
        Some(status) => status.success(),
        None => leave(&mut child, false).await,
    };
    if left {
        // Only what this command put there (the directory itself if that leaves it empty):
        // --state-dir may name a directory that holds other things.
        let _ = std::fs::remove_file(&claim_file);
        let _ = std::fs::remove_dir_all(dir.join("agent"));
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(code)
}

/// Waits for the agent to deliver its last reports and exit (it does once its run ended), at
/// most [`AGENT_LEAVE`]; then kills it. Answers whether it left by itself with success.
async fn leave(child: &mut tokio::process::Child, exited: bool) -> bool {
    if exited {
        return false;
    }
    match tokio::time::timeout(AGENT_LEAVE, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            err_line("the node agent did not leave in time; killing it");
            let _ = child.kill().await;
            false
        }
    }
}

/// Whether the run still waits, on no node.
async fn still_waiting(ctx: &Ctx, runner: &str, run: &str) -> bool {
    match ctx
        .client
        .get(&format!("/v1/runners/{runner}/runs/{run}"))
        .await
    {
        Ok(a) => a.json["run"]["status"] == "pending" && a.json["run"]["node_id"].is_null(),
        Err(_) => false,
    }
}

async fn stop(ctx: &Ctx, runner: &str, run: &str) {
    let path = format!("/v1/runners/{runner}/runs/{run}/stop");
    if let Err(e) = ctx.client.post(&path, None).await {
        err_line(&format!("could not stop run {run}: {e}"));
    }
}

/// SIGINT or SIGTERM (a CI job canceled).
async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return follow::interrupted().await;
    };
    tokio::select! {
        () = follow::interrupted() => {}
        _ = term.recv() => {}
    }
}

/// `berth-node-agent`: the one given, else the one beside this program, else from `PATH`.
fn agent_binary(given: Option<&Path>) -> Result<PathBuf, CommandError> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("berth-node-agent")))
        .filter(|p| p.is_file());
    Ok(beside.unwrap_or_else(|| PathBuf::from("berth-node-agent")))
}

/// Writes `content` to `dir/name`, the directory 0700 and the file 0600.
fn write_private(dir: &Path, name: &str, content: &str) -> Result<PathBuf, CommandError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let fail = |e: std::io::Error| {
        CommandError::Input(format!(
            "cannot write to {}: {e} (--state-dir)",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(fail)?;
    file.write_all(content.as_bytes()).map_err(fail)?;
    Ok(path)
}
