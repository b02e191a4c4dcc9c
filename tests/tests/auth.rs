//! End-to-end: auth by project against real scheduler, API, agent and `berthctl` processes,
//! for what needs them: a finished run's logs and usage stay in its project, `berthctl admin
//! keys` manages keys, the plaintext key is stored nowhere, and the scheduler's port serves
//! only holders of the cluster token. The HTTP contract of auth (each route scoped by project,
//! 401, 403) runs in process: `api/tests/contract/auth.rs`.

mod common;

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::{AgentSpec, Fleet, CLUSTER_TOKEN, TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// One request with `key` as the bearer token (`None`: no Authorization header).
async fn call(
    f: &Fleet,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    call_with(f, key, method, path, body, &[]).await
}

async fn call_with(
    f: &Fleet,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, Value)> {
    let mut req = f.http.request(method, format!("{}{path}", f.api_url));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, value))
}

/// `POST /v1/admin/api_keys` with the admin token: (key id, plaintext key).
async fn create_key_rest(f: &Fleet, project: &str, name: &str) -> Result<(String, String)> {
    let (status, v) = call(
        f,
        Some(TOKEN),
        Method::POST,
        "/v1/admin/api_keys",
        Some(json!({ "project": project, "name": name })),
    )
    .await?;
    ensure!(status == 201, "{status} {v}");
    ensure!(v["api_key"]["project"] == project, "{v}");
    ensure!(v["api_key"]["revoked_at"].is_null(), "{v}");
    let key = v["key"].as_str().ok_or_else(|| anyhow!("no key in {v}"))?;
    let id = v["api_key"]["key_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no key_id in {v}"))?;
    ensure!(key.starts_with(&format!("berth_{id}_")), "{key} {id}");
    Ok((id.to_owned(), key.to_owned()))
}

async fn berthctl(f: &Fleet, token: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(f.env.bin_dir.join("berthctl"))
            .args(args)
            .env("BERTH_URL", &f.api_url)
            .env("BERTH_TOKEN", token)
            .current_dir(f.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("berthctl {args:?} did not finish"))?
    .with_context(|| format!("starting berthctl from {}", f.env.bin_dir.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `berthctl admin keys create`: the key is the output line that starts with `berth_`.
async fn create_key_cli(f: &Fleet, project: &str, name: &str) -> Result<(String, String)> {
    let (code, out, err) = berthctl(
        f,
        TOKEN,
        &[
            "admin",
            "keys",
            "create",
            "--project",
            project,
            "--name",
            name,
        ],
    )
    .await?;
    ensure!(code == 0, "exit {code}: {out}\n{err}");
    let key = out
        .lines()
        .find(|l| l.starts_with("berth_"))
        .ok_or_else(|| anyhow!("no key line in {out}"))?
        .trim()
        .to_owned();
    let id = key
        .strip_prefix("berth_")
        .and_then(|r| r.split_once('_'))
        .map(|(id, _)| id.to_owned())
        .ok_or_else(|| anyhow!("malformed key {key}"))?;
    ensure!(out.contains(project), "{out}");
    ensure!(
        out.matches(&key).count() == 1,
        "the key is printed once: {out}"
    );
    Ok((id, key))
}

async fn wait_finished(f: &Fleet, key: &str, runner: &str, run: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = call(
            f,
            Some(key),
            Method::GET,
            &format!("/v1/runners/{runner}/runs/{run}"),
            None,
        )
        .await?;
        ensure!(status == 200, "{status} {v}");
        if matches!(
            v["run"]["status"].as_str(),
            Some("succeeded" | "failed" | "canceled")
        ) {
            return Ok(v["run"].clone());
        }
        if Instant::now() > deadline {
            bail!("run {run} did not finish: {v}\n{}", f.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files_under(&p, out)?;
        } else {
            out.push((p.display().to_string(), std::fs::read(&p)?));
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What needs a run that really ran: its logs and usage stay in its project. (Scoping of
/// every route, 401s and 403s: the in-process contract tests in `api/tests/contract/auth.rs`.)
#[tokio::test]
async fn a_project_keys_logs_and_usage_stay_in_its_project() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (_, alpha) = create_key_rest(&f, "alpha", "alpha-ci").await?;
    let (_, beta) = create_key_cli(&f, "beta", "beta-ci").await?;
    let (a, b) = (Some(alpha.as_str()), Some(beta.as_str()));

    let runner_body = json!({
        "name": "alpha-runner", "image_name": "busybox", "image_tag": "latest",
        "run_command": "echo alpha-was-here", "region": "fra",
        "instance_type": "standard-s", "timeout_seconds": 60,
    });
    let (status, runner) = call(&f, a, Method::POST, "/v1/runners", Some(runner_body)).await?;
    ensure!(status == 201, "{status} {runner}");
    let runner_id = runner["runner"]["id"].as_str().unwrap_or("").to_owned();
    let idem = [("Idempotency-Key", "shared-key-1")];
    let (status, run) = call_with(
        &f,
        a,
        Method::POST,
        &format!("/v1/runners/{runner_id}/runs"),
        None,
        &idem,
    )
    .await?;
    ensure!(status == 201, "{status} {run}");
    let run_id = run["run"]["id"].as_str().unwrap_or("").to_owned();
    let done = wait_finished(&f, &alpha, &runner_id, &run_id).await?;
    ensure!(done["status"] == "succeeded", "{done}");

    // alpha sees its run's lines and usage.
    let run_path = format!("/v1/runners/{runner_id}/runs/{run_id}");
    let (status, logs) = call(&f, a, Method::GET, &format!("{run_path}/logs"), None).await?;
    ensure!(
        status == 200 && logs["logs"][0]["msg"] == "alpha-was-here",
        "{status} {logs}"
    );
    let (_, usage) = call(&f, a, Method::GET, "/v1/usage", None).await?;
    ensure!(usage["usage"][0]["key"] == runner_id.as_str(), "{usage}");

    // beta sees neither.
    for path in [
        format!("{run_path}/logs"),
        format!("{run_path}/logs/stream"),
    ] {
        let (status, v) = call(&f, b, Method::GET, &path, None).await?;
        ensure!(
            status == 404 && v["code"] == "not_found",
            "beta {path}: {status} {v}"
        );
    }
    let (_, usage) = call(&f, b, Method::GET, "/v1/usage", None).await?;
    ensure!(
        usage["usage"] == json!([]) && usage["total"]["billed_seconds"] == 0,
        "{usage}"
    );

    // A real node: project keys may not drain it; the admin sees it.
    let node = f.node("fra").to_owned();
    let (status, v) = call(
        &f,
        a,
        Method::POST,
        &format!("/v1/nodes/{node}/drain"),
        None,
    )
    .await?;
    ensure!(status == 403 && v["code"] == "forbidden", "{status} {v}");
    let (status, v) = call(&f, Some(TOKEN), Method::GET, "/v1/nodes", None).await?;
    ensure!(
        status == 200 && v["nodes"].as_array().is_some_and(|n| n.len() == 1),
        "{v}"
    );
    Ok(())
}

/// `berthctl admin keys`: create, list (never a secret), filter, refuse a project key, revoke;
/// and no plaintext key or secret in any file the real processes wrote (store, logs). (The
/// HTTP side of refused and revoked keys: `api/tests/contract/auth.rs`.)
#[tokio::test]
async fn berthctl_manages_keys_and_no_key_is_stored() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let (key_id, key) = create_key_cli(&f, "alpha", "short-lived").await?;
    let (other_id, other) = create_key_rest(&f, "beta", "other").await?;
    let secret = key
        .rsplit('_')
        .next()
        .ok_or_else(|| anyhow!("malformed key"))?
        .to_owned();
    let (status, _) = call(&f, Some(&key), Method::GET, "/v1/runners", None).await?;
    ensure!(status == 200, "a fresh key works: {status}");

    // Listing shows ids, projects and names, never a key or secret.
    let (code, listed, err) = berthctl(&f, TOKEN, &["admin", "keys", "list"]).await?;
    ensure!(code == 0, "{listed}\n{err}");
    ensure!(
        listed.contains(&key_id) && listed.contains(&other_id),
        "{listed}"
    );
    ensure!(
        !listed.contains(&secret) && !listed.contains(&key),
        "the list shows a secret"
    );
    let (code, json_list, _) = berthctl(&f, TOKEN, &["admin", "keys", "list", "--json"]).await?;
    ensure!(code == 0 && !json_list.contains(&secret), "{json_list}");
    let (_, only_beta, _) =
        berthctl(&f, TOKEN, &["admin", "keys", "list", "--project", "beta"]).await?;
    ensure!(
        only_beta.contains(&other_id) && !only_beta.contains(&key_id),
        "{only_beta}"
    );
    // A project key cannot list keys with berthctl either (403 → exit 1).
    let (code, _, err) = berthctl(&f, &key, &["admin", "keys", "list"]).await?;
    ensure!(code == 1 && err.contains("403"), "{code} {err}");

    // Revocation takes effect on the next request.
    let (code, out, err) = berthctl(&f, TOKEN, &["admin", "keys", "revoke", &key_id]).await?;
    ensure!(code == 0 && out.contains("revoked_at"), "{out}\n{err}");
    let (status, v) = call(&f, Some(&key), Method::GET, "/v1/runners", None).await?;
    ensure!(status == 401, "a revoked key still works: {status} {v}");

    // Neither plaintext key nor secret is in any file the fleet wrote (store, logs).
    let mut files = vec![];
    files_under(f.dir.path(), &mut files)?;
    ensure!(
        files.iter().any(|(p, _)| p.ends_with("state.redb")),
        "no store file among {:?}",
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, bytes) in &files {
        for s in [&secret, other.rsplit('_').next().unwrap_or(&other)] {
            ensure!(!contains(bytes, s.as_bytes()), "a key secret is in {path}");
        }
    }
    Ok(())
}

/// A control call to the scheduler as the API makes it (admin, project `default`), presenting
/// `cluster_token` if any.
fn list_nodes_call(
    cluster_token: Option<&str>,
) -> Result<tonic::Request<berth_proto::v1::ListNodesRequest>> {
    let mut req = tonic::Request::new(berth_proto::v1::ListNodesRequest::default());
    let md = req.metadata_mut();
    md.insert("x-berth-project", "default".parse()?);
    md.insert("x-berth-admin", "true".parse()?);
    if let Some(t) = cluster_token {
        md.insert("x-berth-cluster-token", t.parse()?);
    }
    Ok(req)
}

/// The scheduler's control service serves only holders of the cluster token (the API): a
/// control call without it (or with a wrong one) is refused however admin its metadata claims
/// to be. (Agents authenticate with node credentials: `node_identity.rs`.)
#[tokio::test]
async fn the_scheduler_serves_only_holders_of_the_cluster_token() -> Result<()> {
    use berth_proto::v1::control_service_client::ControlServiceClient;
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.scheduler_addr))?
        .connect()
        .await?;
    let mut control = ControlServiceClient::new(channel);
    for token in [None, Some("not-the-cluster-token-at-all")] {
        let refused = control.list_nodes(list_nodes_call(token)?).await;
        ensure!(
            matches!(&refused, Err(s) if s.code() == tonic::Code::Unauthenticated),
            "token {token:?}: {refused:?}"
        );
    }
    let nodes = control
        .list_nodes(list_nodes_call(Some(CLUSTER_TOKEN))?)
        .await?
        .into_inner();
    ensure!(nodes.nodes.len() == 1, "{nodes:?}");

    Ok(())
}
