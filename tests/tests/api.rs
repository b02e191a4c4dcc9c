//! End-to-end checks of the REST API's contract that need no container: auth, validation
//! errors naming fields, 404s, runner CRUD, and stopping a pending run.

mod common;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn requests_without_the_token_are_refused() -> Result<()> {
    let f = Fleet::start(&[]).await?;
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

#[tokio::test]
async fn runner_crud_in_nodions_shape() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let (status, created) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(json!({
                "name": "migrate-db", "image_name": "busybox", "image_tag": "latest",
                "run_command": "echo migrate", "region": "fra", "instance_type": "standard-s",
                "env_variables": [{"env_key": "DB", "env_val": "postgres"}],
            })),
        )
        .await?;
    ensure!(status == 201, "{status} {created}");
    let r = &created["runner"];
    for field in [
        "id",
        "name",
        "image_name",
        "image_tag",
        "run_command",
        "argv",
        "entrypoint",
        "timeout_seconds",
        "region",
        "instance_type",
        "env_variables",
        "warmed_at",
        "created_at",
        "updated_at",
    ] {
        ensure!(r.get(field).is_some(), "runner lacks {field}: {r}");
    }
    ensure!(r["timeout_seconds"] == 3600, "the default timeout: {r}");
    let id = r["id"].as_str().unwrap_or_default().to_owned();
    let list = f.get("/v1/runners").await?;
    ensure!(
        list["runners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["id"] == id.as_str())),
        "{list}"
    );
    let (status, patched) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{id}"),
            Some(json!({"argv": ["echo", "x"], "timeout_seconds": 5})),
        )
        .await?;
    ensure!(status == 200, "{status} {patched}");
    ensure!(
        patched["runner"]["argv"] == json!(["echo", "x"])
            && patched["runner"]["run_command"].is_null(),
        "{patched}"
    );
    ensure!(
        patched["runner"]["timeout_seconds"] == 5 && patched["runner"]["name"] == "migrate-db",
        "{patched}"
    );
    let (status, _) = f
        .request(Method::DELETE, &format!("/v1/runners/{id}"), None)
        .await?;
    ensure!(status == 204, "{status}");
    let (status, body) = f
        .request(Method::GET, &format!("/v1/runners/{id}"), None)
        .await?;
    ensure!(
        status == 404 && body["errors"][0]["field"] == "runner_id",
        "{status} {body}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_field() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let good = json!({"name": "abc", "image_name": "busybox", "image_tag": "latest", "region": "fra", "instance_type": "standard-s"});
    let cases = [
        (json!({"name": "ab"}), 422, "name"),
        (json!({"region": "mars"}), 422, "region"),
        (json!({"instance_type": "huge"}), 422, "instance_type"),
        (json!({"timeout_seconds": 0}), 422, "timeout_seconds"),
        (json!({"timeout_seconds": 86401}), 422, "timeout_seconds"),
        (json!({"image_name": "Not Valid"}), 422, "image_name"),
        (
            json!({"run_command": "echo", "argv": ["echo"]}),
            422,
            "argv",
        ),
        (
            json!({"env_variables": [{"env_key": "1X", "env_val": ""}]}),
            422,
            "env_variables[0].env_key",
        ),
        (json!({"name": 5}), 400, "name"),
        (json!({"surprise": true}), 400, "surprise"),
    ];
    for (patch, want_status, want_field) in cases {
        let mut body = good.clone();
        if let (Some(b), Some(p)) = (body.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, res) = f.request(Method::POST, "/v1/runners", Some(body)).await?;
        ensure!(status == want_status, "{patch}: status {status} {res}");
        let fields: Vec<&str> = res["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["field"].as_str())
            .collect();
        ensure!(fields.contains(&want_field), "{patch}: fields {fields:?}");
    }
    let (status, res) = f
        .request(Method::POST, "/v1/runners", Some(json!({})))
        .await?;
    ensure!(
        status == 422 && res["errors"].as_array().is_some_and(|e| e.len() == 5),
        "all required fields named: {res}"
    );
    let (status, _) = f
        .request(
            Method::GET,
            "/v1/runners/nonexistent/runs/also-missing",
            None,
        )
        .await?;
    ensure!(status == 404);
    let (status, _) = f
        .request(
            Method::POST,
            "/v1/runners/nonexistent/runs",
            Some(json!({})),
        )
        .await?;
    ensure!(status == 404);
    Ok(())
}

#[tokio::test]
async fn a_pending_run_can_be_stopped_and_says_why_it_waits() -> Result<()> {
    // One ams node only: a fra run can never be placed.
    let f = Fleet::start(&[AgentSpec::new("ams")]).await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo never"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.run(&runner, &run).await?;
    ensure!(
        r["status"] == "pending" && r["pending_reason"] == "no node in fra is registered",
        "{r}"
    );
    let stopped = f
        .post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    ensure!(
        stopped["run"]["status"] == "canceled" && stopped["run"]["started_at"].is_null(),
        "{stopped}"
    );
    let runs = f.get(&format!("/v1/runners/{runner}/runs")).await?;
    ensure!(
        runs["runs"]
            .as_array()
            .is_some_and(|l| l.len() == 1 && l[0]["status"] == "canceled"),
        "{runs}"
    );
    Ok(())
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_post_return_the_same_run() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let runner = f.runner("fra", json!({"run_command": "echo once"})).await?;
    let post = |key: &'static str| {
        f.http
            .post(format!("{}/v1/runners/{runner}/runs", f.api_url))
            .bearer_auth(common::TOKEN)
            .header("Idempotency-Key", key)
            .json(&json!({}))
            .send()
    };
    let first = post("order-42").await?;
    ensure!(first.status() == 201, "{}", first.status());
    let first: serde_json::Value = first.json().await?;
    let again = post("order-42").await?;
    ensure!(again.status() == 200, "{}", again.status());
    ensure!(again
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true"));
    let again: serde_json::Value = again.json().await?;
    ensure!(
        again["run"]["id"] == first["run"]["id"],
        "{first} vs {again}"
    );
    let other: serde_json::Value = post("order-43").await?.json().await?;
    ensure!(other["run"]["id"] != first["run"]["id"]);
    let runs = f.get(&format!("/v1/runners/{runner}/runs")).await?;
    ensure!(runs["runs"].as_array().map(Vec::len) == Some(2), "{runs}");
    let bad = post("has space").await?;
    ensure!(bad.status() == 422);
    let body: serde_json::Value = bad.json().await?;
    ensure!(body["errors"][0]["field"] == "Idempotency-Key", "{body}");
    Ok(())
}
