//! Every documented limit through HTTP, on both sides of each boundary.

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

/// `(status, the fields its errors name)`.
async fn answer(
    f: &Api,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, Vec<String>)> {
    let (status, res) = f.request(method, path, body).await?;
    let fields = res["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str().map(str::to_owned))
        .collect();
    Ok((status, fields))
}

fn merged(base: &serde_json::Value, patch: serde_json::Value) -> serde_json::Value {
    let mut body = base.clone();
    if let (Some(b), Some(p)) = (body.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                b.remove(k);
            } else {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    body
}

/// Every documented limit through HTTP, on both sides: the good side is created (201), the bad
/// side is a 4xx whose errors name exactly the field.
#[tokio::test]
async fn every_limit_holds_through_http_on_both_sides() -> Result<()> {
    let f = Api::start().await?;
    let good = json!({"name": "limits", "image_name": "busybox", "image_tag": "latest",
        "run_command": "echo hi", "region": "fra", "instance_type": "standard-s"});
    let x = |n: usize| "x".repeat(n);
    let argv = |n: usize, each: usize| vec!["a".repeat(each); n];
    let mut argv_8001 = argv(199, 40);
    argv_8001.push("a".repeat(41));
    let none = serde_json::Value::Null;
    let runner_cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"name": "ab"}), 422, "name"),
        (json!({"name": "abc"}), 201, ""),
        (json!({"name": x(50)}), 201, ""),
        (json!({"name": x(51)}), 422, "name"),
        (json!({"image_name": none}), 422, "image_name"),
        (json!({"image_name": ""}), 422, "image_name"),
        (json!({"image_name": "Busy Box"}), 422, "image_name"),
        (json!({"image_tag": none}), 422, "image_tag"),
        (json!({"image_tag": "-x"}), 422, "image_tag"),
        (json!({"image_tag": x(128)}), 201, ""),
        (json!({"image_tag": x(129)}), 422, "image_tag"),
        (json!({"run_command": x(1_000)}), 201, ""),
        (json!({"run_command": x(1_001)}), 422, "run_command"),
        (json!({"run_command": none, "argv": argv(200, 1)}), 201, ""),
        (
            json!({"run_command": none, "argv": argv(201, 1)}),
            422,
            "argv",
        ),
        (json!({"run_command": none, "argv": argv(200, 40)}), 201, ""),
        (json!({"run_command": none, "argv": argv_8001}), 422, "argv"),
        (json!({"argv": ["echo"]}), 422, "argv"),
        (json!({"entrypoint": x(500)}), 201, ""),
        (json!({"entrypoint": x(501)}), 422, "entrypoint"),
        (json!({"timeout_seconds": 0}), 422, "timeout_seconds"),
        (json!({"timeout_seconds": 1}), 201, ""),
        (json!({"timeout_seconds": 86_400}), 201, ""),
        (json!({"timeout_seconds": 86_401}), 422, "timeout_seconds"),
        (
            json!({"env_variables": [{"env_key": "_ok_1", "env_val": ""}]}),
            201,
            "",
        ),
        (
            json!({"env_variables": [{"env_key": "1X", "env_val": ""}]}),
            422,
            "env_variables[0].env_key",
        ),
        (
            json!({"env_variables": [{"env_key": "A-B", "env_val": ""}]}),
            422,
            "env_variables[0].env_key",
        ),
        (json!({"surprise": 1}), 400, "surprise"),
    ];
    for (patch, want_status, want_field) in runner_cases {
        let body = merged(&good, patch.clone());
        let (status, fields) = answer(&f, Method::POST, "/v1/runners", Some(body)).await?;
        let want: Vec<&str> = if want_field.is_empty() {
            vec![]
        } else {
            vec![want_field]
        };
        ensure!(
            status == want_status && fields == want,
            "POST /v1/runners {}: {status} {fields:?}",
            &patch.to_string()[..patch.to_string().len().min(80)]
        );
    }
    // The default timeout.
    let runner = f.post("/v1/runners", good.clone()).await?;
    ensure!(runner["runner"]["timeout_seconds"] == 3_600, "{runner}");
    let id = runner["runner"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let runs = format!("/v1/runners/{id}/runs");
    let run_cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"command": x(4_000)}), 201, ""),
        (json!({"command": x(4_001)}), 422, "command"),
        (json!({"argv": argv(200, 1)}), 201, ""),
        (json!({"argv": argv(201, 1)}), 422, "argv"),
        (json!({"argv": argv(200, 40)}), 201, ""),
        (
            json!({"argv": argv(199, 40).into_iter().chain([x(41)]).collect::<Vec<_>>()}),
            422,
            "argv",
        ),
        (json!({"argv": ["echo"], "command": "echo"}), 422, "argv"),
        (json!({"entrypoint": x(500)}), 201, ""),
        (json!({"entrypoint": x(501)}), 422, "entrypoint"),
        (
            json!({"env_variables": [{"env_key": "BAD KEY", "env_val": "v"}]}),
            422,
            "env_variables[0].env_key",
        ),
        (json!({"cmd": "echo"}), 400, "cmd"),
    ];
    for (body, want_status, want_field) in run_cases {
        let (status, fields) = answer(&f, Method::POST, &runs, Some(body.clone())).await?;
        let want: Vec<&str> = if want_field.is_empty() {
            vec![]
        } else {
            vec![want_field]
        };
        ensure!(
            status == want_status && fields == want,
            "POST runs {}: {status} {fields:?}",
            &body.to_string()[..body.to_string().len().min(80)]
        );
    }

    // Unknown fields on every other body: PATCH, batch (and its items), registries; and in
    // query strings. Each a JSON 400 naming the field.
    let others = [
        (
            Method::PATCH,
            format!("/v1/runners/{id}"),
            Some(json!({"nme": "x"})),
            400,
            "nme",
        ),
        (
            Method::PATCH,
            format!("/v1/runners/{id}"),
            Some(json!({"run_command": "echo", "argv": ["echo"]})),
            422,
            "argv",
        ),
        (
            Method::POST,
            format!("{runs}/batch"),
            Some(json!({"items": []})),
            400,
            "items",
        ),
        (
            Method::POST,
            format!("{runs}/batch"),
            Some(json!({"runs": [{"x": 1}]})),
            400,
            "runs[0].x",
        ),
        (
            Method::POST,
            format!("{runs}/batch"),
            Some(json!({"runs": [{}, {"command": x(4_001)}]})),
            422,
            "runs[1].command",
        ),
        (
            Method::POST,
            "/v1/container_registries".to_owned(),
            Some(
                json!({"name": "abc", "host": "127.0.0.1:1", "username": "u", "password": "p",
                "pasword": "p"}),
            ),
            400,
            "pasword",
        ),
        (
            Method::GET,
            "/v1/usage?group=day".to_owned(),
            None,
            400,
            "group",
        ),
        (
            Method::GET,
            format!("{runs}/no-such-run/logs?after_id=9223372036854775808"),
            None,
            422,
            "after_id",
        ),
        (
            Method::GET,
            format!("{runs}/no-such-run/logs?after_id=-1"),
            None,
            422,
            "after_id",
        ),
        (
            Method::GET,
            format!("{runs}/no-such-run/logs?limit=1001"),
            None,
            422,
            "limit",
        ),
        (
            Method::GET,
            "/v1/usage?from=yesterday".to_owned(),
            None,
            422,
            "from",
        ),
        (Method::PUT, "/v1/runners".to_owned(), None, 405, "method"),
    ];
    for (method, path, body, want_status, want_field) in others {
        let (status, fields) = answer(&f, method.clone(), &path, body).await?;
        ensure!(
            status == want_status && fields == vec![want_field],
            "{method} {path}: {status} {fields:?}"
        );
    }
    Ok(())
}
