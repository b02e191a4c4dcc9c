//! End-to-end: a run's image pull reports its progress. A 32 MiB image is pulled through a proxy
//! that passes 10 MB/s, so the pull takes seconds; polling the run shows `image_pull` growing
//! (never backwards) to the total of the manifest's blob sizes, with `pending_reason` saying
//! the image is being pulled, and the final figures stay on the run once it started.

mod common;
mod image_builder;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const RANDOM_LAYER_BYTES: usize = 32 * 1024 * 1024;
const PROXY_BYTES_PER_SECOND: u64 = 10 * 1024 * 1024;

#[tokio::test]
async fn a_slow_pull_reports_growing_progress_up_to_the_manifest_total() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let repo = format!("progress-{}", std::process::id());
    let image = image_builder::push_image(&f.env.registry, &repo, RANDOM_LAYER_BYTES).await?;
    let proxy = image_builder::throttling_proxy(&f.env.registry, PROXY_BYTES_PER_SECOND).await?;
    let runner = f
        .runner(
            "fra",
            json!({"image_name": format!("{proxy}/{repo}"), "run_command": "ls -l /random.bin"}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;

    let mut samples: Vec<Value> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let r = f.run(&runner, &run).await?;
        if r["status"] != "pending" {
            break r;
        }
        if !r["image_pull"].is_null() {
            samples.push(r["image_pull"].clone());
        }
        if let Some(reason) = r["pending_reason"].as_str() {
            reasons.push(reason.to_owned());
        }
        ensure!(
            Instant::now() < deadline,
            "still pending: {r}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done = f.wait_finished(&runner, &run).await?;
    ensure!(done["status"] == "succeeded", "{done}\n{}", f.logs());

    let total = image.blob_bytes;
    let field = |v: &Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    ensure!(
        samples
            .iter()
            .all(|s| field(s, "bytes_total") == total && field(s, "layers_total") == 2),
        "every report names the manifest's total {total} and 2 layers: {samples:?}"
    );
    ensure!(
        samples
            .iter()
            .any(|s| field(s, "bytes_done") > 0 && field(s, "bytes_done") < total),
        "no report in the middle of the pull: {samples:?}"
    );
    ensure!(
        samples.windows(2).all(|w| {
            field(&w[1], "bytes_done") >= field(&w[0], "bytes_done")
                && field(&w[1], "layers_done") >= field(&w[0], "layers_done")
        }),
        "progress went backwards: {samples:?}"
    );
    ensure!(
        reasons.iter().any(|r| r == "pulling the image"),
        "pending_reason never said the image is being pulled: {reasons:?}"
    );
    // The final figures: seen while pending or right after, and stored with the run.
    for r in [&started, &done] {
        let pull = &r["image_pull"];
        ensure!(
            field(pull, "bytes_done") == total
                && field(pull, "bytes_total") == total
                && field(pull, "layers_done") == 2,
            "final figures missing: {r}"
        );
    }
    Ok(())
}

/// A second run of the same image pulls nothing: it shows no pull at all.
#[tokio::test]
async fn a_run_of_a_present_image_shows_no_pull() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let repo = format!("progress-present-{}", std::process::id());
    image_builder::push_image(&f.env.registry, &repo, 1024).await?;
    let runner = f
        .runner("fra", json!({"image_name": repo, "run_command": "true"}))
        .await?;
    let first = f.start_run(&runner, json!({})).await?;
    let first = f.wait_finished(&runner, &first).await?;
    ensure!(
        first["status"] == "succeeded" && first["image_pull"]["layers_total"] == 2,
        "{first}"
    );
    let second = f.start_run(&runner, json!({})).await?;
    let second = f.wait_finished(&runner, &second).await?;
    ensure!(
        second["status"] == "succeeded" && second["image_pull"].is_null(),
        "{second}"
    );
    Ok(())
}

/// `berthctl run --follow` tells on stderr how far the pull has come while the run waits (a line
/// per finished layer when stderr is not a terminal), and nothing of it with `--json`.
#[tokio::test]
async fn berthctl_follow_shows_the_pull_progress() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let proxy = image_builder::throttling_proxy(&f.env.registry, PROXY_BYTES_PER_SECOND).await?;
    let mut stderrs = Vec::new();
    for json_mode in [false, true] {
        let repo = format!("progress-cli-{json_mode}-{}", std::process::id());
        image_builder::push_image(&f.env.registry, &repo, 16 * 1024 * 1024).await?;
        let runner = f
            .runner(
                "fra",
                json!({"image_name": format!("{proxy}/{repo}"), "run_command": "true"}),
            )
            .await?;
        let mut args = vec!["run", runner.as_str(), "--follow"];
        if json_mode {
            args.insert(0, "--json");
        }
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(f.env.bin_dir.join("berthctl"))
                .args(&args)
                .env("BERTH_URL", &f.api_url)
                .env("BERTH_TOKEN", common::TOKEN)
                .current_dir(f.dir.path())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(out.status.success(), "{:?}: {stderr}", out.status);
        stderrs.push(stderr);
    }
    let plain = &stderrs[0];
    ensure!(
        plain.lines().any(|l| l.starts_with("pulling image ")
            && l.contains(" MiB (")
            && l.ends_with("/2 layers)")),
        "no progress line: {plain}"
    );
    ensure!(
        plain
            .lines()
            .any(|l| l.starts_with("pulling image ") && l.ends_with("(2/2 layers)")),
        "no final progress line: {plain}"
    );
    ensure!(
        !stderrs[1].contains("pulling image "),
        "progress shown in --json mode: {}",
        stderrs[1]
    );
    Ok(())
}

/// A warmup's pull shows its progress on the runner while the warmup is pending.
#[tokio::test]
async fn a_warmup_shows_its_pull_progress_on_the_runner() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let repo = format!("progress-warmup-{}", std::process::id());
    let image = image_builder::push_image(&f.env.registry, &repo, 24 * 1024 * 1024).await?;
    let proxy = image_builder::throttling_proxy(&f.env.registry, PROXY_BYTES_PER_SECOND).await?;
    let runner = f
        .runner(
            "fra",
            json!({"image_name": format!("{proxy}/{repo}"), "run_command": "true"}),
        )
        .await?;
    f.post(&format!("/v1/runners/{runner}/warmup"), json!({}))
        .await?;
    let mut samples: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let r = f.get(&format!("/v1/runners/{runner}")).await?["runner"].clone();
        if r["warmup_status"] != "pending" {
            break r;
        }
        if !r["warmup_image_pull"].is_null() {
            samples.push(r["warmup_image_pull"].clone());
        }
        ensure!(Instant::now() < deadline, "warmup still pending: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(ready["warmup_status"] == "ready", "{ready}\n{}", f.logs());
    ensure!(
        ready["warmup_image_pull"].is_null(),
        "shown only while pending: {ready}"
    );
    let total = image.blob_bytes;
    ensure!(
        samples.iter().any(|s| {
            let done = s["bytes_done"].as_u64().unwrap_or(0);
            s["bytes_total"] == total && done > 0 && done < total
        }),
        "no warmup progress in the middle of the pull: {samples:?}"
    );
    Ok(())
}
