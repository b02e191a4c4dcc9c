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

/// `(status, the fields its errors name)`.
async fn answer(
    f: &Fleet,
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
    let f = Fleet::start(&[]).await?;
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

/// The document is served without the token and lists the routes clients use.
#[tokio::test]
async fn the_openapi_document_is_served_without_the_token() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let res = f
        .http
        .get(format!("{}/v1/openapi.json", f.api_url))
        .send()
        .await?;
    ensure!(res.status() == 200, "{}", res.status());
    let doc: serde_json::Value = res.json().await?;
    ensure!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    for (path, method) in [
        ("/v1/runners", "post"),
        ("/v1/runners/{id}/runs", "post"),
        ("/v1/runners/{id}/runs/{run_id}/logs/stream", "get"),
    ] {
        ensure!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    Ok(())
}

/// A runner's runs come in pages, oldest first: `limit` (1 to 1,000, default 100) and `after`
/// (the previous page's `next_after`, `null` on the last page).
#[tokio::test]
async fn runs_are_listed_in_pages_oldest_first() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    // No node in ams: the runs wait, which is all a listing needs.
    let runner = f.runner("ams", json!({})).await?;
    let created = f
        .post(
            &format!("/v1/runners/{runner}/runs/batch"),
            json!({"runs": [{}, {}, {}, {}, {}]}),
        )
        .await?;
    let mut want: Vec<String> = created["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    want.sort(); // ids order by creation
    ensure!(want.len() == 5, "{created}");

    let base = format!("/v1/runners/{runner}/runs");
    let all = f.get(&base).await?;
    ensure!(all["next_after"].is_null(), "{all}");
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect()
    };
    ensure!(ids(&all) == want, "{all}");

    let mut seen = vec![];
    let mut path = format!("{base}?limit=2");
    let mut pages = 0;
    loop {
        let page = f.get(&path).await?;
        pages += 1;
        seen.extend(ids(&page));
        match page["next_after"].as_str() {
            Some(next) => path = format!("{base}?limit=2&after={next}"),
            None => break,
        }
        ensure!(pages < 10, "the pages never end: {page}");
    }
    ensure!(pages == 3 && seen == want, "{pages} pages: {seen:?}");

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("limit=", "limit"),
        ("after=not%20an%20id", "after"),
    ] {
        let (status, v) = f
            .request(Method::GET, &format!("{base}?{query}"), None)
            .await?;
        ensure!(
            status == 422 && v["errors"][0]["field"] == field,
            "{query}: {status} {v}"
        );
    }
    let (status, v) = f
        .request(Method::GET, &format!("{base}?limit=1000"), None)
        .await?;
    ensure!(status == 200 && ids(&v) == want, "{status} {v}");
    Ok(())
}
