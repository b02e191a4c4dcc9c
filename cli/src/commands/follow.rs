//! Following a run: its progress while it waits for a node, then its log lines live over SSE
//! (resuming after the last line seen when the connection drops), then its final state, which
//! becomes `berthctl`'s exit code.

use super::{err_line, out, CommandError};
use crate::client::{Client, ClientError};
use backon::{BackoffBuilder, ExponentialBuilder};
use eventsource_stream::{Event as SseEvent, EventStreamError, Eventsource};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

/// Exit code when the run was canceled or the user interrupted (128 + SIGINT, as shells do).
pub const INTERRUPTED: u8 = 130;
const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// Consecutive failed (re)connections before giving up.
const MAX_FAILURES: u32 = 20;

/// A run's final state, from the stream's `state` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FinalState {
    pub status: String,
    #[serde(default)]
    pub exit_code: Option<i64>,
}

/// succeeded → 0; failed → its exit code clamped to 1..=255, or 1 without one; canceled → 130.
pub fn exit_code_for(state: &FinalState) -> u8 {
    match state.status.as_str() {
        "succeeded" => 0,
        "canceled" => INTERRUPTED,
        _ => state
            .exit_code
            .map_or(1, |c| u8::try_from(c.clamp(1, 255)).unwrap_or(1)),
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "canceled")
}

/// Worth retrying: the network, or the API waiting for its scheduler.
pub fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Network { .. } => true,
        ClientError::Api { status, .. } => matches!(status, 502..=504),
        ClientError::Decode { .. } => false,
    }
}

/// The shortest wait before a retry, and the longest.
const RETRY_FLOOR: Duration = Duration::from_millis(400);
const RETRY_CEILING: Duration = Duration::from_secs(5);

/// The waits between consecutive retries: doubling from [`RETRY_FLOOR`], with jitter so that
/// many clients cut off together do not come back together, never above [`RETRY_CEILING`].
/// The jitter adds up to the delay itself (`d..2d`), so the delays before jitter stop at half
/// the ceiling. Endless: [`MAX_FAILURES`] decides when to give up. Start a new one after a
/// success.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_FLOOR)
        .with_max_delay(RETRY_CEILING / 2)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|d| d.clamp(RETRY_FLOOR, RETRY_CEILING))
}

/// What a waiting run shows: why it waits and where it is in the queue.
pub fn pending_message(run: &Value) -> String {
    let mut parts = vec![];
    if let Some(node) = run["node_id"].as_str().filter(|n| !n.is_empty()) {
        parts.push(format!("assigned to node {node}, starting"));
    } else if let Some(pos) = run["queue_position"].as_u64().filter(|p| *p > 0) {
        parts.push(format!("queue position {pos}"));
    }
    if let Some(reason) = run["pending_reason"].as_str().filter(|r| !r.is_empty()) {
        parts.push(reason.to_owned());
    }
    if parts.is_empty() {
        "pending".to_owned()
    } else {
        format!("pending: {}", parts.join(": "))
    }
}

/// The progress line while the run's image is pulled: `pulling image 12.3/40.0 MiB (2/5
/// layers)`; None when the run shows no pull.
pub fn pull_line(run: &Value) -> Option<String> {
    crate::output::pull_summary(&run["image_pull"]).map(|s| format!("pulling image {s}"))
}

/// Shows pull progress on stderr: one line rewritten in place on a terminal, otherwise a new
/// line only when another layer is done (so logs stay short).
struct PullLine {
    tty: bool,
    shown: Option<String>,
    layers_shown: Option<u64>,
    open: bool,
}

impl PullLine {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            tty: std::io::stderr().is_terminal(),
            shown: None,
            layers_shown: None,
            open: false,
        }
    }

    fn update(&mut self, run: &Value) {
        let Some(line) = pull_line(run) else {
            return;
        };
        if self.shown.as_deref() == Some(line.as_str()) {
            return;
        }
        let mut stderr = std::io::stderr().lock();
        if self.tty {
            let _ = write!(stderr, "\r{line}\x1b[K");
            let _ = stderr.flush();
            self.open = true;
        } else {
            let layers = run["image_pull"]["layers_done"].as_u64();
            if self.layers_shown.is_none() || layers != self.layers_shown {
                let _ = writeln!(stderr, "{line}");
                self.layers_shown = layers;
            }
        }
        self.shown = Some(line);
    }

    /// Ends a line rewritten in place, before anything else is printed.
    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

/// Polls the run while it is pending, telling stderr each time why it waits changes, and (with
/// `show_progress`) how far its image pull has come.
pub async fn wait_while_pending(
    client: &Client,
    runner: &str,
    run: &str,
    show_progress: bool,
) -> Result<(), CommandError> {
    let path = format!("/v1/runners/{runner}/runs/{run}");
    let mut shown: Option<String> = None;
    let mut progress = PullLine::new();
    let mut failures = 0;
    let mut delays = retry_delays();
    loop {
        let v = match client.get(&path).await {
            Ok(a) => {
                if failures > 0 {
                    failures = 0;
                    delays = retry_delays();
                }
                a.json["run"].clone()
            }
            Err(e) if is_transient(&e) && failures < MAX_FAILURES => {
                failures += 1;
                tokio::time::sleep(delays.next().unwrap_or(RETRY_CEILING)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let status = v["status"].as_str().unwrap_or("");
        if status != "pending" {
            if show_progress && progress.shown.is_some() {
                progress.update(&v); // the final figures
                progress.close();
            }
            if shown.is_some() && status == "running" {
                let node = v["node_id"].as_str().unwrap_or("?");
                err_line(&format!("running on node {node}"));
            }
            return Ok(());
        }
        let message = pending_message(&v);
        if shown.as_deref() != Some(message.as_str()) {
            progress.close();
            err_line(&message);
            shown = Some(message);
        }
        if show_progress {
            progress.update(&v);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One log event's data.
#[derive(Debug, Deserialize)]
struct LogLine {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    stream: String,
    #[serde(default)]
    msg: String,
}

/// Where a followed run's output goes.
pub trait Sink {
    /// One `log` event's data.
    fn log(&mut self, data: &str);
    /// The final `state` event's data.
    fn state(&mut self, data: &str);
}

/// The terminal: stderr lines to stderr, everything else to stdout; with `json`, each event's
/// data as one line on stdout.
pub struct Terminal {
    pub json: bool,
}

impl Sink for Terminal {
    fn log(&mut self, data: &str) {
        if self.json {
            out(&format!("{data}\n"));
            return;
        }
        match serde_json::from_str::<LogLine>(data) {
            Ok(l) if l.stream == "stderr" => {
                let mut e = std::io::stderr().lock();
                let _ = writeln!(e, "{}", l.msg);
            }
            Ok(l) => out(&format!("{}\n", l.msg)),
            Err(_) => err_line(&format!("unreadable log event: {data}")),
        }
    }

    fn state(&mut self, data: &str) {
        if self.json {
            out(&format!("{data}\n"));
        }
    }
}

/// What one event means to the follower.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Done(FinalState),
    /// The server reported its watch failed; reconnect.
    Broken(String),
}

/// Handles one event; `last_id` is the id of the last line printed.
fn on_event(ev: &SseEvent, last_id: &mut Option<u64>, sink: &mut dyn Sink) -> Step {
    match ev.event.as_str() {
        "log" => {
            // The stream's last event id (the parser carries it over events that set none).
            let id = ev.id.parse::<u64>().ok().or_else(|| {
                serde_json::from_str::<LogLine>(&ev.data)
                    .ok()
                    .and_then(|l| l.id)
            });
            // A resumed stream starts after `last_id`; this guards against a repeat anyway.
            if let (Some(id), Some(last)) = (id, *last_id) {
                if id <= last {
                    return Step::Continue;
                }
            }
            sink.log(&ev.data);
            if id.is_some() {
                *last_id = id;
            }
            Step::Continue
        }
        "state" => match serde_json::from_str::<FinalState>(&ev.data) {
            Ok(s) if is_terminal(&s.status) => {
                sink.state(&ev.data);
                Step::Done(s)
            }
            Ok(s) => Step::Broken(format!("the stream ended with the run {}", s.status)),
            Err(e) => Step::Broken(format!("unreadable state event ({e}): {}", ev.data)),
        },
        "error" => Step::Broken(format!("the log stream failed: {}", ev.data)),
        _ => Step::Continue,
    }
}

/// Streams a run's lines until its final state; reconnects with `Last-Event-ID` when the
/// connection drops.
pub async fn stream_logs(
    client: &Client,
    runner: &str,
    run: &str,
    sink: &mut dyn Sink,
) -> Result<FinalState, CommandError> {
    let path = format!("/v1/runners/{runner}/runs/{run}/logs/stream");
    let mut last_id: Option<u64> = None;
    let mut failures = 0;
    let mut delays = retry_delays();
    loop {
        let problem = match client
            .open_stream(&path, last_id.map(|i| i.to_string()).as_deref())
            .await
        {
            Ok(res) => {
                let mut events = res.bytes_stream().eventsource();
                let mut problem = ClientError::Network {
                    url: client.url(&path),
                    reason: "the stream ended before the run's final state".to_owned(),
                };
                while let Some(ev) = events.next().await {
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(EventStreamError::Transport(e)) => {
                            problem = client.stream_error(&path, &e);
                            break;
                        }
                        Err(e) => {
                            problem = ClientError::Network {
                                url: client.url(&path),
                                reason: format!("unreadable event stream: {e}"),
                            };
                            break;
                        }
                    };
                    if failures > 0 {
                        failures = 0;
                        delays = retry_delays();
                    }
                    match on_event(&ev, &mut last_id, sink) {
                        Step::Continue => {}
                        Step::Done(s) => return Ok(s),
                        Step::Broken(reason) => {
                            problem = ClientError::Network {
                                url: client.url(&path),
                                reason,
                            }
                        }
                    }
                }
                problem
            }
            Err(e) if is_transient(&e) => e,
            Err(e) => return Err(e.into()),
        };
        failures += 1;
        if failures > MAX_FAILURES {
            return Err(problem.into());
        }
        let after = last_id.map_or("the start".to_owned(), |i| format!("line {i}"));
        err_line(&format!("{problem}; resuming after {after}"));
        tokio::time::sleep(delays.next().unwrap_or(RETRY_CEILING)).await;
    }
}

/// Resolves on Ctrl-C; never, when the signal cannot be listened to.
pub async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(status: &str, exit_code: Option<i64>) -> FinalState {
        FinalState {
            status: status.to_owned(),
            exit_code,
        }
    }

    #[test]
    fn pull_line_shows_mib_and_layers() {
        let run = json!({"image_pull": {"bytes_done": 12_897_485u64, "bytes_total": 41_943_040u64, "layers_done": 2, "layers_total": 5}});
        assert_eq!(
            pull_line(&run).as_deref(),
            Some("pulling image 12.3/40.0 MiB (2/5 layers)")
        );
        assert_eq!(pull_line(&json!({"image_pull": null})), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_for(&state("succeeded", Some(0))), 0);
        assert_eq!(exit_code_for(&state("failed", Some(7))), 7);
        assert_eq!(exit_code_for(&state("failed", Some(124))), 124);
        assert_eq!(exit_code_for(&state("failed", Some(300))), 255);
        assert_eq!(exit_code_for(&state("failed", Some(0))), 1);
        assert_eq!(exit_code_for(&state("failed", Some(-9))), 1);
        assert_eq!(exit_code_for(&state("failed", None)), 1);
        assert_eq!(exit_code_for(&state("canceled", None)), 130);
    }

    #[test]
    fn state_events_parse_with_or_without_exit_code() {
        let s: Result<FinalState, _> =
            serde_json::from_str(r#"{"status":"failed","exit_code":null}"#);
        assert_eq!(s.ok(), Some(state("failed", None)));
    }

    #[test]
    fn pending_messages() {
        assert_eq!(
            pending_message(
                &json!({"queue_position": 2, "pending_reason": "no node in fra with 1024 MiB free: 1 full", "node_id": null})
            ),
            "pending: queue position 2: no node in fra with 1024 MiB free: 1 full"
        );
        assert_eq!(
            pending_message(&json!({"queue_position": 0, "pending_reason": "", "node_id": "n1"})),
            "pending: assigned to node n1, starting"
        );
        assert_eq!(pending_message(&json!({})), "pending");
    }

    fn ev(event: &str, id: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            id: id.unwrap_or_default().to_owned(),
            data: data.to_owned(),
            retry: None,
        }
    }

    #[derive(Default)]
    struct Recorded {
        logs: Vec<String>,
        states: Vec<String>,
    }

    impl Sink for Recorded {
        fn log(&mut self, data: &str) {
            self.logs.push(data.to_owned());
        }
        fn state(&mut self, data: &str) {
            self.states.push(data.to_owned());
        }
    }

    #[test]
    fn events_advance_the_resume_point_and_end_on_a_final_state() {
        let mut last = None;
        let mut sink = Recorded::default();
        let log = ev(
            "log",
            Some("3"),
            r#"{"id":3,"stream":"stdout","msg":"x","ts":null}"#,
        );
        assert_eq!(on_event(&log, &mut last, &mut sink), Step::Continue);
        assert_eq!(last, Some(3));
        // A repeated line is skipped and does not move the resume point back.
        let old = ev(
            "log",
            Some("2"),
            r#"{"id":2,"stream":"stdout","msg":"old"}"#,
        );
        assert_eq!(on_event(&old, &mut last, &mut sink), Step::Continue);
        assert_eq!(last, Some(3));
        assert!(matches!(
            on_event(&ev("error", None, "{}"), &mut last, &mut sink),
            Step::Broken(_)
        ));
        assert!(matches!(
            on_event(
                &ev("state", None, r#"{"status":"running"}"#),
                &mut last,
                &mut sink
            ),
            Step::Broken(_)
        ));
        assert_eq!(
            on_event(
                &ev("state", None, r#"{"status":"failed","exit_code":7}"#),
                &mut last,
                &mut sink
            ),
            Step::Done(state("failed", Some(7)))
        );
        assert_eq!(sink.logs.len(), 1, "the repeat was not printed");
        assert_eq!(sink.states, [r#"{"status":"failed","exit_code":7}"#]);
    }

    #[test]
    fn retry_delays_stay_between_floor_and_ceiling_and_grow() {
        for _ in 0..20 {
            let delays: Vec<Duration> = retry_delays().take(30).collect();
            assert_eq!(delays.len(), 30, "endless");
            for d in &delays {
                assert!((RETRY_FLOOR..=RETRY_CEILING).contains(d), "{d:?}");
            }
            // Before jitter the first wait is the floor and the fourth 1.6 s; jitter adds less
            // than the delay itself.
            assert!(delays[0] < RETRY_FLOOR * 2, "{:?}", delays[0]);
            assert!(delays[3] >= Duration::from_millis(1_600), "{:?}", delays[3]);
            // Late waits sit in the top half, where the doubling stops.
            assert!(delays[29] >= RETRY_CEILING / 2, "{:?}", delays[29]);
        }
    }

    #[test]
    fn retry_delays_are_jittered() {
        let firsts: std::collections::BTreeSet<Duration> =
            (0..20).filter_map(|_| retry_delays().next()).collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    /// The stream parser is fed in chunks that split lines and characters anywhere.
    #[tokio::test]
    async fn events_parse_across_chunk_boundaries() {
        let text = "event: log\r\nid: 7\r\ndata: {\"msg\":\"grüße\"}\r\n\r\n:keep-alive\n\nevent: state\ndata: {}\n\n";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let chunks: Vec<Result<Vec<u8>, std::convert::Infallible>> =
                vec![Ok(bytes[..cut].to_vec()), Ok(bytes[cut..].to_vec())];
            let got: Vec<SseEvent> = futures::stream::iter(chunks)
                .eventsource()
                .filter_map(|e| async move { e.ok() })
                .collect()
                .await;
            let shape: Vec<(&str, &str, &str)> = got
                .iter()
                .map(|e| (e.event.as_str(), e.id.as_str(), e.data.as_str()))
                .collect();
            assert_eq!(
                shape,
                [
                    ("log", "7", "{\"msg\":\"grüße\"}"),
                    // The last event id carries over to an event that sets none.
                    ("state", "7", "{}")
                ],
                "cut {cut}"
            );
        }
    }
}
