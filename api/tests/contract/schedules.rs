//! Schedules over HTTP: create, list, get, pause/resume, delete; bad bodies answered with a 4xx
//! naming the field. (Fires with real processes: `tests/schedules.rs`.)

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn schedule_crud_and_checks() -> Result<()> {
    let f = Api::start().await?;
    let (status, created) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(
                json!({"name": "nightly", "image_name": "busybox", "image_tag": "latest",
                        "region": "fra", "instance_type": "standard-s"}),
            ),
        )
        .await?;
    ensure!(status == 201, "{status} {created}");
    let runner = created["runner"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let base = format!("/v1/runners/{runner}/schedules");
    let (status, v) = f
        .request(
            Method::POST,
            &base,
            Some(json!({"cron": "30 2 * * *", "timezone": "Europe/Berlin", "overlap": "forbid",
                        "catch_up": "run_once", "jitter_seconds": 30,
                        "run": {"command": "echo nightly", "env_variables":
                                [{"env_key": "TOKEN", "env_val": "s3cret-value", "secret": true}]}})),
        )
        .await?;
    ensure!(status == 201, "{status} {v}");
    let s = &v["schedule"];
    ensure!(
        s["cron"] == "30 2 * * *"
            && s["timezone"] == "Europe/Berlin"
            && s["overlap"] == "forbid"
            && s["catch_up"] == "run_once"
            && s["jitter_seconds"] == 30
            && !s["paused"].as_bool().unwrap_or(true)
            && s["fired"] == 0
            && s["run"]["command"] == "echo nightly"
            && s["run"]["env_variables"][0]["env_val"].is_null(),
        "{s}"
    );
    // 02:30 in Berlin is 00:30 or 01:30 UTC.
    let next = s["next_fire_at"].as_str().unwrap_or_default();
    ensure!(
        next.contains("T00:30:00") || next.contains("T01:30:00"),
        "{next}"
    );
    ensure!(
        !v.to_string().contains("s3cret-value"),
        "a secret never leaves"
    );
    let id = s["id"].as_str().unwrap_or_default().to_owned();
    let list = f.get(&base).await?;
    ensure!(
        list["schedules"].as_array().is_some_and(|l| l.len() == 1),
        "{list}"
    );
    let path = format!("{base}/{id}");
    let (status, v) = f
        .request(Method::PATCH, &path, Some(json!({"paused": true})))
        .await?;
    ensure!(
        status == 200 && v["schedule"]["paused"] == true && v["schedule"]["next_fire_at"].is_null(),
        "{status} {v}"
    );
    let (status, v) = f
        .request(
            Method::PATCH,
            &path,
            Some(json!({"paused": false, "cron": "*/5 * * * *"})),
        )
        .await?;
    ensure!(
        status == 200
            && v["schedule"]["paused"] == false
            && v["schedule"]["cron"] == "*/5 * * * *"
            && v["schedule"]["overlap"] == "forbid",
        "{status} {v}"
    );
    for (body, status, field) in [
        (json!({"cron": "every minute"}), 422, "cron"),
        (json!({"cron": ""}), 422, "cron"),
        (json!({"timezone": "Mars/Olympus"}), 422, "timezone"),
        (json!({"jitter_seconds": 3601}), 422, "jitter_seconds"),
        (json!({"overlap": "sometimes"}), 400, "overlap"),
        (json!({"run": {"argv": []}}), 422, "run.argv"),
        (
            json!({"run": {"files": [{"path": "/x", "content_base64": ""}]}}),
            422,
            "run.files",
        ),
        (json!({"every": "day"}), 400, "every"),
    ] {
        let (got, v) = f.request(Method::PATCH, &path, Some(body.clone())).await?;
        ensure!(
            got == status && v["errors"][0]["field"] == field,
            "PATCH {body}: {got} {v}"
        );
    }
    for body in [
        json!({}),
        json!({"cron": ""}),
        json!({"cron": "", "timezone": "0"}),
    ] {
        let (got, v) = f.request(Method::POST, &base, Some(body.clone())).await?;
        ensure!(
            got == 422 && v["errors"][0]["field"] == "cron",
            "POST {body}: {got} {v}"
        );
    }
    let (status, _) = f.request(Method::DELETE, &path, None).await?;
    ensure!(status == 204);
    let (status, v) = f.request(Method::GET, &path, None).await?;
    ensure!(status == 404, "{status} {v}");
    let (status, v) = f
        .request(Method::GET, "/v1/runners/nope/schedules", None)
        .await?;
    ensure!(status == 404, "{status} {v}");
    Ok(())
}
