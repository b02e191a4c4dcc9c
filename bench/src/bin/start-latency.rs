//! `start-latency`: how long a trivial run takes to start and to end through Berth, side by
//! side in the same run with `ctr run --rm` (and `runc run`) of the same image on the same
//! containerd, and where Berth's time goes, from the run's own timeline.
//!
//! Runs against a fleet that is up (`deploy/up.sh`): creates a runner `echo hi` in `--region`,
//! runs it once to have the image on the node, then `--runs` times in turn: a Berth run (POST,
//! then the SSE log stream until its `state` event), a `ctr run --rm` and, with `--runc`, a
//! `runc run` of a bundle unpacked from the same image. POST → running is the run's timeline
//! `started_at` less the moment the POST was sent (one machine, one clock); POST → succeeded is
//! when the client sees the `state` event. Prints a table, the ratios, and one JSON object on
//! its last line. Each measured command starts after `--pause-ms` of quiet, so what the one
//! before left running in the background (cleanup, networks attached ahead) is not counted
//! against the next.
//!
//! With `--sandbox`, each round also times a sandboxed Berth run of the same command (a runner
//! with `isolation: sandbox`: gVisor) and `ctr run --rm` through runsc, so gVisor's cost shows
//! beside runc's in the same rounds.
//!
//! Then, unless `--log-runs 0`, the log path: a runner that writes `--log-mib` MiB of 100-byte
//! lines to stdout, `--log-runs` times, each side by side with `ctr run --rm` of the same command
//! writing to files. The command first makes the output in a file inside the container, then
//! says `start <time>` on stderr and `cat`s it, while a background loop writes `t <time>` to
//! stderr every 5 ms: so the window measured starts when the output starts, whatever making it
//! cost, and the stderr lines give the live latency. For each Berth run the client follows the
//! SSE stream, checks every line arrives once and in order, and takes each `t` line's latency
//! from being written in the container to being seen by the client. Throughput is bytes over
//! `start` → the client sees `succeeded` (every line stored and delivered) and, for ctr, over
//! `start` → `ctr` exits (the output in its files). Also printed: POST → succeeded. The default
//! 8 MiB (84k lines) fits the agent's default per-run log limits (16 MiB, 100k lines).
//!
//! ```text
//! cargo run --release -p berth-bench --bin start-latency -- --runs 50 --runc
//! ```
#![allow(clippy::print_stdout)]

use anyhow::{bail, ensure, Context, Result};
use berth_bench::api::Api;
use berth_bench::stats::{millis, Summary};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(name = "start-latency")]
struct Args {
    /// The API (loopback).
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A file holding the admin token.
    #[arg(long, default_value = "/var/lib/berth/fleet/token")]
    token_file: PathBuf,
    #[arg(long, default_value = "fra")]
    region: String,
    /// The node the region's runs land on: its containerd namespace is `berth-<node>`.
    #[arg(long, default_value = "fra-1")]
    node: String,
    /// The fleet's containerd socket.
    #[arg(
        long,
        default_value = "/var/lib/berth/fleet/containerd/containerd.sock"
    )]
    containerd_socket: String,
    /// The fleet's registry (the image is `<registry>/busybox:latest`).
    #[arg(long, env = "BERTH_REGISTRY", default_value = "127.0.0.1:5000")]
    registry: String,
    /// Measured runs of each kind.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Also time `runc run` of a bundle unpacked from the image (needs skopeo and umoci).
    #[arg(long)]
    runc: bool,
    /// Also time sandboxed Berth runs (`isolation: sandbox`, gVisor) of the same command in the
    /// same rounds, and `ctr run --rm` through runsc (`--runsc`).
    #[arg(long)]
    sandbox: bool,
    /// The runsc binary `ctr` runs through (a wrapper of the bench's own adds the node's flags,
    /// with `--network=none`: ctr gives the container no network namespace of its own, and the
    /// node's wrapper must never see one without — see ARCHITECTURE "Sandboxed runs").
    #[arg(long, default_value = "/usr/bin/runsc")]
    runsc: PathBuf,
    /// A pause before each measured command, so work one leaves behind (the node's cleanup,
    /// networks attached ahead) does not land on the next one's clock.
    #[arg(long, default_value_t = 300)]
    pause_ms: u64,
    /// Runs of the log-throughput phase (0: skip it).
    #[arg(long, default_value_t = 10)]
    log_runs: usize,
    /// MiB each log run writes.
    #[arg(long, default_value_t = 8)]
    log_mib: u64,
    /// Runs of the warm-sandbox phase (0: skip it): each a run of a runner warmed up with a
    /// ready sandbox, beside a run of the same command without one.
    #[arg(long, default_value_t = 50)]
    warm_runs: usize,
    /// The pause before each warm run: the node replaces the sandbox the run before used.
    #[arg(long, default_value_t = 1000)]
    warm_pause_ms: u64,
}

/// The log writer: `lines` lines of 100 bytes on stdout, timed on stderr (see the module doc).
fn log_command(lines: u64) -> String {
    format!(
        "yes $(printf %099d 0) | head -c {} > /tmp/out; (while :; do echo \"t $EPOCHREALTIME\" >&2; usleep 5000; done) & echo \"start $EPOCHREALTIME\" >&2; cat /tmp/out; kill $!",
        lines * 100
    )
}

/// Blocks of the paced writer, and 100-byte lines per block.
const PACED_BLOCKS: u64 = 128;
const PACED_BLOCK_LINES: u64 = 655;

/// The paced writer: 128 blocks of 655 lines of 100 bytes (8 MiB), each followed by a `t <time>`
/// line on stderr and a 2 ms pause: output that streams for a while instead of all at once, to
/// measure how long a line takes to reach an SSE client while the run keeps writing.
fn paced_command() -> String {
    format!(
        "yes $(printf %099d 0) | head -c {} > /tmp/b; echo \"start $EPOCHREALTIME\" >&2; n=0; while [ $n -lt {PACED_BLOCKS} ]; do cat /tmp/b; echo \"t $EPOCHREALTIME\" >&2; usleep 2000; n=$((n+1)); done",
        PACED_BLOCK_LINES * 100
    )
}

/// A runner of the fleet registry's busybox, `standard-s`.
fn busybox_runner(name: &str, command: impl Into<String>, region: &str, timeout_s: u64) -> Value {
    json!({
        "name": name,
        "image_name": "busybox",
        "image_tag": "latest",
        "run_command": command.into(),
        "region": region,
        "instance_type": "standard-s",
        "timeout_seconds": timeout_s,
    })
}

/// `$EPOCHREALTIME` (seconds with a fraction) as Unix µs.
/// A log line's `ts` (RFC 3339) in microseconds since the epoch.
fn rfc3339_micros(text: &str) -> Result<i128> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("a line's ts: {text:?}"))?;
    Ok(t.unix_timestamp_nanos() / 1000)
}

fn epoch_micros(text: &str) -> Result<i128> {
    let seconds: f64 = text.trim().parse().context("a time line")?;
    Ok((seconds * 1e6) as i128)
}

/// One Berth log run's figures.
struct LogSample {
    to_succeeded: Duration,
    /// `start` in the container → the client saw `succeeded`.
    output_to_succeeded: Duration,
    /// Each timestamp line: written in the container → seen by the SSE client.
    line_latencies: Vec<Duration>,
    /// Each timestamp line: written in the container → read by the agent (the line's `ts`).
    read_latencies: Vec<Duration>,
    /// `start` in the container → the agent read the last line (its `ts`).
    output_to_last_read: Duration,
}

/// One Berth run's figures.
struct BerthSample {
    to_running: Duration,
    to_succeeded: Duration,
    /// Each stage's length, in the order of [`STAGES`].
    stages: Vec<Duration>,
    /// The run started in a ready sandbox (its timeline says so).
    sandbox: bool,
    /// POST → the time the process printed first, when its first line is a
    /// `$EPOCHREALTIME` (the warm phase's command): the process really running.
    to_process: Option<Duration>,
}

/// The stages of a run's start and end, each from the timeline step before it (the first from
/// the moment the POST was sent, the last to the moment the client saw the end).
const STAGES: [(&str, &str); 12] = [
    ("api: POST to accepted", "created_at"),
    ("placement", "assigned_at"),
    ("commit + dispatch to agent", "received_at"),
    ("image resolution", "image_ready_at"),
    ("user, spec, journal, files", "prepared_at"),
    ("network attach", "network_ready_at"),
    ("snapshot + container + task create", "task_created_at"),
    ("to start asked", "started_at"),
    ("task start + process runs (to its exit)", "exited_at"),
    ("exit event to report", "exit_reported_at"),
    ("report to end stored", "ended_at"),
    ("end stored to client (SSE)", ""),
];

fn unix_micros(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_micros()).unwrap_or(0))
}

fn parse_micros(v: &Value) -> Option<i128> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() / 1_000)
}

fn micros_to_duration(us: i128) -> Duration {
    Duration::from_micros(u64::try_from(us.max(0)).unwrap_or(0))
}

/// What a benchmark run reads through the fleet's API.
trait Runs {
    async fn run_once(&self, runner: &str) -> Result<BerthSample>;
    async fn log_run(&self, runner: &str, expected: u64) -> Result<LogSample>;
}

impl Runs for Api {
    /// One run: POST, follow its log stream to the end, read its timeline.
    async fn run_once(&self, runner: &str) -> Result<BerthSample> {
        let sent_at = SystemTime::now();
        let clock = Instant::now();
        let run = self.start_run(runner, json!({})).await?;
        let stream = self.log_stream(runner, &run).await?;
        let mut events = eventsource_stream::Eventsource::eventsource(stream.bytes_stream());
        let mut end = None;
        let mut first_line = None;
        while let Some(event) = events.next().await {
            let event = event.context("reading the log stream")?;
            if event.event == "log" && first_line.is_none() {
                let line: Value = serde_json::from_str(&event.data)?;
                first_line = line["msg"].as_str().map(str::to_owned);
            }
            if event.event == "state" {
                let state: Value = serde_json::from_str(&event.data)?;
                ensure!(state["status"] == "succeeded", "run {run} ended {state}");
                end = Some(clock.elapsed());
                break;
            }
        }
        let to_succeeded = end.context("the log stream ended without the run's state")?;
        let r = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/runners/{runner}/runs/{run}"),
                None,
            )
            .await?;
        let r = &r["run"];
        let t = &r["timeline"];
        let origin = unix_micros(sent_at);
        let sandbox = t["sandbox"] == true;
        let to_process = first_line
            .as_deref()
            .and_then(|l| epoch_micros(l).ok())
            .map(|at| micros_to_duration(at - origin));
        // A build without a timeline (the baseline of a before/after run): the run's own
        // started_at, to the millisecond, and no stages.
        let Some(started) = parse_micros(&t["started_at"]) else {
            let started = parse_micros(&r["started_at"]).context("no started_at")?;
            return Ok(BerthSample {
                to_running: micros_to_duration(started - origin),
                to_succeeded,
                stages: Vec::new(),
                sandbox,
                to_process,
            });
        };
        let mut stages = Vec::new();
        let mut previous = origin;
        for (_, step) in STAGES {
            let at = if step.is_empty() {
                origin + i128::try_from(to_succeeded.as_micros()).unwrap_or(0)
            } else {
                // A step not taken (no network) takes no time.
                parse_micros(&t[step]).unwrap_or(previous)
            };
            stages.push(micros_to_duration(at - previous));
            previous = at.max(previous);
        }
        Ok(BerthSample {
            to_running: micros_to_duration(started - origin),
            to_succeeded,
            stages,
            sandbox,
            to_process,
        })
    }

    /// One log run: POST, count every line over SSE until the state event, check the count.
    async fn log_run(&self, runner: &str, expected: u64) -> Result<LogSample> {
        let clock = Instant::now();
        let run = self.start_run(runner, json!({})).await?;
        let stream = self.log_stream(runner, &run).await?;
        // A lean reader (bytes split at blank lines, one borrowed parse per line): a client that
        // allocated per event would measure itself rather than Berth.
        #[derive(serde::Deserialize)]
        struct Line<'a> {
            id: u64,
            #[serde(borrow)]
            msg: std::borrow::Cow<'a, str>,
            /// When the agent read the line.
            #[serde(borrow)]
            ts: std::borrow::Cow<'a, str>,
        }
        let mut body = stream.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        #[derive(serde::Deserialize)]
        struct End {
            status: String,
        }
        let mut lines = 0u64;
        let mut last_id = 0u64;
        let mut line_latencies = Vec::new();
        let mut read_latencies = Vec::new();
        let mut last_ts = String::new();
        let mut output_start = None;
        let mut end = None;
        'read: while let Some(chunk) = body.next().await {
            let chunk = chunk.context("reading the log stream")?;
            let seen = unix_micros(SystemTime::now());
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(at) = buf[start..].windows(2).position(|w| w == b"\n\n") {
                let event = &buf[start..start + at];
                start += at + 2;
                let mut kind = "";
                let mut data: &[u8] = b"";
                for field in event.split(|b| *b == b'\n') {
                    if let Some(v) = field.strip_prefix(b"event:") {
                        kind = if v.trim_ascii() == b"log" {
                            "log"
                        } else if v.trim_ascii() == b"state" {
                            "state"
                        } else {
                            "other"
                        };
                    } else if let Some(v) = field.strip_prefix(b"data:") {
                        data = v.strip_prefix(b" ").unwrap_or(v);
                    }
                }
                match kind {
                    "log" => {
                        let line: Line<'_> = serde_json::from_slice(data)?;
                        ensure!(
                            line.id == last_id + 1,
                            "run {run}: line {} after {last_id}",
                            line.id
                        );
                        last_id = line.id;
                        last_ts.clear();
                        last_ts.push_str(&line.ts);
                        if let Some(t) = line.msg.strip_prefix("t ") {
                            let written = epoch_micros(t)?;
                            line_latencies.push(micros_to_duration(seen - written));
                            read_latencies
                                .push(micros_to_duration(rfc3339_micros(&line.ts)? - written));
                        } else if let Some(t) = line.msg.strip_prefix("start ") {
                            output_start = Some(epoch_micros(t)?);
                        } else {
                            lines += 1;
                        }
                    }
                    "state" => {
                        let state: End = serde_json::from_slice(data)?;
                        ensure!(
                            state.status == "succeeded",
                            "run {run} ended {}",
                            state.status
                        );
                        end = Some((clock.elapsed(), unix_micros(SystemTime::now())));
                        break 'read;
                    }
                    _ => {}
                }
            }
            buf.drain(..start);
        }
        let (to_succeeded, ended) = end.context("the log stream ended without the run's state")?;
        ensure!(
            lines == expected,
            "run {run}: {lines} lines seen, {expected} written"
        );
        let start = output_start.context("no start line")?;
        Ok(LogSample {
            to_succeeded,
            output_to_succeeded: micros_to_duration(ended - start),
            line_latencies,
            read_latencies,
            output_to_last_read: micros_to_duration(rfc3339_micros(&last_ts)? - start),
        })
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        return 0.0;
    }
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let clock = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("spawning")?;
    let took = clock.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// A runc bundle of `image`: copied from the registry to an OCI layout, unpacked, its process
/// made `echo hi` without a terminal.
fn runc_bundle(image: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    timed(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{image}"),
        &format!("oci:{}:bench", layout.display()),
    ]))?;
    timed(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:bench", layout.display()),
        &bundle.display().to_string(),
    ]))?;
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["process"]["args"] = json!(["echo", "hi"]);
    config["process"]["terminal"] = json!(false);
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    Ok((dir, bundle))
}

/// Prints each stage's p50 and p99 over `samples` and returns them as JSON.
fn stage_table<'a>(
    samples: impl Iterator<Item = &'a BerthSample> + Clone,
) -> serde_json::Map<String, Value> {
    let mut stages = serde_json::Map::new();
    for (k, (name, _)) in STAGES.iter().enumerate() {
        let times: Vec<Duration> = samples
            .clone()
            .filter_map(|b| b.stages.get(k).copied())
            .collect();
        if times.is_empty() {
            continue;
        }
        let s = Summary::of(times);
        println!("  {name:<42} {:>9.2} {:>9.2}", millis(s.p50), millis(s.p99));
        stages.insert((*name).to_owned(), summary_json(&s));
    }
    stages
}

fn summary_json(s: &Summary) -> Value {
    json!({"p50_ms": millis(s.p50), "p99_ms": millis(s.p99), "max_ms": millis(s.max)})
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        return 0.0;
    }
    a.as_secs_f64() / b.as_secs_f64()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let api = Api::new(&args.url, &args.token_file)?;
    let runner = api
        .create_runner(busybox_runner(
            "start-latency-bench",
            "echo hi",
            &args.region,
            60,
        ))
        .await?;
    let image = format!("{}/busybox:latest", args.registry);
    let namespace = format!("berth-{}", args.node);
    // `ctr run --rm` of `echo hi`, through `runtime` (a runc-compatible binary) when given.
    let ctr_with = |runtime: Option<&std::path::Path>, kind: &str, i: usize| {
        let mut cmd = Command::new("ctr");
        cmd.args([
            "-a",
            &args.containerd_socket,
            "-n",
            &namespace,
            "run",
            "--rm",
        ]);
        if let Some(runtime) = runtime {
            cmd.arg("--runc-binary").arg(runtime);
        }
        cmd.arg(&image)
            .arg(format!("start-bench-{kind}-{}-{i}", std::process::id()))
            .args(["echo", "hi"]);
        cmd
    };
    let ctr = |i: usize| ctr_with(None, "ctr", i);
    let bundle = if args.runc {
        Some(runc_bundle(&image)?)
    } else {
        None
    };
    // The same runner, sandboxed; and ctr through runsc, by a wrapper of the bench's own with
    // `--network=none` (ctr gives the container no network namespace of its own).
    let sandboxed = if args.sandbox {
        let mut body = busybox_runner("start-latency-bench-sandbox", "echo hi", &args.region, 60);
        body["isolation"] = json!("sandbox");
        Some(api.create_runner(body).await?)
    } else {
        None
    };
    let wrapper_dir = tempfile::tempdir()?;
    let wrapper = wrapper_dir.path().join("runsc");
    if args.sandbox {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --platform=ptrace --network=none --oci-seccomp \"$@\"\n",
                args.runsc.display()
            ),
        )?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o700))?;
    }
    let ctr_runsc = |i: usize| ctr_with(Some(&wrapper), "runsc", i);
    let runc = |bundle: &PathBuf, i: usize| {
        let mut cmd = Command::new("runc");
        cmd.args([
            "run",
            "--bundle",
            &bundle.display().to_string(),
            &format!("start-bench-runc-{}-{i}", std::process::id()),
        ]);
        cmd
    };

    // Warm: the image on the node (a first Berth run pulls it), caches of every kind.
    for i in 0..3 {
        api.run_once(&runner).await.context("warm-up run")?;
        timed(&mut ctr(1_000_000 + i))?;
        if let Some(s) = &sandboxed {
            api.run_once(s).await.context("warm-up sandboxed run")?;
        }
        if let Some((_, b)) = &bundle {
            timed(&mut runc(b, 1_000_000 + i))?;
        }
    }

    let mut berth = Vec::new();
    let mut ctr_times = Vec::new();
    let mut runc_times = Vec::new();
    let mut sandboxed_berth = Vec::new();
    let mut ctr_runsc_times = Vec::new();
    let pause = Duration::from_millis(args.pause_ms);
    for i in 0..args.runs {
        tokio::time::sleep(pause).await;
        berth.push(api.run_once(&runner).await?);
        tokio::time::sleep(pause).await;
        ctr_times.push(timed(&mut ctr(i))?);
        if let Some(s) = &sandboxed {
            tokio::time::sleep(pause).await;
            sandboxed_berth.push(api.run_once(s).await?);
            tokio::time::sleep(pause).await;
            ctr_runsc_times.push(timed(&mut ctr_runsc(i))?);
        }
        if let Some((_, b)) = &bundle {
            tokio::time::sleep(pause).await;
            runc_times.push(timed(&mut runc(b, i))?);
        }
    }
    api.delete_runner(&runner).await;
    if let Some(s) = &sandboxed {
        api.delete_runner(s).await;
    }
    drop(wrapper_dir);
    let warm = if args.warm_runs > 0 {
        Some(warm_phase(&args, &api).await?)
    } else {
        None
    };
    let logs = if args.log_runs > 0 {
        Some(log_phase(&args, &api, &image, &namespace).await?)
    } else {
        None
    };

    let to_running = Summary::of(berth.iter().map(|s| s.to_running).collect());
    let to_succeeded = Summary::of(berth.iter().map(|s| s.to_succeeded).collect());
    let ctr_s = Summary::of(ctr_times);
    let runc_s = (!runc_times.is_empty()).then(|| Summary::of(runc_times));
    println!(
        "start latency, {} runs of `echo hi` each, busybox from {}",
        args.runs, args.registry
    );
    println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    let row = |name: &str, s: &Summary| {
        println!("{name:<44} {:>9.1} {:>9.1}", millis(s.p50), millis(s.p99));
    };
    row("berth POST -> running", &to_running);
    row("berth POST -> succeeded (seen over SSE)", &to_succeeded);
    row("ctr run --rm", &ctr_s);
    if let Some(s) = &runc_s {
        row("runc run", s);
    }
    let sandbox = (!sandboxed_berth.is_empty()).then(|| {
        let succeeded = Summary::of(sandboxed_berth.iter().map(|s| s.to_succeeded).collect());
        let running = Summary::of(sandboxed_berth.iter().map(|s| s.to_running).collect());
        let ctr = Summary::of(std::mem::take(&mut ctr_runsc_times));
        (running, succeeded, ctr)
    });
    if let Some((running, succeeded, ctr)) = &sandbox {
        row("berth sandboxed POST -> running", running);
        row("berth sandboxed POST -> succeeded", succeeded);
        row("ctr run --rm --runc-binary <runsc wrapper>", ctr);
        println!(
            "ratio berth sandboxed / berth container (succeeded): p50 {:.2}x, p99 {:.2}x",
            ratio(succeeded.p50, to_succeeded.p50),
            ratio(succeeded.p99, to_succeeded.p99)
        );
        println!(
            "ratio berth sandboxed / ctr with runsc: p50 {:.2}x",
            ratio(succeeded.p50, ctr.p50)
        );
    }
    println!(
        "ratio berth succeeded / ctr run --rm: p50 {:.2}x, p99 {:.2}x",
        ratio(to_succeeded.p50, ctr_s.p50),
        ratio(to_succeeded.p99, ctr_s.p99)
    );
    if let Some(s) = &runc_s {
        println!(
            "ratio berth succeeded / runc run: p50 {:.2}x",
            ratio(to_succeeded.p50, s.p50)
        );
    }
    if berth.iter().all(|b| b.stages.is_empty()) {
        println!("(this build keeps no run timeline: no per-stage breakdown)");
    } else {
        println!("where a Berth run's time goes (p50 of each stage; they need not add up):");
    }
    let stages = stage_table(berth.iter());
    println!(
        "{}",
        json!({
            "runs": args.runs,
            "berth_post_to_running": summary_json(&to_running),
            "berth_post_to_succeeded": summary_json(&to_succeeded),
            "ctr_run_rm": summary_json(&ctr_s),
            "runc_run": runc_s.as_ref().map(summary_json),
            "ratio_succeeded_vs_ctr_p50": ratio(to_succeeded.p50, ctr_s.p50),
            "ratio_succeeded_vs_ctr_p99": ratio(to_succeeded.p99, ctr_s.p99),
            "stages": stages,
            "sandboxed": sandbox.as_ref().map(|(running, succeeded, ctr)| json!({
                "berth_post_to_running": summary_json(running),
                "berth_post_to_succeeded": summary_json(succeeded),
                "ctr_run_rm_runsc": summary_json(ctr),
            })),
            "warm": warm,
            "logs": logs,
        })
    );
    Ok(())
}

/// The log-throughput phase; prints its table and returns its JSON.
async fn log_phase(args: &Args, api: &Api, image: &str, namespace: &str) -> Result<Value> {
    let lines = args.log_mib * 1024 * 1024 / 100;
    let bytes = lines * 100;
    let command = log_command(lines);
    let runner = api
        .create_runner(busybox_runner(
            "start-latency-logs",
            command.as_str(),
            &args.region,
            120,
        ))
        .await?;
    let out = tempfile::NamedTempFile::new()?;
    let err = tempfile::NamedTempFile::new()?;
    // `start` → ctr exits, with the output in its files.
    let ctr = |i: usize| -> Result<Duration> {
        let (stdout, stderr) = (out.reopen()?, err.reopen()?);
        stdout.set_len(0)?;
        stderr.set_len(0)?;
        let status = Command::new("ctr")
            .args([
                "-a",
                &args.containerd_socket,
                "-n",
                namespace,
                "run",
                "--rm",
                image,
                &format!("start-bench-logs-{}-{i}", std::process::id()),
                "sh",
                "-c",
                &command,
            ])
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .status()?;
        let ended = unix_micros(SystemTime::now());
        ensure!(status.success(), "ctr run (logs) failed: {status}");
        let len = std::fs::metadata(out.path())?.len();
        ensure!(len == bytes, "ctr run wrote {len} bytes, not {bytes}");
        let text = std::fs::read_to_string(err.path())?;
        let start = text
            .lines()
            .find_map(|l| l.strip_prefix("start "))
            .context("ctr run: no start line")?;
        Ok(micros_to_duration(ended - epoch_micros(start)?))
    };
    api.log_run(&runner, lines)
        .await
        .context("log warm-up run")?;
    let pause = Duration::from_millis(args.pause_ms);
    let mut samples = Vec::new();
    let mut ctr_times = Vec::new();
    for i in 0..args.log_runs {
        tokio::time::sleep(pause).await;
        samples.push(api.log_run(&runner, lines).await?);
        tokio::time::sleep(pause).await;
        ctr_times.push(ctr(i)?);
    }
    api.delete_runner(&runner).await;
    // The paced writer, Berth only: the line latency while a run keeps writing.
    let paced_runner = api
        .create_runner(busybox_runner(
            "start-latency-paced-logs",
            paced_command(),
            &args.region,
            120,
        ))
        .await?;
    let paced_lines = PACED_BLOCKS * PACED_BLOCK_LINES;
    let mut paced = Vec::new();
    for _ in 0..args.log_runs {
        tokio::time::sleep(pause).await;
        paced.push(api.log_run(&paced_runner, paced_lines).await?);
    }
    api.delete_runner(&paced_runner).await;
    let paced_latency = Summary::of(
        paced
            .iter()
            .flat_map(|s| s.line_latencies.iter().copied())
            .collect(),
    );
    let paced_output = Summary::of(paced.iter().map(|s| s.output_to_succeeded).collect());
    let paced_bytes = paced_lines * 100;
    let to_succeeded = Summary::of(samples.iter().map(|s| s.to_succeeded).collect());
    let output = Summary::of(samples.iter().map(|s| s.output_to_succeeded).collect());
    let latency = Summary::of(
        samples
            .iter()
            .flat_map(|s| s.line_latencies.iter().copied())
            .collect(),
    );
    let ctr_s = Summary::of(ctr_times);
    let of = |samples: &[LogSample], f: fn(&LogSample) -> Duration| {
        Summary::of(samples.iter().map(f).collect())
    };
    let all = |samples: &[LogSample], f: fn(&LogSample) -> &Vec<Duration>| {
        Summary::of(samples.iter().flat_map(|s| f(s).iter().copied()).collect())
    };
    // Where the time goes: the agent's read of each line (its `ts`) splits a line's way into
    // capture (written → read by the agent: poll, read, split) and the rest (line log, outbox,
    // transport, the store's commit, the watch and the SSE delivery).
    let read_all = of(&samples, |s| s.output_to_last_read);
    let read_to_end = of(&samples, |s| {
        s.output_to_succeeded.saturating_sub(s.output_to_last_read)
    });
    let paced_read = all(&paced, |s| &s.read_latencies);
    let paced_rest = Summary::of(
        paced
            .iter()
            .flat_map(|s| {
                s.line_latencies
                    .iter()
                    .zip(&s.read_latencies)
                    .map(|(seen, read)| seen.saturating_sub(*read))
            })
            .collect(),
    );
    println!(
        "log throughput, {} runs writing {:.1} MiB each ({lines} lines of 100 bytes)",
        args.log_runs,
        bytes as f64 / 1048576.0,
    );
    println!("{:<52} {:>9} {:>9}", "", "p50 ms", "MiB/s");
    let row = |name: &str, d: Duration| {
        println!("{name:<52} {:>9.1} {:>9.1}", millis(d), mib_per_s(bytes, d));
    };
    row(
        "berth output start -> succeeded, every line seen",
        output.p50,
    );
    row("ctr run --rm, output start -> ctr exits (files)", ctr_s.p50);
    row("berth POST -> succeeded", to_succeeded.p50);
    println!(
        "ratio berth / ctr, output start -> end: p50 {:.2}x",
        ratio(output.p50, ctr_s.p50)
    );
    println!(
        "live SSE line latency (written in the container -> seen by the client), {} lines: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.iter().map(|s| s.line_latencies.len()).sum::<usize>(),
        millis(latency.p50),
        millis(latency.p99),
        millis(latency.max)
    );
    println!(
        "paced writer ({:.1} MiB in {} blocks, 2 ms apart): output start -> succeeded p50 {:.1} ms ({:.1} MiB/s); SSE line latency while it writes, {} lines: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        paced_bytes as f64 / 1048576.0,
        PACED_BLOCKS,
        millis(paced_output.p50),
        mib_per_s(paced_bytes, paced_output.p50),
        paced.iter().map(|s| s.line_latencies.len()).sum::<usize>(),
        millis(paced_latency.p50),
        millis(paced_latency.p99),
        millis(paced_latency.max)
    );
    println!(
        "where the burst's time goes: output start -> the agent read the last line p50 {:.1} ms, p99 {:.1} ms; then -> the client saw every line and succeeded p50 {:.1} ms, p99 {:.1} ms",
        millis(read_all.p50),
        millis(read_all.p99),
        millis(read_to_end.p50),
        millis(read_to_end.p99)
    );
    println!(
        "where a paced line's latency goes: written -> read by the agent p50 {:.1} ms, p99 {:.1} ms; read -> seen by the client p50 {:.1} ms, p99 {:.1} ms",
        millis(paced_read.p50),
        millis(paced_read.p99),
        millis(paced_rest.p50),
        millis(paced_rest.p99)
    );
    Ok(json!({
        "burst_output_to_last_read": summary_json(&read_all),
        "burst_last_read_to_succeeded": summary_json(&read_to_end),
        "paced_written_to_read": summary_json(&paced_read),
        "paced_read_to_seen": summary_json(&paced_rest),
        "paced_output_to_succeeded": summary_json(&paced_output),
        "paced_sse_line_latency": summary_json(&paced_latency),
        "runs": args.log_runs,
        "bytes": bytes,
        "berth_post_to_succeeded": summary_json(&to_succeeded),
        "berth_output_to_succeeded": summary_json(&output),
        "ctr_output_to_exit": summary_json(&ctr_s),
        "berth_mib_per_s_p50": mib_per_s(bytes, output.p50),
        "ctr_mib_per_s_p50": mib_per_s(bytes, ctr_s.p50),
        "ratio_berth_vs_ctr_p50": ratio(output.p50, ctr_s.p50),
        "sse_line_latency": summary_json(&latency),
    }))
}

/// Waits until the runner's warmup is ready.
async fn wait_warm(api: &Api, runner: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = api
            .call(reqwest::Method::GET, &format!("/v1/runners/{runner}"), None)
            .await?;
        match r["runner"]["warmup_status"].as_str() {
            Some("ready") => return Ok(()),
            Some("pending") if Instant::now() < deadline => {}
            _ => bail!("warmup of {runner}: {r}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The warm-sandbox phase: a runner warmed up with one ready sandbox and a runner of the same
/// command without one, run in turn; prints its table and returns its JSON.
async fn warm_phase(args: &Args, api: &Api) -> Result<Value> {
    // The process says when it runs: its first line is its own clock.
    let command = "echo $EPOCHREALTIME";
    let warm = api
        .create_runner(busybox_runner(
            "start-latency-warm",
            command,
            &args.region,
            60,
        ))
        .await?;
    let cold = api
        .create_runner(busybox_runner(
            "start-latency-cold",
            command,
            &args.region,
            60,
        ))
        .await?;
    api.call(
        reqwest::Method::POST,
        &format!("/v1/runners/{warm}/warmup"),
        Some(json!({"sandboxes": 1})),
    )
    .await?;
    wait_warm(api, &warm).await?;
    api.run_once(&cold).await.context("cold warm-up run")?;
    let (pause, warm_pause) = (
        Duration::from_millis(args.pause_ms),
        Duration::from_millis(args.warm_pause_ms),
    );
    let mut warm_samples = Vec::new();
    let mut cold_samples = Vec::new();
    for _ in 0..args.warm_runs {
        tokio::time::sleep(warm_pause).await;
        warm_samples.push(api.run_once(&warm).await?);
        tokio::time::sleep(pause).await;
        cold_samples.push(api.run_once(&cold).await?);
    }
    for runner in [&warm, &cold] {
        api.delete_runner(runner).await;
    }
    let in_sandbox: Vec<&BerthSample> = warm_samples.iter().filter(|s| s.sandbox).collect();
    ensure!(
        !in_sandbox.is_empty(),
        "no warm run started in a sandbox: is the node's --max-sandboxes 0?"
    );
    let summaries = |samples: &[&BerthSample]| {
        let of = |f: &dyn Fn(&BerthSample) -> Option<Duration>| {
            Summary::of(samples.iter().filter_map(|s| f(s)).collect())
        };
        (
            of(&|s| Some(s.to_running)),
            of(&|s| s.to_process),
            of(&|s| Some(s.to_succeeded)),
        )
    };
    let (w_running, w_process, w_succeeded) = summaries(&in_sandbox);
    let cold_refs: Vec<&BerthSample> = cold_samples.iter().collect();
    let (c_running, c_process, c_succeeded) = summaries(&cold_refs);
    println!(
        "warm sandboxes, {} runs of `{command}` in turn with a runner without one ({} of them started in a sandbox)",
        args.warm_runs,
        in_sandbox.len()
    );
    println!(
        "{:<46} {:>9} {:>9} {:>9} {:>9}",
        "", "warm p50", "warm p99", "cold p50", "cold p99"
    );
    let row = |name: &str, w: &Summary, c: &Summary| {
        println!(
            "{name:<46} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            millis(w.p50),
            millis(w.p99),
            millis(c.p50),
            millis(c.p99)
        );
    };
    row(
        "POST -> start asked (timeline started_at)",
        &w_running,
        &c_running,
    );
    row(
        "POST -> the process prints its clock",
        &w_process,
        &c_process,
    );
    row(
        "POST -> succeeded (seen over SSE)",
        &w_succeeded,
        &c_succeeded,
    );
    println!(
        "ratio warm / cold, POST -> process runs: p50 {:.2}x",
        ratio(w_process.p50, c_process.p50)
    );
    println!("where a warm run's time goes (p50, p99):");
    let stages = stage_table(in_sandbox.iter().copied());
    Ok(json!({
        "runs": args.warm_runs,
        "in_sandbox": in_sandbox.len(),
        "warm_post_to_running": summary_json(&w_running),
        "warm_post_to_process": summary_json(&w_process),
        "warm_post_to_succeeded": summary_json(&w_succeeded),
        "cold_post_to_running": summary_json(&c_running),
        "cold_post_to_process": summary_json(&c_process),
        "cold_post_to_succeeded": summary_json(&c_succeeded),
        "warm_stages": stages,
    }))
}
