//! End-to-end: per-second metering of real runs and `GET /v1/usage`.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet};
use serde_json::json;

/// An RFC 3339 timestamp of the API (e.g. `2026-11-25T12:57:29.968Z`) as comparable millis.
fn millis(ts: &serde_json::Value) -> Result<i128> {
    let s = ts.as_str().context("timestamp")?;
    time_of(s).with_context(|| format!("bad timestamp {s}"))
}

/// Milliseconds since midnight of the timestamp's day plus days × 86,400,000 — enough to
/// subtract two timestamps of one test run.
fn time_of(s: &str) -> Option<i128> {
    let (date, rest) = s.split_once('T')?;
    let day: i128 = date.split('-').nth(2)?.parse().ok()?;
    let rest = rest.trim_end_matches('Z');
    let mut parts = rest.split(':');
    let (h, m): (i128, i128) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(((day * 24 + h) * 60 + m) * 60_000 + (sec * 1000.0).round() as i128)
}

#[tokio::test]
async fn runs_are_billed_by_the_second_from_their_real_start_and_usage_adds_them_up() -> Result<()>
{
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"run_command": "sleep 1.2"})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");
    let ran = millis(&r["completed_at"])? - millis(&r["started_at"])?;
    let billed = r["billed_seconds"].as_u64().context("billed_seconds")?;
    ensure!(
        billed as i128 == (ran + 999) / 1000 && billed >= 2,
        "1.2 s of real run time rounds up: {r}"
    );
    let price = r["price_per_second_usd"].as_f64().context("price")?;
    ensure!(
        (price - 0.000004).abs() < 1e-12,
        "standard-s price recorded on the run: {r}"
    );
    let cost = r["cost_usd"].as_f64().context("cost")?;
    ensure!((cost - billed as f64 * price).abs() < 1e-12, "{r}");

    // A run canceled while pending is never billed.
    let nowhere = f
        .runner("ams", json!({"run_command": "echo never"}))
        .await?;
    let pending = f.start_run(&nowhere, json!({})).await?;
    let stopped = f
        .post(
            &format!("/v1/runners/{nowhere}/runs/{pending}/stop"),
            json!({}),
        )
        .await?;
    ensure!(
        stopped["run"]["status"] == "canceled" && stopped["run"]["billed_seconds"].is_null(),
        "{stopped}"
    );

    let usage = f.get("/v1/usage?group_by=instance_type").await?;
    let rows = usage["usage"].as_array().context("rows")?;
    ensure!(
        rows.len() == 1 && rows[0]["key"] == "standard-s" && rows[0]["runs"] == 1,
        "{usage}"
    );
    ensure!(
        rows[0]["billed_seconds"] == billed && usage["total"]["billed_seconds"] == billed,
        "{usage}"
    );
    let by_runner = f.get("/v1/usage?group_by=runner").await?;
    ensure!(
        by_runner["usage"][0]["key"] == runner.as_str(),
        "{by_runner}"
    );
    let past = f.get("/v1/usage?from=2020-01-01&to=2020-01-02").await?;
    ensure!(
        past["usage"].as_array().is_some_and(Vec::is_empty),
        "{past}"
    );
    let (status, body) = f
        .request(reqwest::Method::GET, "/v1/usage?group_by=planet", None)
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "group_by",
        "{status} {body}"
    );
    let (status, body) = f
        .request(reqwest::Method::GET, "/v1/usage?from=yesterday", None)
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "from",
        "{status} {body}"
    );
    Ok(())
}
