//! `density`: how many sleeping runs one node holds, how fast it fills, and what each run costs
//! the host beyond its own process (issue #13, item 5).
//!
//! Against a fleet that is up (`deploy/up.sh`) whose node `--node` has room for `--runs` runs
//! of `standard-xs` (512 MiB each: restart its agent with a large `BERTH_AGENT_MEMORY_MIB` and
//! `BERTH_AGENT_MAX_RUNS`, see docs/BENCHMARKS.md "density"): creates a runner `sleep 3600`,
//! POSTs `--runs` runs (`--concurrency` at a time), waits until all are running, and reports
//! the fill time and the start rate per tenth of the fill (from each run's own `started_at`),
//! the host's used memory (MemTotal − MemAvailable) per run, the containerd shims of the node's
//! namespace (count, PSS and RSS per run), and the agent's and containerd's RSS. Then stops every
//! run and times the node's way back to empty.
//!
//! ```text
//! cargo run --release -p berth-bench --bin density -- --runs 1000
//! ```
#![allow(clippy::print_stdout)]

use anyhow::{ensure, Context, Result};
use berth_bench::api::Api;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "density")]
struct Args {
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "/var/lib/berth/fleet/token")]
    token_file: PathBuf,
    #[arg(long, default_value = "fra")]
    region: String,
    /// The node the region's runs land on (its containerd namespace is `berth-<node>`).
    #[arg(long, default_value = "fra-1")]
    node: String,
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// POSTs in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Give up waiting for the node to fill (or empty) after this long.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

/// Reading a runner's runs.
trait RunList {
    async fn runs(&self, runner: &str) -> Result<Vec<Value>>;
}

impl RunList for Api {
    /// Every run of `runner` (pages of 1,000).
    async fn runs(&self, runner: &str) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/runners/{runner}/runs?limit=1000&after={a}"),
                None => format!("/v1/runners/{runner}/runs?limit=1000"),
            };
            let page = self.call(reqwest::Method::GET, &path, None).await?;
            let runs = page["runs"].as_array().cloned().unwrap_or_default();
            let next = page["next_after"].as_str().map(str::to_owned);
            let empty = runs.is_empty();
            all.extend(runs);
            match next {
                Some(n) if !empty => after = Some(n),
                _ => return Ok(all),
            }
        }
    }
}

/// Host memory in use (KiB): MemTotal − MemAvailable.
fn used_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Ok(field("MemTotal:").context("MemTotal")? - field("MemAvailable:").context("MemAvailable")?)
}

/// Processes whose command line contains every one of `words`: (pid, PSS KiB, RSS KiB).
fn processes(words: &[&str]) -> Vec<(u32, u64, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let kib = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !words.iter().all(|w| cmdline.contains(w)) {
                return None;
            }
            let rollup = std::fs::read_to_string(e.path().join("smaps_rollup")).ok()?;
            Some((pid, kib(&rollup, "Pss:"), kib(&rollup, "Rss:")))
        })
        .collect()
}

fn parse_micros(v: &Value) -> Option<i128> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() / 1_000)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let api = Api::new(&args.url, &args.token_file)?;
    let namespace = format!("berth-{}", args.node);
    let node_arg = format!("--node-id {}", args.node);
    let runner = api
        .create_runner(json!({
            "name": "density-bench",
            "image_name": "busybox",
            "image_tag": "latest",
            "run_command": "sleep 3600",
            "region": args.region,
            "instance_type": "standard-xs",
            "timeout_seconds": 7200,
        }))
        .await?;
    // One run first: the image on the node, and the baseline taken without it.
    let first = api.start_run(&runner, json!({"command": "true"})).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/runners/{runner}/runs/{first}"),
                None,
            )
            .await?;
        if r["run"]["status"] == "succeeded" {
            break;
        }
        ensure!(Instant::now() < deadline, "warm-up run: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used_before = used_kib()?;
    let agent_before = processes(&["berth-node-agent", &node_arg]);

    let posted = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..args.runs)
        .map(|_| {
            let api = &api;
            let runner = &runner;
            async move { api.start_run(runner, json!({})).await }
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let post_time = posted.elapsed();
    let limit = Duration::from_secs(args.timeout_s);
    let runs = loop {
        let runs = api.runs(&runner).await?;
        let running = runs.iter().filter(|r| r["status"] == "running").count();
        let failed: Vec<&Value> = runs
            .iter()
            .filter(|r| r["status"] == "failed" && r["id"] != first.as_str())
            .collect();
        ensure!(failed.is_empty(), "runs failed: {:?}", failed.first());
        if running >= ids.len() {
            break runs;
        }
        ensure!(
            posted.elapsed() < limit,
            "{running} of {} running after {limit:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let fill_time = posted.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used_after = used_kib()?;
    let shims = processes(&["containerd-shim", &format!("-namespace {namespace} ")]);
    let agent = processes(&["berth-node-agent", &node_arg]);
    let containerd = processes(&["containerd", "--config"]);

    // The fill curve from the runs' own start times.
    let mut started: Vec<i128> = runs
        .iter()
        .filter(|r| r["status"] == "running")
        .filter_map(|r| {
            parse_micros(&r["timeline"]["started_at"]).or_else(|| parse_micros(&r["started_at"]))
        })
        .collect();
    started.sort_unstable();
    let n = started.len();
    let origin = started.first().copied().unwrap_or(0);
    let mut deciles = Vec::new();
    let mut previous = (0usize, origin);
    for k in 1..=10 {
        let idx = (n * k / 10).max(1) - 1;
        let at = started.get(idx).copied().unwrap_or(origin);
        let count = idx + 1 - previous.0;
        let secs = (at - previous.1) as f64 / 1e6;
        deciles.push(if secs > 0.0 { count as f64 / secs } else { 0.0 });
        previous = (idx + 1, at);
    }

    // Back to empty.
    let stopping = Instant::now();
    futures::stream::iter(ids.iter())
        .map(|run| {
            let api = &api;
            let runner = &runner;
            async move {
                api.call(
                    reqwest::Method::POST,
                    &format!("/v1/runners/{runner}/runs/{run}/stop"),
                    Some(json!({})),
                )
                .await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    loop {
        let left = processes(&["containerd-shim", &format!("-namespace {namespace} ")]).len();
        let runs = api.runs(&runner).await?;
        let active = runs
            .iter()
            .filter(|r| matches!(r["status"].as_str(), Some("running" | "pending")))
            .count();
        if left == 0 && active == 0 {
            break;
        }
        ensure!(
            stopping.elapsed() < limit,
            "{active} runs, {left} shims after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let empty_time = stopping.elapsed();
    api.delete_runner(&runner).await;

    let per_run = |kib: u64| kib as f64 / n.max(1) as f64 / 1024.0;
    let shim_pss: u64 = shims.iter().map(|s| s.1).sum();
    let shim_rss: u64 = shims.iter().map(|s| s.2).sum();
    let agent_rss = agent.first().map_or(0, |a| a.2);
    let agent_rss_before = agent_before.first().map_or(0, |a| a.2);
    let containerd_rss: u64 = containerd.iter().map(|c| c.2).sum();
    let used = used_after.saturating_sub(used_before);
    println!("density: {n} sleeping runs on {}", args.node);
    println!(
        "fill: {:.1} s for all running ({:.1} runs/s; POSTs took {:.1} s)",
        fill_time.as_secs_f64(),
        n as f64 / fill_time.as_secs_f64(),
        post_time.as_secs_f64()
    );
    println!(
        "start rate per tenth of the fill (runs/s): {}",
        deciles
            .iter()
            .map(|d| format!("{d:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "host memory used: +{:.2} MiB per run ({:.0} MiB in all)",
        per_run(used),
        used as f64 / 1024.0
    );
    println!(
        "shims: {} processes, PSS {:.2} MiB per run, RSS {:.2} MiB per run",
        shims.len(),
        per_run(shim_pss),
        per_run(shim_rss)
    );
    println!(
        "agent RSS {:.1} MiB (before {:.1} MiB), containerd RSS {:.1} MiB",
        agent_rss as f64 / 1024.0,
        agent_rss_before as f64 / 1024.0,
        containerd_rss as f64 / 1024.0
    );
    println!(
        "back to empty after stopping all: {:.1} s",
        empty_time.as_secs_f64()
    );
    println!(
        "{}",
        json!({
            "runs": n,
            "fill_s": fill_time.as_secs_f64(),
            "fill_runs_per_s": n as f64 / fill_time.as_secs_f64(),
            "start_rate_per_tenth": deciles,
            "host_used_mib_per_run": per_run(used),
            "shims": shims.len(),
            "shim_pss_mib_per_run": per_run(shim_pss),
            "shim_rss_mib_per_run": per_run(shim_rss),
            "agent_rss_mib": agent_rss as f64 / 1024.0,
            "containerd_rss_mib": containerd_rss as f64 / 1024.0,
            "empty_s": empty_time.as_secs_f64(),
        })
    );
    Ok(())
}
