//! End-to-end: run logs on etcd (issue 11, item 6, "logs do not make etcd the bottleneck")
//! against a private etcd, the real scheduler on it (`--store etcd://…`), the API, an agent and
//! containerd.
//!
//! The fault: the scheduler stored every log line as its own store key, for ever: a run of
//! 3,000 lines was 3,000 etcd keys (and raft entries), and nothing ever removed them. Here the
//! run's lines must come back whole and in order through pages and SSE, while etcd holds them
//! as a few compressed chunks, every one attached to one shared lease whose TTL follows
//! `--log-retention-hours` (so etcd itself deletes them when the retention is over).

mod common;

use anyhow::{ensure, Context, Result};
use berth_core::testkit::etcd::EtcdCluster;
use common::{msgs, read_sse, AgentSpec, Fleet};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const LINES: u64 = 3000;
const RETENTION_HOURS: u64 = 2;

#[tokio::test]
async fn a_runs_lines_are_a_few_chunks_on_one_expiring_lease_in_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let store = etcd.store_url();
    let retention = RETENTION_HOURS.to_string();
    let f = Fleet::start_with(
        &[AgentSpec::new("fra")],
        &["--store", &store, "--log-retention-hours", &retention],
    )
    .await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": format!("i=1; while [ $i -le {LINES} ]; do echo line$i; i=$((i+1)); done")}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let done = f.wait_finished(&runner, &run).await?;
    ensure!(done["status"] == "succeeded", "{done}");

    // Every line, once, in order: through pages of 1000 and of 7, and through SSE.
    let want: Vec<String> = (1..=LINES).map(|i| format!("line{i}")).collect();
    let logs = f.all_logs(&runner, &run).await?;
    ensure!(msgs(&logs, "stdout") == want, "{} lines paged", logs.len());
    let ids: Vec<u64> = logs.iter().filter_map(|l| l["id"].as_u64()).collect();
    ensure!(
        ids == (1..=LINES).collect::<Vec<_>>(),
        "ids are the line seqs"
    );
    let base = format!("/v1/runners/{runner}/runs/{run}/logs");
    let mut after = 1234u64;
    let mut small = Vec::new();
    while after < LINES {
        let page = f.get(&format!("{base}?limit=7&after_id={after}")).await?;
        let lines = page["logs"].as_array().cloned().unwrap_or_default();
        ensure!(!lines.is_empty(), "{page}");
        after = page["next_after_id"].as_u64().context("next_after_id")?;
        small.extend(lines);
    }
    ensure!(
        msgs(&small, "stdout") == want[1234..],
        "pages of 7 from 1234"
    );
    let events = read_sse(
        &f,
        &format!("{base}/stream"),
        Some("2990"),
        Duration::from_secs(30),
    )
    .await?;
    let sse_ids: Vec<Option<String>> = events.iter().map(|e| e.id.clone()).collect();
    let mut want_ids: Vec<Option<String>> = (2991..=LINES).map(|i| Some(i.to_string())).collect();
    want_ids.push(None);
    ensure!(sse_ids == want_ids, "SSE resumes after 2990: {sse_ids:?}");

    // In etcd: a few chunks, not a key per line, all on one lease of retention + bucket.
    let got: Value = serde_json::from_str(&etcd.ctl(&[
        "get",
        "--prefix",
        &format!("/berth/logs/{run}/"),
        "-w",
        "json",
    ])?)?;
    let kvs = got["kvs"].as_array().cloned().unwrap_or_default();
    ensure!(
        !kvs.is_empty() && kvs.len() * 10 <= LINES as usize,
        "{} etcd keys for {LINES} lines",
        kvs.len()
    );
    let leases: BTreeSet<u64> = kvs
        .iter()
        .map(|kv| kv["lease"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        leases.len() == 1 && !leases.contains(&0),
        "every chunk on one shared lease: {leases:?}"
    );
    let lease = leases.iter().next().copied().unwrap_or(0);
    let ttl: Value = serde_json::from_str(&etcd.ctl(&[
        "lease",
        "timetolive",
        &format!("{lease:x}"),
        "-w",
        "json",
    ])?)?;
    // Two hours, plus a bucket of an eighth of them.
    let granted = ttl["granted-ttl"].as_u64().context("granted-ttl")?;
    ensure!(
        granted == RETENTION_HOURS * 3600 + RETENTION_HOURS * 3600 / 8,
        "lease granted for {granted} s: {ttl}"
    );
    Ok(())
}
