//! End-to-end: run-ended webhooks (issue #15) against a receiver on loopback. A runner with a
//! `notify_url` gets one signed event per ended run: the receiver checks the HMAC signature with
//! the runner's secret, answers 500 twice then 204, and the run's view shows the three attempts
//! and `delivered`; the scheduler killed -9 and restarted while a delivery waits for its next
//! attempt delivers it afterwards. Without `--webhook-allow-private-networks` a loopback
//! receiver is never called and the run's attempts say why.

mod common;

use anyhow::{ensure, Context, Result};
use common::{AgentSpec, Fleet, FleetOptions};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "e2e-webhook-signing-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 receiver on 127.0.0.1: answers each request with the next status of
/// `answers` (the last one from then on) and records it.
async fn receiver(answers: Vec<u16>) -> Result<(String, Arc<Mutex<Vec<Received>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks/berth", listener.local_addr()?);
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, length) = loop {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..at]).to_string();
                        let length = head
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (at + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let headers = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect();
                let body = buf[head_end..head_end + length].to_vec();
                let status = {
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.push(Received { headers, body });
                    answers
                        .get(seen.len() - 1)
                        .or(answers.last())
                        .copied()
                        .unwrap_or(200)
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((url, got))
}

fn received(got: &Arc<Mutex<Vec<Received>>>) -> Vec<Received> {
    got.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn notification_settles(
    f: &Fleet,
    runner: &str,
    run: &str,
    within: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let r = f.run(runner, run).await?;
        let status = r["notification"]["status"].as_str().unwrap_or("");
        if status == "delivered" || status == "failed" {
            return Ok(r["notification"].clone());
        }
        ensure!(Instant::now() < deadline, "not settled: {r}\n{}", f.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_signed_event_is_retried_until_delivered_across_a_scheduler_kill() -> Result<()> {
    let mut f = Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            scheduler_args: vec!["--webhook-allow-private-networks".into()],
            ..FleetOptions::default()
        },
    )
    .await?;
    let (url, got) = receiver(vec![500, 500, 204]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "echo hi; exit 7", "notify_url": url, "notify_secret": SECRET}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let ended = f.wait_finished(&runner, &run).await?;
    ensure!(ended["exit_code"] == 7, "{ended}");

    // The first attempt comes at once and fails; once it is recorded, kill -9 the scheduler
    // while the second waits for its backoff (1 s), then start it again: the new process
    // delivers the rest. (A kill between an attempt and its record would make the next leader
    // repeat that attempt: at least once, deduped on Berth-Event-Id.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = f.run(&runner, &run).await?;
        if r["notification"]["attempts_made"] == 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no attempt recorded: {r}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        received(&got).len() == 1,
        "the second attempt came before the kill"
    );
    f.kill_scheduler()?;
    f.start_scheduler()?;
    let n = notification_settles(&f, &runner, &run, Duration::from_secs(60)).await?;
    ensure!(n["status"] == "delivered", "{n}");
    let codes: Vec<Value> = n["attempts"]
        .as_array()
        .context("attempts")?
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    ensure!(codes == [json!(500), json!(500), json!(204)], "{n}");
    ensure!(
        n["attempts"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{n}"
    );
    ensure!(n["attempts"][2]["error"].is_null(), "{n}");

    // Every request: the same event, signed with the secret, attempt numbers 1, 2, 3.
    let all = received(&got);
    ensure!(all.len() == 3, "{} requests: {all:?}", all.len());
    for (i, r) in all.iter().enumerate() {
        let signature = r.header("Berth-Signature").context("no signature")?;
        let t = berth_core::webhook::verify(SECRET, signature, &r.body)
            .with_context(|| format!("a bad signature: {signature}"))?;
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        )?;
        ensure!((now - t).abs() < 120, "stale timestamp {t}");
        ensure!(r.header("Berth-Event-Id") == Some(run.as_str()), "{r:?}");
        ensure!(
            r.header("Berth-Delivery-Attempt") == Some((i + 1).to_string().as_str()),
            "{r:?}"
        );
        ensure!(r.body == all[0].body, "the event changed between attempts");
        ensure!(
            berth_core::webhook::verify("another-secret-entirely", signature, &r.body).is_none()
        );
    }
    let event: Value = serde_json::from_slice(&all[0].body)?;
    ensure!(
        event["type"] == "run.ended"
            && event["run"]["id"] == run.as_str()
            && event["run"]["runner_id"] == runner.as_str()
            && event["run"]["status"] == "failed"
            && event["run"]["exit_code"] == 7,
        "{event}"
    );
    Ok(())
}

#[tokio::test]
async fn loopback_receivers_are_refused_unless_the_operator_allows_them() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (url, got) = receiver(vec![204]).await?;
    let runner = f
        .runner(
            "fra",
            json!({"run_command": "true", "notify_url": url, "notify_secret": SECRET}),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    f.wait_finished(&runner, &run).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let n = loop {
        let r = f.run(&runner, &run).await?;
        if r["notification"]["attempts_made"].as_u64().unwrap_or(0) >= 1 {
            break r["notification"].clone();
        }
        ensure!(Instant::now() < deadline, "no attempt recorded: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(n["status"] == "pending", "{n}");
    ensure!(
        n["attempts"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a public address")),
        "{n}"
    );
    ensure!(n["attempts"][0]["status_code"].is_null(), "{n}");
    ensure!(
        received(&got).is_empty(),
        "the loopback receiver was called"
    );
    Ok(())
}
