//! End-to-end: auth by project against real scheduler, API, agent and `berthctl` processes.
//! The admin token creates API keys for projects `alpha` and `beta` (over REST and with
//! `berthctl admin keys create`); each key sees only its project's runners, runs, logs,
//! registries and usage (another project's ids → 404); missing, malformed, wrong and revoked
//! keys → 401; project keys on nodes and admin routes → 403; the plaintext key is stored
//! nowhere.

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

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
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

#[tokio::test]
async fn a_project_key_sees_only_its_projects_records() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (_, alpha) = create_key_rest(&f, "alpha", "alpha-ci").await?;
    let (_, beta) = create_key_cli(&f, "beta", "beta-ci").await?;
    let (a, b) = (Some(alpha.as_str()), Some(beta.as_str()));

    // alpha: a registry, a runner, a run (with an idempotency key) that prints a line.
    let (status, reg) = call(
        &f,
        a,
        Method::POST,
        "/v1/container_registries",
        Some(json!({"name": "alpha-reg", "host": "127.0.0.1:5002",
                    "username": "u", "password": "alpha-registry-pass"})),
    )
    .await?;
    ensure!(status == 201, "{status} {reg}");
    let reg_id = reg["container_registry"]["id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let runner_body = json!({
        "name": "alpha-runner", "image_name": "busybox", "image_tag": "latest",
        "run_command": "echo alpha-was-here", "region": "fra",
        "instance_type": "standard-s", "timeout_seconds": 60,
    });
    let (status, runner) = call(
        &f,
        a,
        Method::POST,
        "/v1/runners",
        Some(runner_body.clone()),
    )
    .await?;
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

    // alpha sees its own.
    let r = format!("/v1/runners/{runner_id}");
    let run_path = format!("{r}/runs/{run_id}");
    let (status, logs) = call(&f, a, Method::GET, &format!("{run_path}/logs"), None).await?;
    ensure!(
        status == 200 && logs["logs"][0]["msg"] == "alpha-was-here",
        "{status} {logs}"
    );
    let (_, list) = call(&f, a, Method::GET, "/v1/runners", None).await?;
    ensure!(ids(&list["runners"]) == [runner_id.clone()], "{list}");
    let (_, list) = call(&f, a, Method::GET, "/v1/container_registries", None).await?;
    ensure!(
        ids(&list["container_registries"]) == [reg_id.clone()],
        "{list}"
    );
    let (_, usage) = call(&f, a, Method::GET, "/v1/usage", None).await?;
    ensure!(usage["usage"][0]["key"] == runner_id.as_str(), "{usage}");
    let (status, replay) =
        call_with(&f, a, Method::POST, &format!("{r}/runs"), None, &idem).await?;
    ensure!(
        status == 200 && replay["run"]["id"] == run_id.as_str(),
        "{status} {replay}"
    );

    // beta: every one of alpha's ids is not found, whatever the method.
    let not_found: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, r.clone(), None),
        (Method::PATCH, r.clone(), Some(json!({"name": "stolen"}))),
        (Method::DELETE, r.clone(), None),
        (Method::GET, format!("{r}/runs"), None),
        (Method::POST, format!("{r}/runs"), None),
        (
            Method::POST,
            format!("{r}/runs/batch"),
            Some(json!({"runs": [{}]})),
        ),
        (Method::POST, format!("{r}/warmup"), None),
        (Method::GET, run_path.clone(), None),
        (Method::POST, format!("{run_path}/stop"), None),
        (Method::GET, format!("{run_path}/logs"), None),
        (Method::GET, format!("{run_path}/logs/stream"), None),
        (
            Method::GET,
            format!("/v1/container_registries/{reg_id}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/container_registries/{reg_id}"),
            None,
        ),
    ];
    for (method, path, body) in not_found {
        let (status, v) = call(&f, b, method.clone(), &path, body).await?;
        ensure!(status == 404, "beta {method} {path}: {status} {v}");
        ensure!(v["code"] == "not_found", "{v}");
    }
    // The idempotency key alpha used, on alpha's runner: not alpha's run.
    let (status, v) = call_with(&f, b, Method::POST, &format!("{r}/runs"), None, &idem).await?;
    ensure!(status == 404, "beta replaying alpha's key: {status} {v}");
    // beta's runner cannot name alpha's registry: to beta it does not exist.
    let mut borrowing = runner_body.clone();
    borrowing["container_registry_id"] = json!(reg_id);
    let (status, v) = call(&f, b, Method::POST, "/v1/runners", Some(borrowing)).await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "container_registry_id",
        "{status} {v}"
    );
    // Nothing of alpha's in beta's lists or usage.
    let (_, list) = call(&f, b, Method::GET, "/v1/runners", None).await?;
    ensure!(ids(&list["runners"]).is_empty(), "{list}");
    let (_, list) = call(&f, b, Method::GET, "/v1/container_registries", None).await?;
    ensure!(ids(&list["container_registries"]).is_empty(), "{list}");
    let (_, usage) = call(&f, b, Method::GET, "/v1/usage", None).await?;
    ensure!(
        usage["usage"] == json!([]) && usage["total"]["billed_seconds"] == 0,
        "{usage}"
    );
    // The same idempotency key in beta's own runner creates beta's own run.
    let (status, own) = call(&f, b, Method::POST, "/v1/runners", Some(runner_body)).await?;
    ensure!(status == 201, "{status} {own}");
    let beta_runner = own["runner"]["id"].as_str().unwrap_or("").to_owned();
    let (status, beta_run) = call_with(
        &f,
        b,
        Method::POST,
        &format!("/v1/runners/{beta_runner}/runs"),
        None,
        &idem,
    )
    .await?;
    ensure!(
        status == 201,
        "not a replay of alpha's run: {status} {beta_run}"
    );
    ensure!(beta_run["run"]["id"] != run_id.as_str(), "{beta_run}");
    // And alpha does not see beta's runner; the admin token (project `default`) sees neither.
    let (status, _) = call(
        &f,
        a,
        Method::GET,
        &format!("/v1/runners/{beta_runner}"),
        None,
    )
    .await?;
    ensure!(status == 404, "alpha sees beta's runner: {status}");
    let (_, list) = call(&f, Some(TOKEN), Method::GET, "/v1/runners", None).await?;
    ensure!(ids(&list["runners"]).is_empty(), "{list}");
    let (status, _) = call(&f, a, Method::GET, &r, None).await?;
    ensure!(
        status == 200,
        "alpha lost its runner after beta's attempts: {status}"
    );

    // Project keys: catalog yes; nodes and admin routes no (403, the standard error body).
    for path in ["/v1/regions", "/v1/instance_types"] {
        let (status, v) = call(&f, a, Method::GET, path, None).await?;
        ensure!(status == 200, "{path}: {status} {v}");
    }
    let node = f.node("fra").to_owned();
    let forbidden: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/nodes".into(), None),
        (Method::POST, format!("/v1/nodes/{node}/drain"), None),
        (Method::POST, format!("/v1/nodes/{node}/resume"), None),
        (Method::GET, "/v1/admin/api_keys".into(), None),
        (
            Method::POST,
            "/v1/admin/api_keys".into(),
            Some(json!({"project": "alpha"})),
        ),
        (
            Method::DELETE,
            "/v1/admin/api_keys/0123456789abcdef".into(),
            None,
        ),
    ];
    for (method, path, body) in forbidden {
        let (status, v) = call(&f, a, method.clone(), &path, body).await?;
        ensure!(status == 403, "alpha {method} {path}: {status} {v}");
        ensure!(
            v["code"] == "forbidden" && v["errors"][0]["field"] == "authorization",
            "{v}"
        );
    }
    let (status, v) = call(&f, Some(TOKEN), Method::GET, "/v1/nodes", None).await?;
    ensure!(
        status == 200 && v["nodes"].as_array().is_some_and(|n| n.len() == 1),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn missing_wrong_and_revoked_keys_are_refused_and_no_key_is_stored() -> Result<()> {
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

    let wrong_secret = format!("berth_{key_id}_{}", "0".repeat(64));
    let other_secret = format!("berth_{key_id}_{}", other.rsplit('_').next().unwrap_or(""));
    let unknown_id = format!("berth_{}_{secret}", "f".repeat(16));
    let refused: Vec<Option<&str>> = vec![
        None,
        Some("garbage"),
        Some("berth_"),
        Some(wrong_secret.as_str()),
        Some(other_secret.as_str()),
        Some(unknown_id.as_str()),
        Some(&key[..key.len() - 1]),
    ];
    for token in refused {
        let res = {
            let mut req = f.http.get(format!("{}/v1/runners", f.api_url));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await?
        };
        ensure!(res.status() == 401, "{token:?}: {}", res.status());
        let challenge = res
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        ensure!(challenge.as_deref() == Some("Bearer"), "{challenge:?}");
        let v: Value = res.json().await?;
        ensure!(
            v["code"] == "unauthorized" && v["errors"][0]["field"] == "authorization",
            "{v}"
        );
    }
    // Not a bearer header at all.
    let res = f
        .http
        .get(format!("{}/v1/runners", f.api_url))
        .header("Authorization", format!("Basic {key}"))
        .send()
        .await?;
    ensure!(res.status() == 401, "{}", res.status());

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
    // Bad project names are field errors.
    let (status, v) = call(
        &f,
        Some(TOKEN),
        Method::POST,
        "/v1/admin/api_keys",
        Some(json!({"project": "Not_Valid"})),
    )
    .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "project",
        "{status} {v}"
    );

    // Revocation takes effect on the next request.
    let (code, out, err) = berthctl(&f, TOKEN, &["admin", "keys", "revoke", &key_id]).await?;
    ensure!(code == 0 && out.contains("revoked_at"), "{out}\n{err}");
    let (status, v) = call(&f, Some(&key), Method::GET, "/v1/runners", None).await?;
    ensure!(status == 401, "a revoked key still works: {status} {v}");
    let (_, list) = call(&f, Some(TOKEN), Method::GET, "/v1/admin/api_keys", None).await?;
    let revoked = list["api_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["key_id"] == key_id.as_str())
        .cloned()
        .unwrap_or_default();
    ensure!(revoked["revoked_at"].is_string(), "{list}");
    let (status, _) = call(&f, Some(&other), Method::GET, "/v1/runners", None).await?;
    ensure!(status == 200, "revoking one key revoked another: {status}");
    let (status, v) = call(
        &f,
        Some(TOKEN),
        Method::DELETE,
        "/v1/admin/api_keys/ffffffffffffffff",
        None,
    )
    .await?;
    ensure!(
        status == 404 && v["errors"][0]["field"] == "key_id",
        "{status} {v}"
    );

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

/// Kills the process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scheduler's gRPC port serves only holders of the cluster token: a control call without
/// it (or with a wrong one) is refused however admin its metadata claims to be, and an agent
/// with a wrong token never becomes a node (so it can never be sent a run and its secrets).
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

    let rogue_id = format!("{}-rogue", f.node("fra"));
    let log = std::fs::File::create(f.dir.path().join("rogue-agent.log"))?;
    let _rogue = Killed(
        std::process::Command::new(f.env.bin_dir.join("berth-node-agent"))
            .args([
                "--scheduler",
                &format!("http://{}", f.scheduler_addr),
                "--node-id",
                &rogue_id,
                "--region",
                "fra",
                "--memory-mib",
                "1024",
                "--cpus",
                "1",
                "--network",
                "none",
                "--containerd-socket",
                &f.env.containerd_socket,
                "--state-dir",
                &f.dir.path().join("rogue-state").to_string_lossy(),
                "--cluster-token",
                "a-guessed-cluster-token",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    // Its first attempts are refused; it keeps retrying and never shows up as a node.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refusals = String::new();
    while Instant::now() < deadline {
        let listed = f.get("/v1/nodes").await?;
        ensure!(
            !listed.to_string().contains(&rogue_id),
            "a node with a wrong cluster token registered: {listed}"
        );
        refusals = std::fs::read_to_string(f.dir.path().join("rogue-agent.log"))?;
        if refusals.contains("cluster token") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        refusals.contains("cluster token"),
        "the rogue agent was not told why: {refusals}"
    );
    Ok(())
}
