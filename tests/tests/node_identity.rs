//! End-to-end: node identity (issue #12, item 1) against a real scheduler, API and agents. Every
//! fleet agent enrolls with a registration token the harness creates through the API; here:
//! an agent with no credential, a forged node id, a stolen credential used on the control
//! service, a second agent claiming a live node's id, registration tokens that are single-use,
//! expired or revoked, and revoking a node while it runs something.

mod common;

use anyhow::{ensure, Context, Result};
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::control_service_client::ControlServiceClient;
use berth_proto::v1::EnrollRequest;
use common::{AgentSpec, Fleet, Killed};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// An agent outside the fleet, with the fleet's scheduler addresses.
fn spawn_agent(
    f: &Fleet,
    name: &str,
    node_id: &str,
    region: &str,
    extra: &[&str],
) -> Result<Killed> {
    f.spawn_loose_agent(name, node_id, region, &f.scheduler_urls(), extra)
}

/// Waits until `name.log` contains `needle`, checking meanwhile that `node_id` never shows up
/// as a node; returns the log.
async fn refused(f: &Fleet, name: &str, node_id: &str, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listed = f.node_view(node_id).await?;
        ensure!(listed.is_none(), "{node_id} became a node: {listed:?}");
        let log = std::fs::read_to_string(f.dir.path().join(format!("{name}.log")))?;
        if log.contains(needle) {
            return Ok(log);
        }
        ensure!(
            Instant::now() < deadline,
            "{name} was not refused with {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fleet agent's credential file (it enrolled at start).
fn credential_of(f: &Fleet, node_id: &str) -> PathBuf {
    f.dir
        .path()
        .join(format!("agent-{node_id}"))
        .join("node.credential")
}

fn copy_private(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::copy(from, to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

async fn create_token(f: &Fleet, body: serde_json::Value) -> Result<String> {
    let created = f.post("/v1/admin/registration_tokens", body).await?;
    created["token"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no token in {created}"))
}

async fn enroll(f: &Fleet, token: &str, node_id: &str, region: &str) -> Result<tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.scheduler_addr))?
        .connect()
        .await?;
    let answer = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            registration_token: token.to_owned(),
            node_id: node_id.to_owned(),
            region: region.to_owned(),
        })
        .await;
    Ok(match answer {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    })
}

/// An agent with neither credential nor registration token is refused and never becomes a
/// node; an agent's credential file is 0600 in a 0700 state directory.
#[tokio::test]
async fn an_agent_without_a_credential_never_becomes_a_node() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let file = credential_of(&f, &node);
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    ensure!(mode(&file)? == 0o600, "credential mode {:o}", mode(&file)?);
    let state_dir = file.parent().context("state dir")?;
    ensure!(
        mode(state_dir)? == 0o700,
        "state dir mode {:o}",
        mode(state_dir)?
    );

    let rogue = format!("{node}-rogue");
    let _agent = spawn_agent(&f, "rogue", &rogue, "fra", &[])?;
    refused(&f, "rogue", &rogue, "requires a node credential").await?;

    // A made-up credential of the right shape is no better.
    let forged = f.dir.path().join("forged.credential");
    std::fs::write(
        &forged,
        format!("berthnode_{}_{}\n", "0".repeat(16), "1".repeat(64)),
    )?;
    copy_private(&forged, &forged.with_extension("private"))?;
    let forged = forged.with_extension("private");
    let _forger = spawn_agent(
        &f,
        "forger",
        &format!("{node}-forger"),
        "fra",
        &["--credential-file", &forged.to_string_lossy()],
    )?;
    refused(
        &f,
        "forger",
        &format!("{node}-forger"),
        "invalid node credential",
    )
    .await?;
    Ok(())
}

/// A node's credential speaks only as that node: another node id or another region is
/// refused, and on the control service it is worth nothing (however admin the metadata).
#[tokio::test]
async fn a_node_credential_speaks_only_as_its_node() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let stolen = f.dir.path().join("stolen.credential");
    copy_private(&credential_of(&f, &node), &stolen)?;
    let stolen_arg = stolen.to_string_lossy().into_owned();

    let other = format!("{node}-impostor");
    let _impostor = spawn_agent(
        &f,
        "impostor",
        &other,
        "fra",
        &["--credential-file", &stolen_arg],
    )?;
    let log = refused(&f, "impostor", &other, "cannot register as").await?;
    ensure!(log.contains(&format!("belongs to node {node}")), "{log}");

    let _moved = spawn_agent(
        &f,
        "moved",
        &node,
        "ams",
        &["--credential-file", &stolen_arg],
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = std::fs::read_to_string(f.dir.path().join("moved.log"))?;
        if log.contains("cannot register in ams") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not refused in another region:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = f.node_view(&node).await?.context("the real node")?;
    ensure!(view["region"] == "fra", "{view}");

    let credential = std::fs::read_to_string(&stolen)?.trim().to_owned();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.scheduler_addr))?
        .connect()
        .await?;
    let mut control = ControlServiceClient::new(channel);
    let mut call = tonic::Request::new(berth_proto::v1::ListNodesRequest::default());
    let md = call.metadata_mut();
    md.insert("x-berth-project", "default".parse()?);
    md.insert("x-berth-admin", "true".parse()?);
    md.insert("x-berth-node-credential", credential.parse()?);
    md.insert("x-berth-cluster-token", credential.parse()?);
    let answer = control.list_nodes(call).await;
    ensure!(
        matches!(&answer, Err(s) if s.code() == tonic::Code::Unauthenticated),
        "a node credential reached the control service: {answer:?}"
    );
    Ok(())
}

/// Enrolling an id that a live node holds is refused with a clear error, by the scheduler and
/// by an agent started with it; registration tokens are for one region, single-use ones work
/// once, and expired or revoked ones not at all.
#[tokio::test]
async fn registration_tokens_and_live_node_ids_are_enforced() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let token = create_token(&f, json!({"region": "fra"})).await?;

    let taken = enroll(&f, &token, &node, "fra").await?;
    ensure!(taken.code() == tonic::Code::AlreadyExists, "{taken:?}");
    ensure!(
        taken.message().contains("is connected right now"),
        "{taken:?}"
    );
    let token_file = f.dir.path().join("second.token");
    std::fs::write(&token_file, &token)?;
    let mut second = spawn_agent(
        &f,
        "second",
        &node,
        "fra",
        &["--registration-token-file", &token_file.to_string_lossy()],
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.0.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "the second agent kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(f.dir.path().join("second.log"))?;
    ensure!(
        !status.success() && log.contains("is connected right now"),
        "{status}: {log}"
    );

    let wrong_region = enroll(&f, &token, "fresh-node", "ams").await?;
    ensure!(
        wrong_region.code() == tonic::Code::PermissionDenied,
        "{wrong_region:?}"
    );

    let once = create_token(&f, json!({"region": "fra", "single_use": true})).await?;
    ensure!(enroll(&f, &once, "fresh-1", "fra").await?.code() == tonic::Code::Ok);
    let again = enroll(&f, &once, "fresh-2", "fra").await?;
    ensure!(again.message().contains("already used"), "{again:?}");

    let short = create_token(&f, json!({"region": "fra", "expires_in_seconds": 1})).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let expired = enroll(&f, &short, "fresh-3", "fra").await?;
    ensure!(expired.message().contains("expired"), "{expired:?}");

    let revoked = f
        .post("/v1/admin/registration_tokens", json!({"region": "fra"}))
        .await?;
    let id = revoked["registration_token"]["token_id"]
        .as_str()
        .context("id")?;
    let (status, _) = f
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/admin/registration_tokens/{id}"),
            None,
        )
        .await?;
    ensure!(status == 200, "revoke answered {status}");
    let plaintext = revoked["token"].as_str().context("token")?;
    let refused = enroll(&f, plaintext, "fresh-4", "fra").await?;
    ensure!(refused.message().contains("revoked"), "{refused:?}");
    // The last hex digit changed (to one it is not: a fixed '0' left it right 1 time in 16).
    let last = if plaintext.ends_with('0') { "1" } else { "0" };
    let wrong_secret = format!("{}{last}", &plaintext[..plaintext.len() - 1]);
    let wrong = enroll(&f, &wrong_secret, "fresh-5", "fra").await?;
    ensure!(
        wrong.code() == tonic::Code::Unauthenticated && !wrong.message().contains("revoked"),
        "a wrong secret learned something: {wrong:?}"
    );

    let listed = f.get("/v1/admin/registration_tokens").await?;
    let text = listed.to_string();
    ensure!(
        !text.contains(plaintext) && !text.contains(&token),
        "a token is listed in clear"
    );
    Ok(())
}

/// Revoking a node closes its session at once, its running run ends `node_lost`, the node is
/// `lost` and stays so: its agent cannot come back with the revoked credential.
#[tokio::test]
async fn revoking_a_node_disconnects_it_and_takes_its_runs_back() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "sleep 30", "timeout_seconds": 120}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_for(&runner, &run, Duration::from_secs(60), |s| s == "running")
        .await?;

    let revoked = f
        .post(&format!("/v1/nodes/{node}/revoke"), json!({}))
        .await?;
    ensure!(revoked["node"]["status"] == "lost", "{revoked}");
    let ended = f
        .wait_for(&runner, &run, Duration::from_secs(10), |s| s != "running")
        .await?;
    ensure!(
        ended["status"] == "failed" && ended["error_code"] == "node_lost",
        "{ended}"
    );
    // The agent keeps trying and is refused each time; the node stays lost.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = f.log_of(&format!("agent-{node}"));
        if log.contains("was revoked") {
            break;
        }
        ensure!(Instant::now() < deadline, "the agent was not told:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let view = f.node_view(&node).await?.context("still listed")?;
    ensure!(view["status"] == "lost", "{view}");
    // Its container is not left running forever: stopping the agent is the operator's move;
    // here the harness's own cleanup kills it.
    f.signal_agent(&node, "KILL")?;
    Ok(())
}

async fn berthctl(f: &Fleet, args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(f.env.bin_dir.join("berthctl"))
            .args(args)
            .env("BERTH_URL", &f.api_url)
            .env("BERTH_TOKEN", common::TOKEN)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("berthctl {args:?} did not finish"))??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "berthctl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The operator's path: `berthctl admin nodes token create` prints a token once, a new agent
/// started with it in a file enrolls and becomes a ready node, and `berthctl admin nodes
/// revoke` makes it lost.
#[tokio::test]
async fn a_node_joins_with_a_token_from_berthctl_and_is_revoked_with_it() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let out = berthctl(
        &f,
        &[
            "admin",
            "nodes",
            "token",
            "create",
            "--region",
            "ams",
            "--single-use",
        ],
    )
    .await?;
    let token = out
        .lines()
        .find(|l| l.starts_with("berthreg_"))
        .with_context(|| format!("no token printed: {out}"))?;
    let file = f.dir.path().join("ams.token");
    std::fs::write(&file, format!("{token}\n"))?;
    let node = format!("{}-joined", f.node("fra"));
    let _agent = spawn_agent(
        &f,
        "joined",
        &node,
        "ams",
        &["--registration-token-file", &file.to_string_lossy()],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = f.node_view(&node).await?;
        if view.as_ref().is_some_and(|v| v["status"] == "ready") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{node} did not become ready: {view:?}\n{}",
            std::fs::read_to_string(f.dir.path().join("joined.log"))?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = berthctl(&f, &["admin", "nodes", "token", "list"]).await?;
    ensure!(
        !listed.contains(token),
        "the token is listed in clear: {listed}"
    );
    ensure!(
        listed
            .lines()
            .any(|l| l.contains("ams") && l.contains(" 1 ")),
        "{listed}"
    );
    berthctl(&f, &["admin", "nodes", "revoke", &node]).await?;
    let view = f.node_view(&node).await?.context("listed")?;
    ensure!(view["status"] == "lost", "{view}");
    Ok(())
}
