//! End-to-end: the agent's image cache stays within `--image-cache-bytes` by deleting the least
//! recently used images, except those a warmup pinned or a running run uses; deleted images
//! lose their blobs and snapshots in containerd and leave the node's `cached_images`.
//!
//! Each test pushes three distinct images (busybox's layer, shared, plus 8 MiB of random bytes
//! each: about 17 MB of disk per image with its snapshot, 3–4 MB shared) and gives the agent a
//! 45 MB budget, which holds two of them but not three.

mod common;
mod image_builder;

use anyhow::{bail, ensure, Result};
use common::{AgentSpec, Fleet};
use image_builder::{BuiltImage, Containerd};
use serde_json::json;
use std::time::{Duration, Instant};

const RANDOM_LAYER_BYTES: usize = 8 * 1024 * 1024;
const BUDGET: &str = "45000000";

struct Setup {
    f: Fleet,
    node: String,
    ctr: Containerd,
    /// (image as the scheduler names it, what was pushed)
    images: Vec<(String, BuiltImage)>,
}

async fn setup(test: &str) -> Result<Setup> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    f.restart_agent_with(&node, &["--image-cache-bytes", BUDGET])
        .await?;
    let ctr = Containerd::connect(&f.env.containerd_socket, &node).await?;
    let mut images = Vec::new();
    for name in ["a", "b", "c"] {
        let repo = format!("gc-{test}-{name}-{}", std::process::id());
        let built = image_builder::push_image(&f.env.registry, &repo, RANDOM_LAYER_BYTES).await?;
        images.push((format!("{}/{repo}:latest", f.env.registry), built));
    }
    Ok(Setup {
        f,
        node,
        ctr,
        images,
    })
}

impl Setup {
    async fn runner(&self, i: usize, command: &str) -> Result<String> {
        self.f
            .runner(
                "fra",
                json!({"image_name": self.images[i].1.repo, "run_command": command}),
            )
            .await
    }

    async fn run_to_end(&self, i: usize) -> Result<()> {
        let runner = self.runner(i, "true").await?;
        let run = self.f.start_run(&runner, json!({})).await?;
        let r = self.f.wait_finished(&runner, &run).await?;
        ensure!(r["status"] == "succeeded", "{r}\n{}", self.f.logs());
        Ok(())
    }

    /// Whether image `i` (record, own blobs, top snapshot) is present.
    async fn present(&self, i: usize) -> Result<bool> {
        let (name, built) = &self.images[i];
        self.ctr.image_state(name, built).await
    }

    /// Waits until images `gone` are deleted entirely and `kept` are all there.
    async fn wait_cache(&self, gone: &[usize], kept: &[usize]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            let mut state = Vec::new();
            for &i in gone.iter().chain(kept) {
                // A delete in progress is briefly half done: look again.
                let present = self.present(i).await.unwrap_or(true);
                ok &= present == kept.contains(&i);
                state.push((i, present));
            }
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "cache not as expected (image, present): {state:?}\n{}",
                    self.f.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The shared busybox layer stays for the images that remain.
        let base = &self.images[0].1.chain_ids[0];
        ensure!(
            self.ctr.has_snapshot(base).await?,
            "the shared base snapshot went too"
        );
        self.wait_node_lists(gone, kept).await
    }

    /// Waits until the node's `cached_images` (the scheduler's view) matches.
    async fn wait_node_lists(&self, gone: &[usize], kept: &[usize]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let cached = self.f.cached_images(&self.node).await?;
            let listed = |i: usize| cached.contains(&self.images[i].0);
            if gone.iter().all(|&i| !listed(i)) && kept.iter().all(|&i| listed(i)) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "node lists {cached:?}; expected without {gone:?}, with {kept:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn the_least_recently_used_image_goes_when_the_budget_is_exceeded() -> Result<()> {
    let s = setup("lru").await?;
    s.run_to_end(0).await?;
    s.run_to_end(1).await?;
    s.wait_cache(&[], &[0, 1]).await?;
    // Using A again makes B the least recently used.
    s.run_to_end(0).await?;
    s.run_to_end(2).await?;
    s.wait_cache(&[1], &[0, 2]).await?;
    Ok(())
}

#[tokio::test]
async fn a_warmed_up_image_is_kept_even_when_least_recently_used() -> Result<()> {
    let s = setup("pin").await?;
    let warm = s.runner(0, "true").await?;
    s.f.post(&format!("/v1/runners/{warm}/warmup"), json!({}))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = s.f.get(&format!("/v1/runners/{warm}")).await?["runner"].clone();
        if r["warmup_status"] == "ready" {
            break;
        }
        ensure!(
            r["warmup_status"] == "pending" && Instant::now() < deadline,
            "warmup: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.run_to_end(1).await?;
    s.run_to_end(2).await?;
    // A is the oldest, but pinned: B goes.
    s.wait_cache(&[1], &[0, 2]).await?;
    // Deleting the runner releases the pin; the next pass (after a pull) evicts A.
    let status =
        s.f.request(
            reqwest::Method::DELETE,
            &format!("/v1/runners/{warm}"),
            None,
        )
        .await?
        .0;
    ensure!((200..300).contains(&status), "delete runner: {status}");
    s.run_to_end(1).await?;
    s.wait_cache(&[0], &[1, 2]).await?;
    Ok(())
}

#[tokio::test]
async fn an_image_in_use_by_a_running_run_is_never_deleted() -> Result<()> {
    let s = setup("busy").await?;
    let busy = s.runner(0, "sleep 60").await?;
    let run = s.f.start_run(&busy, json!({})).await?;
    s.f.wait_for(&busy, &run, Duration::from_secs(60), |st| st != "pending")
        .await?;
    s.run_to_end(1).await?;
    s.run_to_end(2).await?;
    // A is the least recently used, but its run is still going: B goes.
    s.wait_cache(&[1], &[0, 2]).await?;
    let r = s.f.run(&busy, &run).await?;
    ensure!(r["status"] == "running", "{r}");
    s.f.post(&format!("/v1/runners/{busy}/runs/{run}/stop"), json!({}))
        .await?;
    // Once the run is over, A is an ordinary least recently used image.
    s.run_to_end(1).await?;
    s.wait_cache(&[0], &[1, 2]).await?;
    Ok(())
}
