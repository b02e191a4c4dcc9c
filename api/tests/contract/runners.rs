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

#[tokio::test]
async fn max_concurrent_runs_is_set_kept_changed_and_removed() -> Result<()> {
    let f = Api::start().await?;
    let body = |cap: serde_json::Value| {
        json!({
            "name": "capped", "image_name": "busybox", "image_tag": "latest",
            "region": "fra", "instance_type": "standard-s", "max_concurrent_runs": cap,
        })
    };
    let (status, created) = f
        .request(Method::POST, "/v1/runners", Some(body(json!(3))))
        .await?;
    ensure!(
        status == 201 && created["runner"]["max_concurrent_runs"] == 3,
        "{status} {created}"
    );
    let id = created["runner"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let patch = |v: serde_json::Value| {
        let path = format!("/v1/runners/{id}");
        let f = &f;
        async move { f.request(Method::PATCH, &path, Some(v)).await }
    };
    let (status, v) = patch(json!({"timeout_seconds": 9})).await?;
    ensure!(
        status == 200 && v["runner"]["max_concurrent_runs"] == 3,
        "absent keeps it: {v}"
    );
    let (status, v) = patch(json!({"max_concurrent_runs": 10000})).await?;
    ensure!(
        status == 200 && v["runner"]["max_concurrent_runs"] == 10000,
        "{v}"
    );
    let (status, v) = patch(json!({"max_concurrent_runs": null})).await?;
    ensure!(
        status == 200 && v["runner"]["max_concurrent_runs"].is_null(),
        "null removes it: {v}"
    );
    let shown = f.get(&format!("/v1/runners/{id}")).await?;
    ensure!(shown["runner"]["max_concurrent_runs"].is_null(), "{shown}");

    for (bad, status) in [
        (json!(0), 422),
        (json!(10001), 422),
        (json!(-1), 422),
        (json!(u64::MAX), 400),
        (json!("3"), 400),
        (json!(2.5), 400),
    ] {
        let (got, v) = patch(json!({ "max_concurrent_runs": bad })).await?;
        ensure!(
            got == status && v["errors"][0]["field"] == "max_concurrent_runs",
            "PATCH {bad}: {got} {v}"
        );
        let (got, v) = f
            .request(Method::POST, "/v1/runners", Some(body(bad.clone())))
            .await?;
        ensure!(
            got == status && v["errors"][0]["field"] == "max_concurrent_runs",
            "POST {bad}: {got} {v}"
        );
    }
    let (status, created) = f
        .request(Method::POST, "/v1/runners", Some(body(json!(null))))
        .await?;
    ensure!(
        status == 201 && created["runner"]["max_concurrent_runs"].is_null(),
        "{created}"
    );
    Ok(())
}

#[tokio::test]
async fn retry_policies_are_checked_shown_and_removed() -> Result<()> {
    let f = Api::start().await?;
    let policy = json!({"max_attempts": 3, "backoff_seconds": 5, "retry_on": ["exit_code", "node_lost"],
                        "exit_codes": [75]});
    let (status, created) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(json!({
                "name": "retried", "image_name": "busybox", "image_tag": "latest",
                "region": "fra", "instance_type": "standard-s", "retry_policy": policy,
            })),
        )
        .await?;
    ensure!(status == 201, "{status} {created}");
    let shown = &created["runner"]["retry_policy"];
    ensure!(
        *shown
            == json!({"max_attempts": 3, "backoff_seconds": 5, "backoff_multiplier": 2,
                      "max_backoff_seconds": 3600, "retry_on": ["exit_code", "node_lost"],
                      "exit_codes": [75]}),
        "defaults filled in: {shown}"
    );
    let id = created["runner"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // A run may bring its own; the run shows the policy it is judged by, and that it is a
    // first attempt.
    let (status, run) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{id}/runs"),
            Some(json!({"retry_policy": {"max_attempts": 2, "retry_on": ["timeout"]}})),
        )
        .await?;
    ensure!(status == 201, "{status} {run}");
    let r = &run["run"];
    ensure!(
        r["attempt"] == 1
            && r["retry_policy"]["retry_on"] == json!(["timeout"])
            && r["previous_attempt_id"].is_null()
            && r["final_attempt"].is_null(),
        "{r}"
    );
    for (body, status, field) in [
        (json!({"max_attempts": 0}), 422, "retry_policy.max_attempts"),
        (
            json!({"max_attempts": 11}),
            422,
            "retry_policy.max_attempts",
        ),
        (
            json!({"max_attempts": 2, "backoff_seconds": 3601}),
            422,
            "retry_policy.backoff_seconds",
        ),
        (
            json!({"max_attempts": 2, "backoff_multiplier": 0}),
            422,
            "retry_policy.backoff_multiplier",
        ),
        (
            json!({"max_attempts": 2, "retry_on": ["exit_code"], "exit_codes": [0]}),
            422,
            "retry_policy.exit_codes[0]",
        ),
        (
            json!({"max_attempts": 2, "exit_codes": [3]}),
            422,
            "retry_policy.exit_codes",
        ),
        (
            json!({"max_attempts": 2, "retry_on": ["stopped"]}),
            400,
            "retry_policy.retry_on[0]",
        ),
        (
            json!({"max_attempts": 2, "tries": 1}),
            400,
            "retry_policy.tries",
        ),
        (json!({"retry_on": []}), 400, "retry_policy"),
    ] {
        let (got, v) = f
            .request(
                Method::PATCH,
                &format!("/v1/runners/{id}"),
                Some(json!({ "retry_policy": body })),
            )
            .await?;
        ensure!(
            got == status && v["errors"][0]["field"] == field,
            "PATCH {body}: {got} {v}"
        );
        let (got, v) = f
            .request(
                Method::POST,
                &format!("/v1/runners/{id}/runs"),
                Some(json!({ "retry_policy": body })),
            )
            .await?;
        ensure!(
            got == status && v["errors"][0]["field"] == field,
            "POST run {body}: {got} {v}"
        );
    }
    let (status, v) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{id}"),
            Some(json!({"retry_policy": null})),
        )
        .await?;
    ensure!(
        status == 200 && v["runner"]["retry_policy"].is_null(),
        "{status} {v}"
    );
    Ok(())
}

/// `notify_url` needs a secret when first set; the secret is never shown (only
/// `notify_secret_set`); a PATCH of the URL alone keeps it; `null` removes both; bad values are
/// refused naming the field.
#[tokio::test]
async fn notify_settings_are_checked_and_the_secret_is_write_only() -> Result<()> {
    let f = Api::start().await?;
    let base = json!({"name": "hooked", "image_name": "busybox", "image_tag": "latest",
                      "region": "fra", "instance_type": "standard-s"});
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    for (extra, field) in [
        (
            json!({"notify_url": "https://hooks.example/x"}),
            "notify_secret",
        ),
        (
            json!({"notify_url": "ftp://hooks.example/x", "notify_secret": "0123456789abcdef"}),
            "notify_url",
        ),
        (
            json!({"notify_url": "https://hooks.example/x", "notify_secret": "short"}),
            "notify_secret",
        ),
        (
            json!({"notify_secret": "0123456789abcdef"}),
            "notify_secret",
        ),
    ] {
        let (status, v) = f
            .request(Method::POST, "/v1/runners", Some(with(extra.clone())))
            .await?;
        ensure!(
            status == 422 && v["errors"][0]["field"] == field,
            "{extra}: {status} {v}"
        );
    }
    let secret = "a-very-secret-signing-key";
    let (status, created) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(with(
                json!({"notify_url": "https://hooks.example/x", "notify_secret": secret}),
            )),
        )
        .await?;
    ensure!(status == 201, "{status} {created}");
    let r = &created["runner"];
    ensure!(
        r["notify_url"] == "https://hooks.example/x" && r["notify_secret_set"] == true,
        "{created}"
    );
    ensure!(
        !created.to_string().contains(secret),
        "the secret is shown: {created}"
    );
    let id = r["id"].as_str().unwrap_or_default().to_owned();
    let (status, patched) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{id}"),
            Some(json!({"notify_url": "https://hooks.example/y"})),
        )
        .await?;
    ensure!(
        status == 200
            && patched["runner"]["notify_url"] == "https://hooks.example/y"
            && patched["runner"]["notify_secret_set"] == true,
        "{status} {patched}"
    );
    ensure!(!patched.to_string().contains(secret), "{patched}");
    let (status, removed) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{id}"),
            Some(json!({"notify_url": null})),
        )
        .await?;
    ensure!(
        status == 200
            && removed["runner"]["notify_url"].is_null()
            && removed["runner"]["notify_secret_set"] == false,
        "{status} {removed}"
    );
    Ok(())
}

/// `isolation`: `container` by default, `sandbox` on request, changed by a PATCH; anything else
/// is refused naming the field; a run shows the isolation it was created with and no runtime
/// until a node starts it.
#[tokio::test]
async fn isolation_is_chosen_shown_and_checked() -> Result<()> {
    let f = Api::start().await?;
    let base = json!({"name": "sandboxed", "image_name": "busybox", "image_tag": "latest",
                      "region": "fra", "instance_type": "standard-s"});
    let (status, plain) = f
        .request(Method::POST, "/v1/runners", Some(base.clone()))
        .await?;
    ensure!(
        status == 201 && plain["runner"]["isolation"] == "container",
        "{status} {plain}"
    );
    let mut body = base.clone();
    body["isolation"] = json!("sandbox");
    let (status, v) = f.request(Method::POST, "/v1/runners", Some(body)).await?;
    ensure!(
        status == 201 && v["runner"]["isolation"] == "sandbox",
        "{status} {v}"
    );
    let id = v["runner"]["id"].as_str().unwrap_or_default().to_owned();
    let (status, run) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{id}/runs"),
            Some(json!({})),
        )
        .await?;
    ensure!(
        status == 201 && run["run"]["isolation"] == "sandbox" && run["run"]["runtime"].is_null(),
        "{status} {run}"
    );
    for bad in [json!("vm"), json!(1), json!("Sandbox")] {
        let mut body = base.clone();
        body["isolation"] = bad.clone();
        let (status, v) = f.request(Method::POST, "/v1/runners", Some(body)).await?;
        ensure!(
            (400..500).contains(&status) && v.to_string().contains("isolation"),
            "{bad}: {status} {v}"
        );
    }
    let (status, v) = f
        .request(
            Method::PATCH,
            &format!("/v1/runners/{id}"),
            Some(json!({"isolation": "container"})),
        )
        .await?;
    ensure!(
        status == 200 && v["runner"]["isolation"] == "container",
        "{status} {v}"
    );
    Ok(())
}
