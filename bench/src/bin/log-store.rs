//! `log-store`: what storing run logs costs the store, one key per line (the layout before log
//! chunks) against compressed chunks (`berth_core::log_chunks`), side by side in one process
//! on the embedded store.
//!
//! `--runs` runs each append `--lines-per-run` lines in batches of `--batch` (as an agent
//! reports them), all runs at once, to a fresh `EmbeddedStore` per layout and round. The
//! per-line layout writes what the scheduler wrote before: one transaction per batch with one
//! put per line (the JSON `LogEntry`). The chunk layout goes through the scheduler's own path:
//! the range read for lines already stored (`log_chunks::stored_spans`), `log_chunks::plan`,
//! and `log_chunks::txns` with the default retention (expiring puts). Then every run's lines
//! are read back in order. Figures: store keys and key+value bytes written per 1,000 lines,
//! the store file's size, lines/s ingested and read. Layouts alternate over `--rounds`.
//!
//! With `--etcd <client URL>` the same runs go to that etcd instead (each layout and round
//! under a key prefix of its own), and the "file" figure is the growth of etcd's database
//! size (`etcdctl endpoint status`) over the layout's run.
//!
//! ```text
//! cargo run --release -p berth-bench --bin log-store
//! cargo run --release -p berth-bench --bin log-store -- --etcd http://127.0.0.1:2379
//! ```
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use berth_core::keys;
use berth_core::log_chunks;
use berth_core::model::{LogEntry, LogStream};
use berth_core::store::{EmbeddedStore, EtcdConfig, EtcdStore, Expect, Store, Txn};
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "log-store")]
struct Args {
    /// Runs appending at once.
    #[arg(long, default_value_t = 50)]
    runs: u64,
    /// Lines each run prints.
    #[arg(long, default_value_t = 4000)]
    lines_per_run: u64,
    /// Lines per reported batch.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Rounds; each round measures both layouts, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Where the stores go; a real disk, for the fsync cost to be real.
    #[arg(long, default_value = "/var/tmp")]
    data_root: PathBuf,
    /// An etcd client URL: measure on that etcd instead of the embedded store.
    #[arg(long)]
    etcd: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    PerLine,
    Chunks,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::PerLine => "per-line",
            Layout::Chunks => "chunks",
        }
    }
}

#[derive(Default)]
struct Written {
    keys: AtomicU64,
    bytes: AtomicU64,
    txns: AtomicU64,
}

struct Figures {
    keys_per_1000_lines: f64,
    bytes_per_1000_lines: f64,
    txns: u64,
    file_bytes: u64,
    ingest_lines_per_sec: f64,
    read_lines_per_sec: f64,
}

/// A log line as services print them: a timestamp, a level, a few key=value fields.
fn text(run: u64, seq: u64) -> String {
    let mut x = (run << 32 | seq).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    let level = ["INFO", "INFO", "INFO", "DEBUG", "WARN"][(x % 5) as usize];
    format!(
        "2026-12-01T19:{:02}:{:02}.{:03}Z {level} worker={} request_id={:016x} method=GET path=/v1/items/{} status=200 bytes={} duration_ms={}",
        (seq / 60) % 60,
        seq % 60,
        x % 1000,
        x % 8,
        x,
        x % 100_000,
        x % 65_536,
        x % 900
    )
}

fn batch(run: u64, from: u64, to: u64) -> Vec<LogEntry> {
    (from..=to)
        .map(|seq| LogEntry {
            id: seq,
            stream: LogStream::Stdout,
            msg: text(run, seq),
            ts_unix_nanos: 1_764_000_000_000_000_000 + i64::try_from(seq).unwrap_or(0),
        })
        .collect()
}

fn count(written: &Written, txn: &Txn) {
    written.txns.fetch_add(1, Ordering::Relaxed);
    for op in &txn.ops {
        if let berth_core::store::Op::Put { key, value, .. } = op {
            written.keys.fetch_add(1, Ordering::Relaxed);
            written
                .bytes
                .fetch_add((key.len() + value.len()) as u64, Ordering::Relaxed);
        }
    }
}

async fn append<S: Store>(
    store: &S,
    layout: Layout,
    run_id: &str,
    lines: Vec<LogEntry>,
    written: &Written,
) -> anyhow::Result<()> {
    let txns = match layout {
        Layout::PerLine => {
            let mut txn = Txn::new();
            for line in lines {
                let value = serde_json::to_vec(&line)?;
                txn = txn.put(keys::log(run_id, line.id), value, Expect::Any);
            }
            vec![txn]
        }
        Layout::Chunks => {
            let first = lines.first().map_or(0, |l| l.id);
            let last = lines.last().map_or(0, |l| l.id);
            let stored = log_chunks::stored_spans(store, run_id, first, last).await?;
            let chunks = log_chunks::plan(lines, &stored);
            log_chunks::txns(run_id, chunks, Some(Duration::from_secs(168 * 3600)))
        }
    };
    for txn in txns {
        count(written, &txn);
        store.commit(txn).await?;
    }
    Ok(())
}

/// Reads a run's lines back in order, as log pages do; returns how many.
async fn read_all<S: Store>(store: &S, run_id: &str) -> anyhow::Result<u64> {
    let end = keys::prefix_end(&keys::logs_prefix(run_id));
    let mut next = 1u64;
    let mut n = 0;
    loop {
        let kvs = store
            .range(&keys::log(run_id, next), &end, log_chunks::READ_CHUNKS)
            .await?;
        for kv in &kvs {
            for line in log_chunks::decode(&kv.value)? {
                if line.id >= next {
                    next = line.id + 1;
                    n += 1;
                }
            }
        }
        if kvs.len() < log_chunks::READ_CHUNKS {
            return Ok(n);
        }
    }
}

/// etcd's database size in bytes, as `etcdctl endpoint status` reports it.
fn etcd_db_size(endpoint: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["endpoint", "status", "-w", "json"])
        .output()
        .context("running etcdctl")?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    status[0]["Status"]["dbSize"]
        .as_u64()
        .with_context(|| format!("no dbSize in {status}"))
}

async fn measure(args: &Args, layout: Layout, round: u32) -> anyhow::Result<Figures> {
    let Some(endpoint) = &args.etcd else {
        let dir = tempfile::tempdir_in(&args.data_root).context("temp dir")?;
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path)?;
        let mut figures = measure_on(args, layout, store).await?;
        figures.file_bytes = std::fs::metadata(&path)?.len();
        return Ok(figures);
    };
    let before = etcd_db_size(endpoint)?;
    let mut config = EtcdConfig::new(vec![endpoint.clone()]);
    config.prefix = format!(
        "/berth-bench/{}-{}-{round}/",
        std::process::id(),
        layout.name()
    );
    let store = EtcdStore::connect(config).await?;
    let mut figures = measure_on(args, layout, store).await?;
    figures.file_bytes = etcd_db_size(endpoint)?.saturating_sub(before);
    Ok(figures)
}

/// Ingests and reads back on `store`; `file_bytes` is left for the caller.
async fn measure_on<S: Store + Clone>(
    args: &Args,
    layout: Layout,
    store: S,
) -> anyhow::Result<Figures> {
    let written = Arc::new(Written::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for run in 0..args.runs {
        let (store, written) = (store.clone(), written.clone());
        let (lines, size) = (args.lines_per_run, args.batch);
        tasks.push(tokio::spawn(async move {
            let run_id = format!("run-{run:04}");
            let mut from = 1;
            while from <= lines {
                let to = (from + size - 1).min(lines);
                append(&store, layout, &run_id, batch(run, from, to), &written).await?;
                from = to + 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let ingest = started.elapsed();
    let total = args.runs * args.lines_per_run;
    let started = Instant::now();
    let mut read = 0;
    for run in 0..args.runs {
        read += read_all(&store, &format!("run-{run:04}")).await?;
    }
    let reading = started.elapsed();
    if read != total {
        bail!("{} read {read} lines of {total}", layout.name());
    }
    drop(store);
    let per_1000 = |n: u64| n as f64 * 1000.0 / total as f64;
    Ok(Figures {
        keys_per_1000_lines: per_1000(written.keys.load(Ordering::Relaxed)),
        bytes_per_1000_lines: per_1000(written.bytes.load(Ordering::Relaxed)),
        txns: written.txns.load(Ordering::Relaxed),
        file_bytes: 0,
        ingest_lines_per_sec: total as f64 / ingest.as_secs_f64(),
        read_lines_per_sec: total as f64 / reading.as_secs_f64(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.lines_per_run == 0 || args.batch == 0 || args.rounds == 0 {
        bail!("--runs, --lines-per-run, --batch and --rounds must be at least 1");
    }
    let mut per_line = Vec::new();
    let mut chunks = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Layout::PerLine, Layout::Chunks]
        } else {
            [Layout::Chunks, Layout::PerLine]
        };
        for layout in order {
            let f = measure(&args, layout, round).await?;
            println!(
                "round {round} {:>8}: {:>7.1} keys and {:>9.0} bytes per 1000 lines, {} txns, file {:.1} MiB, ingest {:>9.0} lines/s, read {:>9.0} lines/s",
                layout.name(),
                f.keys_per_1000_lines,
                f.bytes_per_1000_lines,
                f.txns,
                f.file_bytes as f64 / (1024.0 * 1024.0),
                f.ingest_lines_per_sec,
                f.read_lines_per_sec
            );
            match layout {
                Layout::PerLine => per_line.push(f),
                Layout::Chunks => chunks.push(f),
            }
        }
    }
    let med = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let summary = |v: &[Figures]| {
        serde_json::json!({
            "keys_per_1000_lines": med(v, |f| f.keys_per_1000_lines),
            "bytes_per_1000_lines": med(v, |f| f.bytes_per_1000_lines).round(),
            "file_mib": (med(v, |f| f.file_bytes as f64) / 1048576.0 * 10.0).round() / 10.0,
            "ingest_lines_per_sec": med(v, |f| f.ingest_lines_per_sec).round(),
            "read_lines_per_sec": med(v, |f| f.read_lines_per_sec).round(),
        })
    };
    let ratio = |f: fn(&Figures) -> f64| {
        let (a, b) = (med(&per_line, f), med(&chunks, f));
        ((a / b) * 10.0).round() / 10.0
    };
    let json = serde_json::json!({
        "benchmark": "log-store",
        "store": if args.etcd.is_some() { "etcd" } else { "embedded" },
        "runs": args.runs,
        "lines_per_run": args.lines_per_run,
        "batch": args.batch,
        "rounds": args.rounds,
        "per_line": summary(&per_line),
        "chunks": summary(&chunks),
        "keys_ratio": ratio(|f| f.keys_per_1000_lines),
        "bytes_ratio": ratio(|f| f.bytes_per_1000_lines),
        "file_ratio": ratio(|f| f.file_bytes as f64),
        "ingest_speedup": ((med(&chunks, |f| f.ingest_lines_per_sec) / med(&per_line, |f| f.ingest_lines_per_sec)) * 10.0).round() / 10.0,
        "read_speedup": ((med(&chunks, |f| f.read_lines_per_sec) / med(&per_line, |f| f.read_lines_per_sec)) * 10.0).round() / 10.0,
    });
    println!("{json}");
    Ok(())
}
