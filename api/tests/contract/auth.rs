//! Authentication and project scoping over HTTP, with API keys made through the admin routes.

use crate::harness::{Api, TOKEN};
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn requests_without_the_token_are_refused() -> Result<()> {
    let f = Api::start().await?;
    let res = f
        .http
        .get(format!("{}/v1/runners", f.api_url))
        .send()
        .await?;
    ensure!(res.status() == 401, "{}", res.status());
    let res = f
        .http
        .get(format!("{}/v1/runners", f.api_url))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await?;
    ensure!(res.status() == 401);
    let body: serde_json::Value = res.json().await?;
    ensure!(body["errors"][0]["field"] == "authorization", "{body}");
    Ok(())
}

/// `POST /v1/admin/api_keys` with the admin token: (key id, plaintext key).
async fn create_key(f: &Api, project: &str, name: &str) -> Result<(String, String)> {
    let (status, v) = f
        .request(
            Method::POST,
            "/v1/admin/api_keys",
            Some(json!({ "project": project, "name": name })),
        )
        .await?;
    ensure!(status == 201, "{status} {v}");
    ensure!(v["api_key"]["project"] == project, "{v}");
    ensure!(v["api_key"]["revoked_at"].is_null(), "{v}");
    let key = v["key"].as_str().unwrap_or_default().to_owned();
    let id = v["api_key"]["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(key.starts_with(&format!("berth_{id}_")), "{key} {id}");
    Ok((id, key))
}

/// `call` with extra headers.
async fn call_with(
    f: &Api,
    key: Option<&str>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Value)> {
    let mut req = f.http.request(method, format!("{}{path}", f.api_url));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

/// Each project key sees only its project's runners, runs and registries: another project's
/// ids are 404 whatever the method, its idempotency keys are its own, and project keys get 403
/// on nodes and admin routes. (Logs and usage of a finished run: the end-to-end `auth` test.)
#[tokio::test]
async fn a_project_key_sees_only_its_projects_records() -> Result<()> {
    let f = Api::start().await?;
    let (_, alpha) = create_key(&f, "alpha", "alpha-ci").await?;
    let (_, beta) = create_key(&f, "beta", "beta-ci").await?;
    let (a, b) = (Some(alpha.as_str()), Some(beta.as_str()));

    // alpha: a registry, a runner, a run (with an idempotency key); no node, so it waits.
    let (status, reg) = f
        .call(
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
    let (status, runner) = f
        .call(a, Method::POST, "/v1/runners", Some(runner_body.clone()))
        .await?;
    ensure!(status == 201, "{status} {runner}");
    let runner_id = runner["runner"]["id"].as_str().unwrap_or("").to_owned();
    let r = format!("/v1/runners/{runner_id}");
    let idem = [("Idempotency-Key", "shared-key-1")];
    let (status, run) = call_with(&f, a, Method::POST, &format!("{r}/runs"), &idem).await?;
    ensure!(status == 201, "{status} {run}");
    let run_id = run["run"]["id"].as_str().unwrap_or("").to_owned();
    let run_path = format!("{r}/runs/{run_id}");

    // alpha sees its own.
    let (_, list) = f.call(a, Method::GET, "/v1/runners", None).await?;
    ensure!(ids(&list["runners"]) == [runner_id.clone()], "{list}");
    let (_, list) = f
        .call(a, Method::GET, "/v1/container_registries", None)
        .await?;
    ensure!(
        ids(&list["container_registries"]) == [reg_id.clone()],
        "{list}"
    );
    let (status, v) = f.call(a, Method::GET, &run_path, None).await?;
    ensure!(status == 200 && v["run"]["id"] == run_id.as_str(), "{v}");
    let (status, replay) = call_with(&f, a, Method::POST, &format!("{r}/runs"), &idem).await?;
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
        let (status, v) = f.call(b, method.clone(), &path, body).await?;
        ensure!(status == 404, "beta {method} {path}: {status} {v}");
        ensure!(v["code"] == "not_found", "{v}");
    }
    // The idempotency key alpha used, on alpha's runner: not alpha's run.
    let (status, v) = call_with(&f, b, Method::POST, &format!("{r}/runs"), &idem).await?;
    ensure!(status == 404, "beta replaying alpha's key: {status} {v}");
    // beta's runner cannot name alpha's registry: to beta it does not exist.
    let mut borrowing = runner_body.clone();
    borrowing["container_registry_id"] = json!(reg_id);
    let (status, v) = f
        .call(b, Method::POST, "/v1/runners", Some(borrowing))
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "container_registry_id",
        "{status} {v}"
    );
    // Nothing of alpha's in beta's lists or usage.
    let (_, list) = f.call(b, Method::GET, "/v1/runners", None).await?;
    ensure!(ids(&list["runners"]).is_empty(), "{list}");
    let (_, list) = f
        .call(b, Method::GET, "/v1/container_registries", None)
        .await?;
    ensure!(ids(&list["container_registries"]).is_empty(), "{list}");
    let (_, usage) = f.call(b, Method::GET, "/v1/usage", None).await?;
    ensure!(
        usage["usage"] == json!([]) && usage["total"]["billed_seconds"] == 0,
        "{usage}"
    );
    // The same idempotency key in beta's own runner creates beta's own run.
    let (status, own) = f
        .call(b, Method::POST, "/v1/runners", Some(runner_body))
        .await?;
    ensure!(status == 201, "{status} {own}");
    let beta_runner = own["runner"]["id"].as_str().unwrap_or("").to_owned();
    let (status, beta_run) = call_with(
        &f,
        b,
        Method::POST,
        &format!("/v1/runners/{beta_runner}/runs"),
        &idem,
    )
    .await?;
    ensure!(
        status == 201,
        "not a replay of alpha's run: {status} {beta_run}"
    );
    ensure!(beta_run["run"]["id"] != run_id.as_str(), "{beta_run}");
    // And alpha does not see beta's runner; the admin token (project `default`) sees neither.
    let (status, _) = f
        .call(a, Method::GET, &format!("/v1/runners/{beta_runner}"), None)
        .await?;
    ensure!(status == 404, "alpha sees beta's runner: {status}");
    let (_, list) = f
        .call(Some(TOKEN), Method::GET, "/v1/runners", None)
        .await?;
    ensure!(ids(&list["runners"]).is_empty(), "{list}");
    let (status, _) = f.call(a, Method::GET, &r, None).await?;
    ensure!(
        status == 200,
        "alpha lost its runner after beta's attempts: {status}"
    );

    // Project keys: catalog yes; nodes and admin routes no (403, the standard error body).
    for path in ["/v1/regions", "/v1/instance_types"] {
        let (status, v) = f.call(a, Method::GET, path, None).await?;
        ensure!(status == 200, "{path}: {status} {v}");
    }
    let forbidden: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/nodes".into(), None),
        (Method::POST, "/v1/nodes/some-node/drain".into(), None),
        (Method::POST, "/v1/nodes/some-node/resume".into(), None),
        (Method::DELETE, "/v1/nodes/some-node".into(), None),
        (
            Method::DELETE,
            "/v1/nodes/some-node?force=true".into(),
            None,
        ),
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
        let (status, v) = f.call(a, method.clone(), &path, body).await?;
        ensure!(status == 403, "alpha {method} {path}: {status} {v}");
        ensure!(
            v["code"] == "forbidden" && v["errors"][0]["field"] == "authorization",
            "{v}"
        );
    }
    let (status, v) = f.call(Some(TOKEN), Method::GET, "/v1/nodes", None).await?;
    ensure!(status == 200 && v["nodes"] == json!([]), "{status} {v}");
    Ok(())
}

/// Missing, malformed, wrong and revoked keys: 401 with `WWW-Authenticate: Bearer` and the
/// standard error body naming `authorization`; revoking one key leaves the others working.
#[tokio::test]
async fn missing_wrong_and_revoked_keys_are_refused() -> Result<()> {
    let f = Api::start().await?;
    let (key_id, key) = create_key(&f, "alpha", "short-lived").await?;
    let (_, other) = create_key(&f, "beta", "other").await?;
    let secret = key.rsplit('_').next().unwrap_or_default().to_owned();
    let (status, _) = f.call(Some(&key), Method::GET, "/v1/runners", None).await?;
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
        let mut req = f.http.get(format!("{}/v1/runners", f.api_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
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

    // Bad project names are field errors.
    let (status, v) = f
        .request(
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
    let (status, v) = f
        .request(
            Method::DELETE,
            &format!("/v1/admin/api_keys/{key_id}"),
            None,
        )
        .await?;
    ensure!(
        status == 200 && v["api_key"]["revoked_at"].is_string(),
        "{status} {v}"
    );
    let (status, v) = f.call(Some(&key), Method::GET, "/v1/runners", None).await?;
    ensure!(status == 401, "a revoked key still works: {status} {v}");
    let (status, _) = f
        .call(Some(&other), Method::GET, "/v1/runners", None)
        .await?;
    ensure!(status == 200, "revoking one key revoked another: {status}");
    let (status, v) = f
        .request(Method::DELETE, "/v1/admin/api_keys/ffffffffffffffff", None)
        .await?;
    ensure!(
        status == 404 && v["errors"][0]["field"] == "key_id",
        "{status} {v}"
    );
    Ok(())
}
