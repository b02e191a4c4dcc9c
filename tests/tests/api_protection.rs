//! End-to-end: the API process under trouble (issue #10, items 4 and 5), with real scheduler
//! and API processes on loopback.
//! - A flood of idle and slow-header connections (bounded: a few hundred sockets against an
//!   API started with a low `--max-connections` and a short `--header-read-timeout`) neither
//!   locks out authenticated requests nor stays open.
//! - While the scheduler is killed and restarted, every answer is 200 or 503 `unavailable`,
//!   never 500; the window of 503s is printed (the figure is in docs/BENCHMARKS.md, measured
//!   with `api-probe watch` on the release fleet).
//! - A scheduler with an agent attached stops on SIGTERM within its grace (it used to wait for
//!   the agent's stream forever, until deploy/up.sh's SIGKILL after 10 s), and the agent and the
//!   API, left running, work with the next scheduler.
//!
//! The in-process tier (`api/tests/contract/protection.rs`) covers each limit in detail.

mod common;

use anyhow::{ensure, Context, Result};
use common::{pid_with_args, AgentSpec, Fleet, FleetOptions, TOKEN};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn api_addr(f: &Fleet) -> String {
    f.api_url.trim_start_matches("http://").to_owned()
}

/// Whether the server has closed `s` (EOF or reset), waiting at most `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn an_idle_and_slow_header_flood_neither_locks_out_keys_nor_stays_open() -> Result<()> {
    const CAP: usize = 64;
    const IDLE: usize = 600;
    const SLOW: usize = 200;
    let f = Fleet::start_opts(
        &[],
        FleetOptions {
            api_args: ["--max-connections", "64", "--header-read-timeout", "2"]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            ..Default::default()
        },
    )
    .await?;
    let addr = api_addr(&f);
    let mut flood = Vec::with_capacity(IDLE + SLOW);
    for i in 0..IDLE + SLOW {
        let mut s = TcpStream::connect(&addr).await?;
        if i >= IDLE {
            s.write_all(b"GET /v1/runners HTTP/1.1\r\nHost: x\r\n")
                .await?;
        }
        flood.push(s);
    }
    // New clients (a fresh connection each) are served while the flood holds on.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    for i in 0..20 {
        let res = client
            .get(format!("{}/v1/runners", f.api_url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .with_context(|| format!("request {i} during the flood"))?;
        ensure!(res.status() == 200, "request {i}: {}", res.status());
        for _ in 0..CAP / 4 {
            flood.push(TcpStream::connect(&addr).await?);
        }
    }
    // Every flood connection is closed: by the cap at once, or by the header timeout (2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut open = 0;
    for s in &mut flood {
        if !closed(s, Duration::from_millis(20)).await {
            open += 1;
        }
    }
    ensure!(
        open == 0,
        "{open} of {} flood connections still open",
        flood.len()
    );
    Ok(())
}

#[tokio::test]
async fn a_scheduler_killed_and_restarted_makes_503s_never_500s() -> Result<()> {
    let mut f = Fleet::start(&[]).await?;
    let url = format!("{}/v1/runners", f.api_url);
    let http = f.http.clone();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    // Eight callers back to back, so calls are in flight when the scheduler dies.
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (http, url, mut stopped) = (http.clone(), url.clone(), stopped.clone());
        callers.push(tokio::spawn(async move {
            let mut seen: Vec<(Instant, u16, String)> = Vec::new();
            while !*stopped.borrow_and_update() {
                let at = Instant::now();
                match http.get(&url).bearer_auth(TOKEN).send().await {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        let body = res.text().await.unwrap_or_default();
                        seen.push((at, status, body));
                    }
                    Err(e) => seen.push((at, 0, e.to_string())),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    f.kill_scheduler()?;
    // A request waits up to the API's failover budget (5 s) for a scheduler to answer; down
    // longer than that, the callers see 503s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    f.start_scheduler()?;
    // Until the API answers 200 again (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = http.get(&url).bearer_auth(TOKEN).send().await;
        if matches!(&res, Ok(r) if r.status() == 200) {
            break;
        }
        ensure!(Instant::now() < deadline, "the API did not recover in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    stopped.mark_changed();
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for c in callers {
        for (_, status, body) in c.await? {
            *counts.entry(status).or_default() += 1;
            let ok = status == 200 || (status == 503 && body.contains("\"code\":\"unavailable\""));
            if !ok {
                bad.push(format!("{status} {body}"));
            }
        }
    }
    eprintln!(
        "answers {counts:?}; unavailable from the kill for {:?} (scheduler down 6 s of it)",
        back_at.duration_since(killed_at)
    );
    ensure!(bad.is_empty(), "answers other than 200 or 503: {bad:?}");
    ensure!(
        counts.get(&503).copied().unwrap_or(0) > 0,
        "no 503 seen: {counts:?}"
    );
    Ok(())
}

/// Whether `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_scheduler_with_an_attached_agent_stops_on_sigterm_and_its_clients_carry_on() -> Result<()>
{
    let mut f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let data_dir = f.dir.path().join("scheduler");
    let pid = pid_with_args(&["berth-scheduler", &data_dir.to_string_lossy()])
        .context("the scheduler's pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM {pid}");
    // Its grace is 2 s; before, it never stopped while the agent's stream was open.
    let deadline = Instant::now() + Duration::from_secs(8);
    while !exited(pid) {
        ensure!(
            Instant::now() < deadline,
            "the scheduler did not stop within 8 s of SIGTERM with an agent attached"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.kill_scheduler()?; // reaps it
    f.start_scheduler()?;
    // The same API process reaches the new scheduler once it listens (503 until then)…
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.get("/v1/runners").await.is_err() {
        ensure!(
            Instant::now() < deadline,
            "the API did not reach the new scheduler"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // …and so does the same agent.
    f.wait_node_status(&node, "ready", Duration::from_secs(30))
        .await?;
    Ok(())
}
