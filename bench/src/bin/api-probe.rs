//! `api-probe`: what a client of a running `berth-api` sees under two kinds of trouble.
//!
//! - `flood`: opens `--idle` silent and `--slow` slow-header TCP connections to the API (a byte
//!   of header every second), and meanwhile sends authenticated `GET /v1/runners`, each on a
//!   fresh connection, `--concurrency` at a time for `--hold-seconds`. Reports those requests'
//!   success and latency (and the same without the flood, first), how many flood connections
//!   the API closed, and the API's RSS (`--api-pid`).
//! - `watch`: sends `GET /v1/runners` every `--interval-ms` for `--seconds` and reports every
//!   status seen, the longest stretch without a 200 (the unavailability window) and how many
//!   answers were neither 200 nor 503. Run it while restarting the scheduler.
//!
//! Loopback only: `--addr` must be a `127.0.0.1` address. Prints one JSON object on its last
//! line.
//!
//! ```text
//! cargo run --release -p berth-bench --bin api-probe -- flood --addr 127.0.0.1:8080 --token-file /var/lib/berth/fleet/token
//! cargo run --release -p berth-bench --bin api-probe -- watch --addr 127.0.0.1:8080 --token-file /var/lib/berth/fleet/token --seconds 20
//! ```
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use berth_bench::stats::{millis, Summary};
use clap::{Parser, Subcommand};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "api-probe")]
struct Args {
    /// The API's address (loopback).
    #[arg(long, global = true, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// A file holding the bearer token (e.g. the fleet's admin token).
    #[arg(long, global = true, default_value = "/var/lib/berth/fleet/token")]
    token_file: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Flood {
        #[arg(long, default_value_t = 15_000)]
        idle: usize,
        #[arg(long, default_value_t = 1_000)]
        slow: usize,
        #[arg(long, default_value_t = 60)]
        hold_seconds: u64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// The API's pid, to report its RSS.
        #[arg(long)]
        api_pid: Option<u32>,
    },
    Watch {
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
}

/// One `GET path` on a fresh connection: its status (0 when it failed) and how long it took.
async fn get(addr: SocketAddr, token: &str, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        let head = String::from_utf8_lossy(&answer[..answer.len().min(16)]).into_owned();
        anyhow::Ok(
            head.split(' ')
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0),
        )
    };
    let status = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(status)) => status,
        _ => 0,
    };
    (status, started.elapsed())
}

/// Authenticated requests, `concurrency` at a time, until `until`: (ok, failed, latencies).
async fn load(
    addr: SocketAddr,
    token: &str,
    concurrency: usize,
    until: Instant,
) -> (usize, usize, Vec<Duration>) {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
            while Instant::now() < until {
                let (status, took) = get(addr, &token, "/v1/runners").await;
                if status == 200 {
                    ok += 1;
                    lat.push(took);
                } else {
                    failed += 1;
                }
            }
            (ok, failed, lat)
        }));
    }
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        if let Ok((o, f, l)) = t.await {
            ok += o;
            failed += f;
            lat.extend(l);
        }
    }
    (ok, failed, lat)
}

fn summary(ok: usize, failed: usize, lat: Vec<Duration>) -> serde_json::Value {
    let s = Summary::of(lat);
    json!({"ok": ok, "failed": failed, "p50_ms": millis(s.p50), "p99_ms": millis(s.p99),
        "max_ms": millis(s.max)})
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn flood(
    addr: SocketAddr,
    token: &str,
    (idle, slow, hold_seconds, concurrency): (usize, usize, u64, usize),
    api_pid: Option<u32>,
) -> Result<serde_json::Value> {
    let baseline = load(
        addr,
        token,
        concurrency,
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    let started = Instant::now();
    let mut idle_conns = Vec::with_capacity(idle);
    let mut slow_conns = Vec::with_capacity(slow);
    let mut connect_failures = 0usize;
    for i in 0..idle + slow {
        match TcpStream::connect(addr).await {
            Ok(mut s) if i >= idle => {
                let _ = s
                    .write_all(b"GET /v1/runners HTTP/1.1\r\nHost: x\r\n")
                    .await;
                slow_conns.push(s);
            }
            Ok(s) => idle_conns.push(s),
            Err(_) => connect_failures += 1,
        }
    }
    let opened_in = started.elapsed();
    let until = Instant::now() + Duration::from_secs(hold_seconds);
    let trickle = async {
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for s in &mut slow_conns {
                let _ = s.write_all(b"X").await;
            }
        }
    };
    let (during, ()) = tokio::join!(load(addr, token, concurrency, until), trickle);
    let closed = |conns: &[TcpStream]| {
        conns
            .iter()
            .filter(|s| {
                let mut buf = [0u8; 256];
                !matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    let (rss, peak) = api_pid.map(rss_kib).unwrap_or((0, 0));
    Ok(json!({
        "bench": "api-flood",
        "idle": idle, "slow": slow, "hold_seconds": hold_seconds, "concurrency": concurrency,
        "connect_failures": connect_failures,
        "flood_opened_in_ms": millis(opened_in),
        "baseline": summary(baseline.0, baseline.1, baseline.2),
        "during_flood": summary(during.0, during.1, during.2),
        "idle_closed_by_api": closed(&idle_conns),
        "slow_closed_by_api": closed(&slow_conns),
        "api_rss_mib_at_end": rss / 1024,
        "api_peak_rss_mib": peak / 1024,
    }))
}

async fn watch(
    addr: SocketAddr,
    token: &str,
    seconds: u64,
    interval: Duration,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut down_since, mut longest, mut windows) = (None::<Instant>, Duration::ZERO, 0usize);
    let mut first_down_at = None;
    while Instant::now() < until {
        let at = Instant::now();
        let (status, _) = get(addr, token, "/v1/runners").await;
        *counts.entry(status).or_default() += 1;
        match (status == 200, down_since) {
            (false, None) => {
                down_since = Some(at);
                windows += 1;
                first_down_at.get_or_insert(at.duration_since(started));
            }
            (true, Some(since)) => {
                longest = longest.max(at.duration_since(since));
                down_since = None;
            }
            _ => {}
        }
        tokio::time::sleep_until((at + interval).into()).await;
    }
    if let Some(since) = down_since {
        longest = longest.max(Instant::now().duration_since(since));
    }
    let neither = counts
        .iter()
        .filter(|(s, _)| **s != 200 && **s != 503)
        .map(|(_, n)| n)
        .sum::<usize>();
    Ok(json!({
        "bench": "api-watch",
        "seconds": seconds, "interval_ms": millis(interval),
        "answers": counts.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
        "neither_200_nor_503": neither,
        "unavailable_windows": windows,
        "longest_unavailable_ms": millis(longest),
        "first_unavailable_at_ms": first_down_at.map(millis),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!("--addr must be a loopback address");
    }
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?
        .trim()
        .to_owned();
    let report = match args.command {
        Command::Flood {
            idle,
            slow,
            hold_seconds,
            concurrency,
            api_pid,
        } => {
            flood(
                args.addr,
                &token,
                (idle, slow, hold_seconds, concurrency),
                api_pid,
            )
            .await?
        }
        Command::Watch {
            seconds,
            interval_ms,
        } => {
            watch(
                args.addr,
                &token,
                seconds,
                Duration::from_millis(interval_ms),
            )
            .await?
        }
    };
    println!("{report}");
    Ok(())
}
