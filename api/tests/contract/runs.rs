//! Runs without a node: they wait and say why, can be stopped, are paged, and an
//! `Idempotency-Key` makes a retried POST return the first run.

use crate::harness::{Api, TOKEN};
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn a_pending_run_can_be_stopped_and_says_why_it_waits() -> Result<()> {
    // One ams node only: a fra run can never be placed.
    let f = Api::start().await?;
    let runner = f
        .runner("fra", json!({"run_command": "echo never"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.run(&runner, &run).await?;
    ensure!(
        r["status"] == "pending" && r["pending_reason"] == "no node in fra is registered",
        "{r}"
    );
    let stopped = f
        .post(&format!("/v1/runners/{runner}/runs/{run}/stop"), json!({}))
        .await?;
    ensure!(
        stopped["run"]["status"] == "canceled" && stopped["run"]["started_at"].is_null(),
        "{stopped}"
    );
    let runs = f.get(&format!("/v1/runners/{runner}/runs")).await?;
    ensure!(
        runs["runs"]
            .as_array()
            .is_some_and(|l| l.len() == 1 && l[0]["status"] == "canceled"),
        "{runs}"
    );
    Ok(())
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_post_return_the_same_run() -> Result<()> {
    let f = Api::start().await?;
    let runner = f.runner("fra", json!({"run_command": "echo once"})).await?;
    let post = |key: &'static str| {
        f.http
            .post(format!("{}/v1/runners/{runner}/runs", f.api_url))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", key)
            .json(&json!({}))
            .send()
    };
    let first = post("order-42").await?;
    ensure!(first.status() == 201, "{}", first.status());
    let first: serde_json::Value = first.json().await?;
    let again = post("order-42").await?;
    ensure!(again.status() == 200, "{}", again.status());
    ensure!(again
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true"));
    let again: serde_json::Value = again.json().await?;
    ensure!(
        again["run"]["id"] == first["run"]["id"],
        "{first} vs {again}"
    );
    let other: serde_json::Value = post("order-43").await?.json().await?;
    ensure!(other["run"]["id"] != first["run"]["id"]);
    let runs = f.get(&format!("/v1/runners/{runner}/runs")).await?;
    ensure!(runs["runs"].as_array().map(Vec::len) == Some(2), "{runs}");
    let bad = post("has space").await?;
    ensure!(bad.status() == 422);
    let body: serde_json::Value = bad.json().await?;
    ensure!(body["errors"][0]["field"] == "Idempotency-Key", "{body}");
    Ok(())
}

/// A runner's runs come in pages, oldest first: `limit` (1 to 1,000, default 100) and `after`
/// (the previous page's `next_after`, `null` on the last page).
#[tokio::test]
async fn runs_are_listed_in_pages_oldest_first() -> Result<()> {
    let f = Api::start().await?;
    // No node in ams: the runs wait, which is all a listing needs.
    let runner = f.runner("ams", json!({})).await?;
    let created = f
        .post(
            &format!("/v1/runners/{runner}/runs/batch"),
            json!({"runs": [{}, {}, {}, {}, {}]}),
        )
        .await?;
    let mut want: Vec<String> = created["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    want.sort(); // ids order by creation
    ensure!(want.len() == 5, "{created}");

    let base = format!("/v1/runners/{runner}/runs");
    let all = f.get(&base).await?;
    ensure!(all["next_after"].is_null(), "{all}");
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect()
    };
    ensure!(ids(&all) == want, "{all}");

    let mut seen = vec![];
    let mut path = format!("{base}?limit=2");
    let mut pages = 0;
    loop {
        let page = f.get(&path).await?;
        pages += 1;
        seen.extend(ids(&page));
        match page["next_after"].as_str() {
            Some(next) => path = format!("{base}?limit=2&after={next}"),
            None => break,
        }
        ensure!(pages < 10, "the pages never end: {page}");
    }
    ensure!(pages == 3 && seen == want, "{pages} pages: {seen:?}");

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("limit=", "limit"),
        ("after=not%20an%20id", "after"),
    ] {
        let (status, v) = f
            .request(Method::GET, &format!("{base}?{query}"), None)
            .await?;
        ensure!(
            status == 422 && v["errors"][0]["field"] == field,
            "{query}: {status} {v}"
        );
    }
    let (status, v) = f
        .request(Method::GET, &format!("{base}?limit=1000"), None)
        .await?;
    ensure!(status == 200 && ids(&v) == want, "{status} {v}");
    Ok(())
}

/// `ephemeral: true` answers the run's node and its claim, once: a read shows neither the claim
/// nor a place in a queue. Batches and schedules refuse it, naming the field.
#[tokio::test]
async fn an_ephemeral_run_shows_its_node_and_its_claim_once() -> Result<()> {
    let f = Api::start().await?;
    let runner = f.runner("fra", json!({"run_command": "echo here"})).await?;
    let created = f
        .post(
            &format!("/v1/runners/{runner}/runs"),
            json!({"ephemeral": true}),
        )
        .await?;
    let r = &created["run"];
    let id = r["id"].as_str().unwrap_or_default();
    ensure!(
        r["ephemeral"]["node_id"] == format!("eph-{id}")
            && r["ephemeral"]["connect_by"].is_string()
            && r["ephemeral_claim"]
                .as_str()
                .is_some_and(|c| c.starts_with("berthclaim_"))
            && r["retry_policy"].is_null(),
        "{created}"
    );
    let read = f.run(&runner, id).await?;
    ensure!(
        read["ephemeral_claim"].is_null()
            && read["ephemeral"]["node_id"] == r["ephemeral"]["node_id"]
            && read["queue_position"].is_null()
            && read["pending_reason"]
                .as_str()
                .is_some_and(|p| p.starts_with("waiting for its ephemeral node eph-")),
        "{read}"
    );
    let plain = f.start_run(&runner, json!({})).await?;
    let plain = f.run(&runner, &plain).await?;
    ensure!(
        plain["ephemeral"].is_null() && plain["ephemeral_claim"].is_null(),
        "{plain}"
    );

    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/runs/batch"),
            Some(json!({"runs": [{}, {"ephemeral": true}]})),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "runs[1].ephemeral",
        "{status} {v}"
    );
    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/schedules"),
            Some(json!({"cron": "* * * * *", "run": {"ephemeral": true}})),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "run.ephemeral",
        "{status} {v}"
    );
    Ok(())
}
