//! # Layout
//! Benchmarks that need the whole control plane. Each is a binary in `src/bin/`, started by one
//! command and printing its figures as one JSON object on its last line (see
//! `docs/BENCHMARKS.md`):
//! - `control-plane`: the real `berth-scheduler` process, fake agents over real gRPC, runs
//!   submitted through `ControlService` (one module per part under
//!   `src/bin/control-plane/`: `scheduler`, `agents`, `submit`, `report`).
//! - `log-store`: run logs one key per line against compressed chunks, on the embedded store.
//! - `takeover`: how long `Scheduler::open` (what a new leader does before it serves) takes on
//!   a store holding 100,000 finished runs, on the embedded store and on a private etcd.
//!
//! - `start-latency`, `density`: against a fleet `deploy/up.sh` brought up, through its REST
//!   API.
//!
//! This library holds the pieces that are not specific to one benchmark: latency percentiles
//! ([`stats`]), what `/proc` says about a process ([`proc_stats`]) and a client of the REST
//! API ([`api`]).

pub mod api {
    //! A small client of Berth's REST API, for the benchmarks that drive a fleet.

    use anyhow::{ensure, Context as _, Result};
    use serde_json::Value;
    use std::path::Path;

    pub struct Api {
        pub http: reqwest::Client,
        /// The API's base URL (no trailing slash).
        pub url: String,
        pub token: String,
    }

    impl Api {
        /// A client of `url` (loopback only) acting with the admin token in `token_file`.
        pub fn new(url: &str, token_file: &Path) -> Result<Api> {
            ensure!(
                url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost"),
                "--url must be a loopback address"
            );
            let token = std::fs::read_to_string(token_file)
                .with_context(|| format!("reading {}", token_file.display()))?
                .trim()
                .to_owned();
            Ok(Api {
                http: reqwest::Client::new(),
                url: url.trim_end_matches('/').to_owned(),
                token,
            })
        }

        /// One request; its JSON answer, or an error with the status and body.
        pub async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<Value>,
        ) -> Result<Value> {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.url))
                .bearer_auth(&self.token);
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            ensure!(status.is_success(), "{path}: HTTP {status}: {text}");
            Ok(serde_json::from_str(&text)?)
        }

        /// Creates a runner; its id.
        pub async fn create_runner(&self, body: Value) -> Result<String> {
            let r = self
                .call(reqwest::Method::POST, "/v1/runners", Some(body))
                .await?;
            r["runner"]["id"]
                .as_str()
                .map(str::to_owned)
                .context("runner id")
        }

        /// Deletes a runner, best effort (a benchmark's cleanup: its runs are over).
        pub async fn delete_runner(&self, runner: &str) {
            let path = format!("/v1/runners/{runner}");
            let _ = self.call(reqwest::Method::DELETE, &path, None).await;
        }

        /// POSTs a run of `runner` with `body`; its id.
        pub async fn start_run(&self, runner: &str, body: Value) -> Result<String> {
            let r = self
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/runners/{runner}/runs"),
                    Some(body),
                )
                .await?;
            r["run"]["id"].as_str().map(str::to_owned).context("run id")
        }

        /// Opens a run's SSE log stream.
        pub async fn log_stream(&self, runner: &str, run: &str) -> Result<reqwest::Response> {
            let stream = self
                .http
                .get(format!(
                    "{}/v1/runners/{runner}/runs/{run}/logs/stream",
                    self.url
                ))
                .bearer_auth(&self.token)
                .send()
                .await?;
            ensure!(stream.status().is_success(), "stream: {}", stream.status());
            Ok(stream)
        }
    }
}

pub mod stats {
    //! Latency summaries.

    use std::time::Duration;

    /// The `p`-th percentile (0..=100) of `sorted` by nearest rank; zero when empty.
    pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// p50, p99 and max of a set of latencies.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Summary {
        pub p50: Duration,
        pub p99: Duration,
        pub max: Duration,
    }

    impl Summary {
        pub fn of(mut samples: Vec<Duration>) -> Summary {
            samples.sort_unstable();
            Summary {
                p50: percentile(&samples, 50.0),
                p99: percentile(&samples, 99.0),
                max: samples.last().copied().unwrap_or_default(),
            }
        }
    }

    /// Milliseconds with microsecond resolution, for JSON.
    pub fn millis(d: Duration) -> f64 {
        d.as_micros() as f64 / 1000.0
    }
}

pub mod proc_stats {
    //! Figures about a (child) process, read from `/proc`. Linux only.

    use std::io;

    /// Clock ticks per second for `/proc/<pid>/stat` times; 100 on every Linux we run on.
    const CLOCK_TICKS_PER_SEC: f64 = 100.0;

    /// Peak resident set size (`VmHWM`) in KiB.
    pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        parse_status_kib(&status, "VmHWM:").ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no VmHWM in /proc/<pid>/status")
        })
    }

    /// User plus system CPU time the process has used so far, in seconds.
    pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        parse_stat_cpu_ticks(&stat)
            .map(|ticks| ticks as f64 / CLOCK_TICKS_PER_SEC)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat"))
    }

    /// CPU time of the calling process, in seconds.
    pub fn own_cpu_seconds() -> io::Result<f64> {
        cpu_seconds(std::process::id())
    }

    fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        line[field.len()..].split_whitespace().next()?.parse().ok()
    }

    /// utime + stime: fields 14 and 15, counted after the `(comm)` field, which may hold spaces.
    fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // after_comm starts at field 3 (state), so field n is at index n - 3.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime + stime)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_vmhwm_from_status() {
            let status = "Name:\tberth\nVmPeak:\t  900 kB\nVmHWM:\t   51234 kB\nVmRSS:\t 1 kB\n";
            assert_eq!(parse_status_kib(status, "VmHWM:"), Some(51234));
            assert_eq!(parse_status_kib(status, "VmSwap:"), None);
        }

        #[test]
        fn reads_cpu_ticks_even_with_spaces_in_the_name() {
            let stat = "42 (berth sched) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
            assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        }

        #[test]
        fn reads_our_own_process() {
            assert!(peak_rss_kib(std::process::id()).is_ok_and(|kib| kib > 0));
            assert!(own_cpu_seconds().is_ok());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stats::*;
    use std::time::Duration;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(samples.into_iter().rev().collect());
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
        assert_eq!(
            percentile(&[Duration::from_millis(7)], 0.0),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn millis_keep_microseconds() {
        assert_eq!(millis(Duration::from_micros(1_234_567)), 1234.567);
    }
}
