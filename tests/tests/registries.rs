//! End-to-end: private container registries — credentials sealed at rest, never returned, used
//! by the agent to pull; wrong credentials fail the run clearly.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet};
use reqwest::Method;
use serde_json::{json, Value};

struct Private {
    host: String,
    user: String,
    password: String,
}

fn private() -> Result<Private> {
    let var = |k: &str| {
        std::env::var(k).with_context(|| format!("{k} is not set: run through deploy/test.sh"))
    };
    Ok(Private {
        host: var("BERTH_TEST_PRIVATE_REGISTRY")?,
        user: var("BERTH_TEST_PRIVATE_USER")?,
        password: var("BERTH_TEST_PRIVATE_PASSWORD")?,
    })
}

async fn create_registry(f: &Fleet, p: &Private, password: &str) -> Result<Value> {
    let (status, body) = f
        .request(
            Method::POST,
            "/v1/container_registries",
            Some(json!({"name": "private-test", "host": p.host, "username": p.user, "password": password})),
        )
        .await?;
    ensure!(status == 201, "{status} {body}");
    Ok(body["container_registry"].clone())
}

#[tokio::test]
async fn the_right_credentials_pull_and_the_password_never_leaves() -> Result<()> {
    let p = private()?;
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let reg = create_registry(&f, &p, &p.password).await?;
    ensure!(
        reg.get("password").is_none()
            && reg["host"] == p.host.as_str()
            && reg["username"] == p.user.as_str(),
        "{reg}"
    );
    let id = reg["id"].as_str().context("registry id")?.to_owned();
    let listed = f.get("/v1/container_registries").await?;
    ensure!(
        !listed.to_string().contains(&p.password),
        "the password is never returned: {listed}"
    );

    let runner = f
        .runner("fra", json!({"image_name": "private/busybox", "container_registry_id": id, "run_command": "echo from-private"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    ensure!(
        r["image"] == format!("{}/private/busybox:latest", p.host).as_str(),
        "{r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(
        logs.first().and_then(|l| l["msg"].as_str()) == Some("from-private"),
        "{logs:?}"
    );

    // Sealed at rest: the store file does not hold the password in clear.
    let store = std::fs::read(f.dir.path().join("scheduler/state.redb"))?;
    ensure!(
        !store
            .windows(p.password.len())
            .any(|w| w == p.password.as_bytes()),
        "password in clear in the store"
    );
    // Nor do the logs of any process.
    ensure!(!f.logs().contains(&p.password), "password in a process log");

    // In use: cannot be deleted; once the runner is gone it can.
    let (status, body) = f
        .request(
            Method::DELETE,
            &format!("/v1/container_registries/{id}"),
            None,
        )
        .await?;
    ensure!(status == 409, "{status} {body}");
    let (status, _) = f
        .request(Method::DELETE, &format!("/v1/runners/{runner}"), None)
        .await?;
    ensure!(status == 204);
    let (status, _) = f
        .request(
            Method::DELETE,
            &format!("/v1/container_registries/{id}"),
            None,
        )
        .await?;
    ensure!(status == 204);
    let (status, body) = f
        .request(Method::GET, &format!("/v1/container_registries/{id}"), None)
        .await?;
    ensure!(
        status == 404 && body["errors"][0]["field"] == "container_registry_id",
        "{status} {body}"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_credentials_fail_the_run_with_image_pull_failed() -> Result<()> {
    let p = private()?;
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let reg = create_registry(&f, &p, "not-the-password").await?;
    let id = reg["id"].as_str().context("registry id")?;
    let runner = f
        .runner("fra", json!({"image_name": "private/busybox", "container_registry_id": id, "run_command": "echo never"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "image_pull_failed",
        "{r}"
    );
    let message = r["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    ensure!(
        message.contains("401") || message.contains("unauthorized"),
        "a clear reason: {r}"
    );
    ensure!(r["started_at"].is_null(), "never started: {r}");
    Ok(())
}
