//! End-to-end: the agent pulls every image format it must support (built by
//! `deploy/format-images.py`): uncompressed layers, Docker v2 manifests, several layers with
//! whiteouts and opaque directories, zstd-compressed layers, and multi-platform indexes where
//! linux/amd64 is not first. Images it cannot unpack (an unknown layer media type, a layer whose
//! content is not the config's diff id) fail the run with `image_pull_failed`.

mod common;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet};
use serde_json::json;
use serde_json::Value;

/// Runs `command` in `image_name` and returns its stdout lines.
async fn run_in(f: &Fleet, image_name: &str, command: &str) -> Result<Vec<String>> {
    let runner = f
        .runner(
            "fra",
            json!({"image_name": image_name, "run_command": command}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded",
        "{image_name}: {r}\n{}",
        f.logs()
    );
    ensure!(
        r["image_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{r}"
    );
    let logs = f.all_logs(&runner, &run).await?;
    Ok(logs
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn uncompressed_layers_and_docker_v2_manifests_run() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    for image in ["formats/uncompressed", "formats/docker-v2"] {
        let out = run_in(&f, image, "echo ran-$((40+2))").await?;
        ensure!(out == ["ran-42"], "{image}: {out:?}");
    }
    Ok(())
}

#[tokio::test]
async fn layers_apply_in_order_with_whiteouts_and_opaque_directories() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let out = run_in(
        &f,
        "formats/layers",
        "ls /data; ls /data/dir; cat /data/keep",
    )
    .await?;
    ensure!(
        out == ["dir", "keep", "new", "y", "keep"],
        "whiteout or opaque dir not applied: {out:?}"
    );
    Ok(())
}

#[tokio::test]
async fn zstd_layers_apply_in_order_with_whiteouts_and_opaque_directories() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    // Every layer of formats/zstd, busybox's included, is zstd-compressed.
    let out = run_in(
        &f,
        "formats/zstd",
        "ls /data; ls /data/dir; cat /data/keep; echo ran-$((40+2))",
    )
    .await?;
    ensure!(
        out == ["dir", "keep", "new", "y", "zstd-keep", "ran-42"],
        "zstd layers not applied as expected: {out:?}"
    );
    Ok(())
}

/// Runs `image_name`, which must fail to pull; returns the finished run.
async fn failed_pull(f: &Fleet, image_name: &str) -> Result<Value> {
    let runner = f
        .runner(
            "fra",
            json!({"image_name": image_name, "run_command": "echo never"}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "image_pull_failed",
        "{image_name}: {r}"
    );
    ensure!(r["started_at"].is_null(), "never started: {r}");
    Ok(r)
}

#[tokio::test]
async fn an_unsupported_layer_media_type_fails_the_pull_naming_it() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let r = failed_pull(&f, "formats/lz4").await?;
    let message = r["error_message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("unsupported media type")
            && message.contains("application/vnd.oci.image.layer.v1.tar+lz4"),
        "the message names the media type: {r}"
    );
    Ok(())
}

#[tokio::test]
async fn a_layer_that_is_not_its_diff_id_fails_the_pull() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let r = failed_pull(&f, "formats/bad-diff-id").await?;
    let message = r["error_message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("unpacks to") && message.contains("but the image config says"),
        "the message says the diff id is wrong: {r}"
    );
    Ok(())
}

#[tokio::test]
async fn indexes_resolve_to_linux_amd64_even_when_it_is_not_first() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    for image in ["formats/index", "formats/docker-list"] {
        let out = run_in(&f, image, "cat /platform").await?;
        ensure!(
            out == ["amd64"],
            "{image} resolved to the wrong platform: {out:?}"
        );
    }
    Ok(())
}
