//! Leader takeover time: a 3-member etcd cluster on loopback and two `berth-scheduler`
//! processes campaigning on it. Each round stops the leader — `kill -9` or SIGTERM (it
//! resigns) — and times until the standby *accepts connections*, i.e. has won the election,
//! loaded the active state and bound its port: what an agent or API replica waits for. The
//! stopped scheduler is started again as the new standby before the next round.
//!
//!   cargo run --release -p berth-bench --bin failover -- --rounds 30
//!
//! Prints one line per round and, last, one JSON object with p50/p99/max per mode.

#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use berth_bench::stats::Summary;
use berth_core::testkit::etcd::EtcdCluster;
use clap::Parser;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Rounds per mode.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Directory holding `berth-scheduler` (default: the release build of this workspace).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The schedulers' `--leader-lease-seconds`.
    #[arg(long, default_value_t = 3)]
    lease_seconds: u64,
    /// `kill`, `term` or `both`.
    #[arg(long, default_value = "both")]
    mode: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Kill,
    Term,
}

struct Scheduler {
    args: Vec<String>,
    bin: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Scheduler {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("BERTH_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn accepts(&self) -> bool {
        TcpStream::connect_timeout(&self.addr, Duration::from_millis(50)).is_ok()
    }

    fn signal(&mut self, mode: Mode) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the scheduler is not running");
        };
        match mode {
            Mode::Kill => child.kill()?,
            Mode::Term => {
                let status = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()?;
                if !status.success() {
                    bail!("kill -TERM failed");
                }
            }
        }
        Ok(())
    }

    fn wait_exit(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        if let Some(mut child) = self.child.take() {
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    bail!("the scheduler did not exit within {within:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Lines in its log that say it is campaigning (one per start).
    fn standby_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| s.matches("standby: campaigning").count())
            .unwrap_or(0)
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Distinct free loopback addresses (all held until each is chosen).
fn free_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?)
}

fn wait_until(within: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > within {
            bail!("timed out after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(start.elapsed())
}

fn release_bin_dir() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate has no parent directory")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    Ok(target.join("release"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let modes = match args.mode.as_str() {
        "kill" => vec![Mode::Kill],
        "term" => vec![Mode::Term],
        "both" => vec![Mode::Kill, Mode::Term],
        other => bail!("unknown mode {other}; use kill, term or both"),
    };
    let bin = match &args.bin_dir {
        Some(d) => d.join("berth-scheduler"),
        None => release_bin_dir()?.join("berth-scheduler"),
    };
    if !bin.is_file() {
        bail!(
            "no scheduler at {}; build it with `cargo build --release -p berth-scheduler`",
            bin.display()
        );
    }
    let etcd = EtcdCluster::start(3).context("starting etcd")?;
    let dir = tempfile::Builder::new()
        .prefix("berth-failover-")
        .tempdir()?;
    let result = rounds(&args, modes, &bin, &etcd, dir.path());
    if result.is_err() {
        // Keep the schedulers' logs for a look.
        eprintln!("logs kept in {}", dir.keep().display());
    }
    result
}

fn rounds(
    args: &Args,
    modes: Vec<Mode>,
    bin: &Path,
    etcd: &EtcdCluster,
    dir: &Path,
) -> anyhow::Result<()> {
    let key = dir.join("secret.key");
    let mut schedulers = Vec::new();
    for (i, addr) in free_addrs(2)?.into_iter().enumerate() {
        let data = dir.join(format!("s{i}"));
        std::fs::create_dir_all(&data)?;
        schedulers.push(Scheduler {
            args: vec![
                format!("--grpc-listen={addr}"),
                format!("--data-dir={}", data.display()),
                format!("--store={}", etcd.store_url()),
                format!("--secret-key-file={}", key.display()),
                format!("--leader-lease-seconds={}", args.lease_seconds),
            ],
            bin: bin.to_path_buf(),
            addr,
            log: dir.join(format!("s{i}.log")),
            child: None,
        });
    }
    // The first creates the shared secret key; start the second once it exists.
    schedulers[0].start()?;
    wait_until(Duration::from_secs(30), || schedulers[0].accepts())
        .context("the first scheduler never led")?;
    schedulers[1].start()?;
    let mut results = Vec::new();
    for mode in modes {
        let mut samples = Vec::new();
        for round in 0..args.rounds {
            let leader = if schedulers[0].accepts() { 0 } else { 1 };
            let standby = 1 - leader;
            // The standby must be campaigning (its candidate key in etcd) before the leader
            // goes; its log says so just before the campaign call.
            let starts = schedulers[standby].standby_lines();
            wait_until(Duration::from_secs(30), || {
                schedulers[standby].standby_lines() >= starts.max(1)
            })
            .context("the standby never campaigned")?;
            std::thread::sleep(Duration::from_millis(300));
            let t0 = Instant::now();
            schedulers[leader].signal(mode)?;
            wait_until(Duration::from_secs(30), || schedulers[standby].accepts())
                .with_context(|| format!("round {round}: the standby never took over"))?;
            let took = t0.elapsed();
            println!("{mode:?} round {round}: takeover {:.1} ms", ms(took));
            samples.push(took);
            schedulers[leader].wait_exit(Duration::from_secs(15))?;
            let before = schedulers[leader].standby_lines();
            schedulers[leader].start()?;
            wait_until(Duration::from_secs(30), || {
                schedulers[leader].standby_lines() > before
            })
            .context("the restarted scheduler never campaigned")?;
        }
        let s = Summary::of(samples);
        results.push(serde_json::json!({
            "mode": match mode { Mode::Kill => "kill -9", Mode::Term => "SIGTERM" },
            "rounds": args.rounds,
            "p50_ms": ms(s.p50),
            "p99_ms": ms(s.p99),
            "max_ms": ms(s.max),
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "lease_seconds": args.lease_seconds,
            "etcd_members": etcd.len(),
            "takeover": results,
        })
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
