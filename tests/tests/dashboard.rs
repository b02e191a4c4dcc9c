//! The web dashboard (issue #14, items 4 and 5): served by the API with its own assets, and
//! driven in headless Chromium by Selenium (tests/browser/dashboard.py) against this live fleet:
//! log in with a key, trigger a run and see its lines live and its final state, stop a running
//! run, drain a node and see it marked, and a project key that cannot see another project's
//! run. Screenshots of each page go to `BERTH_ARTIFACTS_DIR/screenshots` (deploy/test.sh sets
//! it) or to the fleet's directory.
//!
//! The endpoints the dashboard needs beyond the old ones are checked here too: runs newest
//! first with paging, and the active runs across runners (the queue) per project.

mod common;

use anyhow::{anyhow, ensure, Context, Result};
use common::{AgentSpec, Fleet, TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

async fn call(
    f: &Fleet,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut req = f
        .http
        .request(method, format!("{}{path}", f.api_url))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

async fn project_key(f: &Fleet, project: &str) -> Result<String> {
    let (status, v) = call(
        f,
        TOKEN,
        Method::POST,
        "/v1/admin/api_keys",
        Some(json!({"project": project, "name": "dashboard"})),
    )
    .await?;
    ensure!(status == 201, "{status} {v}");
    v["key"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no key in {v}"))
}

async fn runner_of(f: &Fleet, key: &str, command: &str) -> Result<String> {
    let (status, v) = call(
        f,
        key,
        Method::POST,
        "/v1/runners",
        Some(json!({
            "name": "dashboard",
            "image_name": "busybox",
            "image_tag": "latest",
            "region": "fra",
            "instance_type": "standard-s",
            "timeout_seconds": 300,
            "run_command": command,
        })),
    )
    .await?;
    ensure!(status == 201, "{status} {v}");
    v["runner"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no runner id in {v}"))
}

async fn start(f: &Fleet, key: &str, runner: &str) -> Result<String> {
    let (status, v) = call(
        f,
        key,
        Method::POST,
        &format!("/v1/runners/{runner}/runs"),
        Some(json!({})),
    )
    .await?;
    ensure!(status == 201, "{status} {v}");
    v["run"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no run id in {v}"))
}

/// Waits until the run (read with `key`: the admin token acts in another project) has ended.
async fn ended(f: &Fleet, key: &str, runner: &str, run: &str) -> Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, v) = call(
            f,
            key,
            Method::GET,
            &format!("/v1/runners/{runner}/runs/{run}"),
            None,
        )
        .await?;
        ensure!(status == 200, "{status} {v}");
        if !["pending", "running"].contains(&v["run"]["status"].as_str().unwrap_or_default()) {
            return Ok(v["run"].clone());
        }
        ensure!(std::time::Instant::now() < deadline, "{run} still {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_dashboard_works_in_a_browser() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();

    // The page: its own files, nothing from elsewhere, a strict CSP.
    let res = f.http.get(format!("{}/ui/", f.api_url)).send().await?;
    ensure!(res.status() == 200);
    let csp = res
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(csp.contains("script-src 'self'"), "{csp}");
    let html = res.text().await?;
    ensure!(html.contains("/ui/app.js"), "{html}");
    let js = f
        .http
        .get(format!("{}/ui/app.js", f.api_url))
        .send()
        .await?;
    ensure!(js.status() == 200);

    let (key_a, key_b) = (
        project_key(&f, "alpha").await?,
        project_key(&f, "beta").await?,
    );
    let lines = "for i in 1 2 3 4 5; do echo line $i; sleep 1; done";
    let runner_a = runner_of(&f, &key_a, lines).await?;
    let sleeper_a = runner_of(&f, &key_a, "sleep 300").await?;
    let runner_b = runner_of(&f, &key_b, "echo b").await?;
    let run_b = start(&f, &key_b, &runner_b).await?;

    // The queue endpoint: B's pending or running run is B's and the admin's, never A's.
    let (status, queue_a) = call(&f, &key_a, Method::GET, "/v1/runs", None).await?;
    ensure!(status == 200, "{status} {queue_a}");
    ensure!(!ids(&queue_a).contains(&run_b), "A sees B's run: {queue_a}");
    let (status, v) = call(&f, &key_b, Method::GET, "/v1/runs?status=bogus", None).await?;
    ensure!(
        status == 422 && v.to_string().contains("status"),
        "{status} {v}"
    );
    ended(&f, &key_b, &runner_b, &run_b).await?;

    // Newest first, paged.
    let mut started = vec![];
    for _ in 0..3 {
        started.push(start(&f, &key_b, &runner_b).await?);
    }
    let (_, page1) = call(
        &f,
        &key_b,
        Method::GET,
        &format!("/v1/runners/{runner_b}/runs?order=desc&limit=2"),
        None,
    )
    .await?;
    ensure!(
        ids(&page1) == vec![started[2].clone(), started[1].clone()],
        "{page1}"
    );
    let after = page1["next_after"].as_str().context("next_after")?;
    let (_, page2) = call(
        &f,
        &key_b,
        Method::GET,
        &format!("/v1/runners/{runner_b}/runs?order=desc&limit=2&after={after}"),
        None,
    )
    .await?;
    ensure!(
        ids(&page2) == vec![started[0].clone(), run_b.clone()],
        "{page2}"
    );
    for id in &started {
        f.http
            .post(format!(
                "{}/v1/runners/{runner_b}/runs/{id}/stop",
                f.api_url
            ))
            .bearer_auth(&key_b)
            .send()
            .await?;
    }

    // The browser.
    let shots = match std::env::var_os("BERTH_ARTIFACTS_DIR") {
        Some(dir) => PathBuf::from(dir).join("screenshots"),
        None => f.dir.path().join("screenshots"),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser/dashboard.py");
    let out = tokio::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .env("BERTH_API_URL", &f.api_url)
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_KEY_A", &key_a)
        .env("BERTH_RUNNER_A", &runner_a)
        .env("BERTH_SLEEPER_A", &sleeper_a)
        .env("BERTH_RUNNER_B", &runner_b)
        .env("BERTH_RUN_B", &run_b)
        .env("BERTH_NODE_ID", &node)
        .env("BERTH_SCREENSHOTS", &shots)
        .output()
        .await
        .context("running tests/browser/dashboard.py with /usr/bin/python3")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "the browser checks failed ({}):\n{stdout}\n{stderr}\nscreenshots in {}",
        out.status,
        shots.display()
    );
    ensure!(
        shots.join("run.png").exists(),
        "no screenshot of the run page"
    );
    Ok(())
}
