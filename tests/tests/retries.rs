//! Retry policies (issue #15, item 3) with real containers: a run that exits with a listed code
//! is tried again after its backoff, each attempt a run of its own (its own logs, billed for
//! itself) linked to the one before, up to the policy's attempts, and the first run shows where
//! the chain ended; an image that cannot be pulled retries when listed; a timeout that is not
//! listed, and a run stopped by its user, never retry.

mod common;

use anyhow::{ensure, Context, Result};
use common::instant as at;
use common::{AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::Duration;

/// The chain of attempts from `first`, following `next_attempt_id` until the last has ended.
async fn chain(f: &Fleet, runner: &str, first: &str, attempts: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut id = first.to_owned();
    for _ in 0..attempts {
        let run = f.wait_finished(runner, &id).await?;
        let next = run["next_attempt_id"].as_str().map(str::to_owned);
        out.push(run);
        match next {
            Some(n) => id = n,
            None => break,
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listed_failures_retry_after_their_backoff_and_the_rest_never_do() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo attempt; exit 3",
                   "retry_policy": {"max_attempts": 3, "backoff_seconds": 1,
                                    "retry_on": ["exit_code"], "exit_codes": [3]}}),
        )
        .await?;
    let first = f.start_run(&runner, json!({})).await?;
    let runs = chain(&f, &runner, &first, 5).await?;
    ensure!(runs.len() == 3, "three attempts: {runs:#?}");
    for (i, run) in runs.iter().enumerate() {
        ensure!(
            run["status"] == "failed" && run["exit_code"] == 3 && run["attempt"] == i + 1,
            "attempt {}: {run}",
            i + 1
        );
        ensure!(run["billed_seconds"].as_u64().is_some(), "billed: {run}");
        let logs = f
            .all_logs(&runner, run["id"].as_str().context("id")?)
            .await?;
        ensure!(
            logs.len() == 1 && logs[0]["msg"] == "attempt",
            "each attempt's own output: {logs:?}"
        );
        if i > 0 {
            let before = &runs[i - 1];
            ensure!(
                run["previous_attempt_id"] == before["id"]
                    && run["first_attempt_id"] == first.as_str()
                    && run["retry_cause"] == "exit_code",
                "{run}"
            );
            // Placed only after its backoff: 1 s, then 2 s.
            let ended = at(&before["timeline"]["ended_at"]).context("ended")?;
            let assigned = at(&run["timeline"]["assigned_at"]).context("assigned")?;
            let backoff = 1_000_000_000i128 << (i - 1);
            ensure!(
                assigned - ended >= backoff,
                "attempt {} placed {} ms after the one before, before its backoff",
                i + 1,
                (assigned - ended) / 1_000_000
            );
        }
    }
    ensure!(runs[2]["next_attempt_id"].is_null(), "no fourth attempt");
    let shown = f.run(&runner, &first).await?;
    ensure!(
        shown["final_attempt"]
            == json!({"id": runs[2]["id"], "attempt": 3, "status": "failed", "exit_code": 3,
                      "error_code": null}),
        "the first run shows the outcome: {shown}"
    );

    // Not listed: a timeout (exit 124) is not an exit_code retry.
    let timed = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "sleep 30", "timeout_seconds": 1,
                   "retry_policy": {"max_attempts": 3, "retry_on": ["exit_code"]}}),
        )
        .await?;
    let run = f.start_run(&timed, json!({})).await?;
    let done = f.wait_finished(&timed, &run).await?;
    ensure!(
        done["exit_code"] == 124 && done["next_attempt_id"].is_null(),
        "{done}"
    );
    // Stopped by its user: never retried, whatever the policy lists.
    let stopped = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "sleep 30",
                   "retry_policy": {"max_attempts": 3,
                                    "retry_on": ["exit_code", "node_lost", "timeout"]}}),
        )
        .await?;
    let run = f.start_run(&stopped, json!({})).await?;
    f.wait_for(&stopped, &run, Duration::from_secs(60), |s| s == "running")
        .await?;
    f.post(&format!("/v1/runners/{stopped}/runs/{run}/stop"), json!({}))
        .await?;
    let done = f.wait_finished(&stopped, &run).await?;
    ensure!(
        done["status"] == "canceled" && done["next_attempt_id"].is_null(),
        "{done}"
    );
    // An image that cannot be pulled retries when listed.
    let missing = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "image_tag": "no-such-tag",
                   "retry_policy": {"max_attempts": 2, "retry_on": ["image_pull_failed"]}}),
        )
        .await?;
    let run = f.start_run(&missing, json!({})).await?;
    let runs = chain(&f, &missing, &run, 3).await?;
    ensure!(
        runs.len() == 2
            && runs.iter().all(|r| r["error_code"] == "image_pull_failed")
            && runs[1]["retry_cause"] == "image_pull_failed",
        "{runs:#?}"
    );
    Ok(())
}
