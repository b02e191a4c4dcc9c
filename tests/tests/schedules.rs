//! Schedules (issue #15, item 2) with real processes: each fire makes an ordinary run recorded
//! with its schedule and intended fire time; a fire happens exactly once even when the
//! scheduler is killed (-9) at fire time and restarted; `forbid` is never violated by runs
//! longer than the period; pausing stops the fires.

mod common;

use anyhow::{ensure, Context, Result};
use common::instant as at;
use common::{AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::Duration;

/// Every run of `runner` (oldest first).
async fn runs(f: &Fleet, runner: &str) -> Result<Vec<Value>> {
    let v = f
        .get(&format!("/v1/runners/{runner}/runs?limit=1000"))
        .await?;
    Ok(v["runs"].as_array().cloned().unwrap_or_default())
}

async fn schedule(f: &Fleet, runner: &str, body: Value) -> Result<Value> {
    let v = f
        .post(&format!("/v1/runners/{runner}/schedules"), body)
        .await?;
    Ok(v["schedule"].clone())
}

async fn pause(f: &Fleet, runner: &str, id: &str) -> Result<()> {
    let (status, v) = f
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/runners/{runner}/schedules/{id}"),
            Some(json!({"paused": true})),
        )
        .await?;
    ensure!(
        status == 200 && v["schedule"]["paused"] == true,
        "{status} {v}"
    );
    Ok(())
}

/// Sleeps until `instant` (RFC 3339) plus `offset`.
async fn sleep_until(instant: &Value, offset: Duration) -> Result<()> {
    let target = at(instant).context("an instant")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let wait = u64::try_from((target - now).max(0)).unwrap_or(0);
    tokio::time::sleep(Duration::from_nanos(wait) + offset).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_fire_happens_exactly_once_across_scheduler_kills_at_fire_time() -> Result<()> {
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "echo runner"}),
        )
        .await?;
    let s = schedule(
        &f,
        &runner,
        json!({"cron": "*/2 * * * * *", "run": {"command": "echo tick"}}),
    )
    .await?;
    let id = s["id"].as_str().context("schedule id")?.to_owned();
    let path = format!("/v1/runners/{runner}/schedules/{id}");
    // Three times: kill -9 the scheduler right at a fire time, start it again.
    // At, 120 ms after and 240 ms after the instant: before, during and after the fire (the
    // leader looks every 250 ms).
    for offset in [0, 120, 240] {
        let next = f.get(&path).await?["schedule"]["next_fire_at"].clone();
        sleep_until(&next, Duration::from_millis(offset)).await?;
        f.kill_scheduler()?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.start_scheduler()?;
        f.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    pause(&f, &runner, &id).await?;
    let first = at(&s["next_fire_at"]).context("first fire")?;
    let shown = f.get(&path).await?["schedule"].clone();
    let all = runs(&f, &runner).await?;
    let fires: Vec<i128> = all
        .iter()
        .filter(|r| r["schedule_id"] == id.as_str())
        .map(|r| at(&r["scheduled_for"]).context("scheduled_for"))
        .collect::<Result<_>>()?;
    common::each_fire_once(first, &fires, 2_000_000_000)?;
    ensure!(
        shown["fired"].as_u64() == Some(fires.len() as u64) && shown["skipped"] == 0,
        "{shown}"
    );
    ensure!(fires.len() >= 8, "{} fires", fires.len());
    for r in all.iter().filter(|r| r["schedule_id"] == id.as_str()) {
        let done = f
            .wait_finished(&runner, r["id"].as_str().context("id")?)
            .await?;
        ensure!(done["status"] == "succeeded", "{done}");
    }
    eprintln!(
        "{} fires, each once, across 3 kills at fire time",
        fires.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forbid_is_never_violated_by_runs_longer_than_the_period() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"instance_type": "standard-xs", "run_command": "sleep 5; echo done"}),
        )
        .await?;
    let s = schedule(
        &f,
        &runner,
        json!({"cron": "* * * * * *", "overlap": "forbid"}),
    )
    .await?;
    let id = s["id"].as_str().context("schedule id")?.to_owned();
    tokio::time::sleep(Duration::from_secs(16)).await;
    pause(&f, &runner, &id).await?;
    let mut spans = Vec::new();
    for r in runs(&f, &runner).await? {
        let done = f
            .wait_finished(&runner, r["id"].as_str().context("id")?)
            .await?;
        ensure!(
            done["status"] == "succeeded" && done["schedule_id"] == id.as_str(),
            "{done}"
        );
        let t = &done["timeline"];
        spans.push((
            at(&t["created_at"]).context("created")?,
            at(&t["ended_at"]).context("ended")?,
        ));
    }
    spans.sort();
    ensure!(spans.len() >= 2, "{} runs", spans.len());
    for w in spans.windows(2) {
        ensure!(
            w[1].0 >= w[0].1,
            "a run was created at {} before the one before it ended at {}",
            w[1].0,
            w[0].1
        );
    }
    let shown = f
        .get(&format!("/v1/runners/{runner}/schedules/{id}"))
        .await?["schedule"]
        .clone();
    ensure!(
        shown["skipped"].as_u64().unwrap_or(0) >= 8
            && shown["last_skip_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("overlap forbid")),
        "{shown}"
    );
    // Paused: no more fires.
    let count = runs(&f, &runner).await?.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        runs(&f, &runner).await?.len() == count,
        "a paused schedule fired"
    );
    Ok(())
}
