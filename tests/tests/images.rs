//! End-to-end: the agent pulls every image format it must support (built by
//! `deploy/format-images.py`): uncompressed layers, Docker v2 manifests, several layers with
//! whiteouts and opaque directories, and multi-platform indexes where linux/amd64 is not first.

mod common;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet};
use serde_json::json;

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
