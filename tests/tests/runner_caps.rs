//! A runner's `max_concurrent_runs` (issue #15, item 4) with real processes: a burst of 500
//! triggers on a node with room for 16 never has more than the cap of the runner's runs on the
//! node, by the scheduler's records and by the processes' own start and exit times; the runs
//! beyond it wait saying why and where; another runner in the region is not held back. (The cap
//! across a scheduler failover: `ha_etcd.rs`.)

mod common;

use anyhow::{ensure, Context, Result};
use common::caps::{peaks, wait_all_ended};
use common::{AgentSpec, Fleet, TOKEN};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

const CAP: usize = 4;
const TRIGGERS: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_500_triggers_never_runs_more_than_the_cap() -> Result<()> {
    let f = Fleet::start(&[AgentSpec {
        region: "fra",
        memory_mib: 16 * 1024,
        max_runs: 16,
    }])
    .await?;
    let runner = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo ran",
                   "max_concurrent_runs": CAP}),
        )
        .await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/runners/{runner}/runs", f.api_url);
    let ids: Vec<String> = futures::stream::iter(0..TRIGGERS)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let v: serde_json::Value = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .json(&json!({}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                v["run"]["id"]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("no run id: {v}"))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<Result<String>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    ensure!(ids.len() == TRIGGERS);

    // The newest waits behind the cap and says so, with its place.
    let mut newest = ids.clone();
    newest.sort();
    let last = newest.last().context("runs")?;
    let waiting = f.run(&runner, last).await?;
    let reason = waiting["pending_reason"].as_str().unwrap_or_default();
    ensure!(
        waiting["status"] == "pending"
            && reason.contains(&format!(
                "max_concurrent_runs is {CAP} and {CAP} of its runs"
            ))
            && reason.contains("of the runner's"),
        "{waiting}"
    );

    // Another runner of the region runs at once: the cap is this runner's, not the region's.
    let other = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo other"}),
        )
        .await?;
    let run = f.start_run(&other, json!({})).await?;
    let done = f.wait_finished(&other, &run).await?;
    ensure!(done["status"] == "succeeded", "{done}");
    let still = f.run(&runner, last).await?;
    ensure!(
        still["status"] == "pending",
        "the uncapped run finished while the capped burst still waits: {still}"
    );

    let failed = wait_all_ended(&f, &runner, &ids, Duration::from_secs(600)).await?;
    ensure!(failed.is_empty(), "runs did not succeed: {failed:?}");
    let (held, ran) = peaks(&f, &runner, &ids).await?;
    eprintln!("{TRIGGERS} runs, cap {CAP}: at most {held} held a node, {ran} ran at once");
    ensure!(
        held <= CAP && ran <= CAP,
        "held {held}, ran {ran}: over the cap {CAP}"
    );
    // The node had room for 16: reaching the cap shows the runs did run side by side up to it.
    ensure!(held == CAP, "the cap was never reached ({held})");
    Ok(())
}
