//! Runners over HTTP: create, list, patch, delete in Nodion's shape; bad bodies answered with
//! a 4xx naming the field.

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn runner_crud_in_nodions_shape() -> Result<()> {
    let f = Api::start().await?;
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
    let f = Api::start().await?;
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
    // A body is an object: serde would read `[]` as a struct of its defaults.
    for path in [
        "/v1/runners",
        "/v1/runners/nonexistent/warmup",
        "/v1/runners/nonexistent/runs",
    ] {
        for body in [json!([]), json!([0]), json!(5)] {
            let (status, res) = f.request(Method::POST, path, Some(body.clone())).await?;
            ensure!(
                status == 400 && res["errors"][0]["field"] == "body",
                "{path} {body}: {status} {res}"
            );
        }
    }
    Ok(())
}
