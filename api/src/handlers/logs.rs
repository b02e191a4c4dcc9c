//! A run's output: paged (`/logs`) and as Server-Sent Events (`/logs/stream`).

use super::{parse_after_id, parse_limit, run_ids, ApiResult};
use crate::body::{Path, Query};
use crate::error::ErrorBody;
use crate::views::{self, LogView};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use berth_core::convert::run_status_from_pb;
use berth_proto::v1 as pb;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::time::Duration;
use utoipa::ToSchema;

/// A page of a run's output lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogsPage {
    pub logs: Vec<LogView>,
    pub has_more: bool,
    /// Pass as `after_id` to get the next page.
    pub next_after_id: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines with a larger id (default 0).
    #[param(value_type = Option<i64>, minimum = 0)]
    after_id: Option<String>,
    /// 1 to 1,000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

pub const LOGS_DEFAULT_LIMIT: u32 = 100;
pub const LOGS_MAX_LIMIT: u32 = 1000;

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/runs/{run_id}/logs",
    tag = "logs",
    summary = "A page of a run's output lines",
    params(("id" = String, Path, description = "The runner's id"), ("run_id" = String, Path, description = "The run's id"), LogsQuery),
    responses(
        (status = 200, description = "The lines after `after_id`", body = LogsPage),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or run", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_logs(
    State(s): State<AppState>,
    path: Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<LogsPage>> {
    let (runner_id, run_id) = run_ids(path)?;
    let after_id = parse_after_id("after_id", q.after_id.as_deref())?.unwrap_or(0);
    let limit = parse_limit(q.limit.as_deref(), LOGS_DEFAULT_LIMIT, LOGS_MAX_LIMIT)?;
    let page = s
        .control()
        .list_logs(pb::ListLogsRequest {
            runner_id,
            run_id,
            after_id,
            limit,
        })
        .await?
        .into_inner();
    let next_after_id = page.logs.last().map_or(after_id, |l| l.id);
    Ok(Json(LogsPage {
        logs: page.logs.iter().map(views::log).collect::<Result<_, _>>()?,
        has_more: page.has_more,
        next_after_id,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Only lines with a larger id; overrides `Last-Event-ID`.
    #[param(value_type = Option<i64>, minimum = 0)]
    after_id: Option<String>,
}

/// Server-Sent Events: one `log` event per line (SSE id = log id), then one `state` event, then
/// the stream ends. Resumes after `?after_id=` or the `Last-Event-ID` header. When the scheduler
/// fails over (or restarts) meanwhile, the stream resumes by itself on the one that answers,
/// after the last id it sent; only if none answers within [`STREAM_RESUME_BUDGET`] does it send
/// an `error` event and end (the client resumes with `Last-Event-ID`).
#[utoipa::path(
    get,
    path = "/v1/runners/{id}/runs/{run_id}/logs/stream",
    tag = "logs",
    summary = "A run's output as Server-Sent Events",
    params(("id" = String, Path, description = "The runner's id"), ("run_id" = String, Path, description = "The run's id"), StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this log id (when `after_id` is absent)")),
    responses(
        (status = 200, description = "`event: log` per line (`id:` its log id, `data:` a Log object as JSON), then one `event: state` (`data: {\"status\", \"exit_code\"}`) once the run has ended, then the stream ends", body = String, content_type = "text/event-stream"),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or run", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 429, description = "This API key has the most log streams open (`berth-api --max-streams-per-key`)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn stream_logs(
    State(s): State<AppState>,
    path: Path<(String, String)>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (runner_id, run_id) = run_ids(path)?;
    let caller = crate::auth::current().ok_or(crate::error::ApiError::Unauthorized)?;
    let permit = s.streams.acquire(&caller.key)?;
    let from_header = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let after_id = match parse_after_id("after_id", q.after_id.as_deref())? {
        Some(v) => v,
        None => parse_after_id("Last-Event-ID", from_header)?.unwrap_or(0),
    };
    let request = pb::WatchLogsRequest {
        runner_id,
        run_id,
        after_id,
        batched: true,
    };
    // Errors before the first event are the request's answer (404, 503, …).
    let events = s.control().watch_logs(request.clone()).await?.into_inner();
    let follow = Follow {
        state: s,
        caller,
        request,
        events: Some(events),
        lines: std::collections::VecDeque::new(),
        lost_since: None,
        reopened: 0,
        ended: false,
        _permit: permit,
    };
    let events = futures::stream::unfold(follow, |mut f| async move {
        let event = f.next_event().await?;
        Some((event, f))
    });
    // Every event ready at once goes out in one body frame (a client catching up on a run
    // that logged fast gets thousands per frame, not one write each); a quiet stream gets a
    // keep-alive comment every `KEEP_ALIVE`.
    let ready = Box::pin(events.ready_chunks(FRAME_EVENTS));
    let frames = futures::stream::unfold(ready, |mut ready| async move {
        let mut frame = Vec::new();
        // Cancel-safe: what the stream had begun to gather stays in it.
        match tokio::time::timeout(KEEP_ALIVE, ready.next()).await {
            Ok(Some(events)) => events.iter().for_each(|e| e.write(&mut frame)),
            Ok(None) => return None,
            Err(_) => frame.extend_from_slice(b":\n\n"),
        }
        Some((Ok::<_, Infallible>(Bytes::from(frame)), ready))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response())
}

/// The most events one body frame of a log stream holds.
const FRAME_EVENTS: usize = 4096;
/// How long a log stream stays silent before it sends a comment (keeps proxies from closing it).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One Server-Sent Event of a log stream.
enum SseEvent {
    /// `event: log`, `id:` the line's id, `data:` the line as JSON.
    Log(LogView),
    /// `event: state`, `data:` the run's final state as JSON.
    State(views::RunStateView),
    /// `event: error`, `data:` why the stream ends.
    Error(String),
    /// A comment line.
    Comment(&'static str),
}

impl SseEvent {
    /// Appends the event in the SSE wire format. JSON holds no raw line break, so `data` is
    /// always one line.
    fn write(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        match self {
            SseEvent::Log(line) => {
                let _ = write!(out, "event: log\nid: {}\ndata: ", line.id);
                let _ = serde_json::to_writer(&mut *out, line);
            }
            SseEvent::State(state) => {
                out.extend_from_slice(b"event: state\ndata: ");
                let _ = serde_json::to_writer(&mut *out, state);
            }
            SseEvent::Error(message) => {
                out.extend_from_slice(b"event: error\ndata: ");
                let _ = serde_json::to_writer(
                    &mut *out,
                    &views::StreamErrorView {
                        code: "stream_failed".to_owned(),
                        message: message.clone(),
                    },
                );
            }
            SseEvent::Comment(text) => {
                let _ = write!(out, ": {text}");
            }
        }
        out.extend_from_slice(b"\n\n");
    }
}

/// How long a log stream keeps trying to re-open its watch after losing the scheduler (each try
/// itself fails over within [`crate::scheduler::FAILOVER_BUDGET`]); then it sends `error`.
pub const STREAM_RESUME_BUDGET: Duration = Duration::from_secs(30);
/// The pause between two tries to re-open a watch.
const STREAM_RESUME_PAUSE: Duration = Duration::from_millis(200);

/// One SSE log stream: forwards the scheduler's watch and, when the scheduler goes away (killed,
/// stopped, failed over), re-opens the watch on whichever scheduler answers, after the last line
/// id it sent, so the client sees every line once and the stream ends with the run.
struct Follow {
    state: AppState,
    /// The stream outlives the request's task-local caller: re-opened watches act as this one.
    caller: crate::auth::Caller,
    /// `after_id` is the last line id sent.
    request: pb::WatchLogsRequest,
    events: Option<tonic::Streaming<pb::WatchLogsEvent>>,
    /// Lines of a `logs` event not sent yet.
    lines: std::collections::VecDeque<pb::LogEntry>,
    /// When the watch was lost, until an event arrives again.
    lost_since: Option<tokio::time::Instant>,
    /// Watches opened since then (one that ends at once is not retried in a busy loop).
    reopened: u32,
    /// The last event (the run's state, or an error) was sent.
    ended: bool,
    /// Held until the stream ends or the client goes away.
    _permit: crate::limits::StreamPermit,
}

impl Follow {
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(l) = self.lines.pop_front() {
                if let Some(event) = self.line_event(&l) {
                    return Some(event);
                }
                continue;
            }
            let Some(events) = self.events.as_mut() else {
                if let Err(status) = self.reopen().await {
                    self.ended = true;
                    return Some(stream_error(status.message().to_owned()));
                }
                continue;
            };
            let item = match events.message().await {
                Ok(Some(item)) => item,
                // The scheduler stopped (its watch ends without the run's state): resume.
                Ok(None) => {
                    self.lost("the scheduler ended the watch");
                    continue;
                }
                Err(status) if scheduler_gone(&status) => {
                    self.lost(status.message());
                    continue;
                }
                Err(status) => {
                    self.ended = true;
                    return Some(stream_error(status.message().to_owned()));
                }
            };
            self.lost_since = None;
            self.reopened = 0;
            match item.event {
                Some(pb::watch_logs_event::Event::Log(l)) => {
                    if let Some(event) = self.line_event(&l) {
                        return Some(event);
                    }
                }
                Some(pb::watch_logs_event::Event::Logs(batch)) => {
                    self.lines.extend(batch.lines);
                }
                Some(pb::watch_logs_event::Event::State(st)) => {
                    self.ended = true;
                    return Some(match run_status_from_pb(st.status) {
                        Ok(status) => SseEvent::State(views::RunStateView {
                            status,
                            exit_code: st.exit_code,
                        }),
                        Err(e) => stream_error(e.to_string()),
                    });
                }
                None => return Some(SseEvent::Comment("empty")),
            }
        }
    }

    /// The event for line `l`, unless it was sent already (a resumed watch starts after the
    /// last id sent; a line is never sent twice).
    fn line_event(&mut self, l: &pb::LogEntry) -> Option<SseEvent> {
        if l.id <= self.request.after_id {
            return None;
        }
        self.request.after_id = l.id;
        Some(match views::log(l) {
            Ok(view) => SseEvent::Log(view),
            Err(e) => stream_error(e.to_string()),
        })
    }

    fn lost(&mut self, why: &str) {
        self.events = None;
        let since = *self
            .lost_since
            .get_or_insert_with(tokio::time::Instant::now);
        tracing::info!(
            run_id = %self.request.run_id,
            after_id = self.request.after_id,
            lost_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            reason = why,
            "log stream lost its scheduler; resuming"
        );
    }

    /// Re-opens the watch after the last id sent, trying until [`STREAM_RESUME_BUDGET`] has
    /// passed since the watch was lost.
    async fn reopen(&mut self) -> Result<(), tonic::Status> {
        let since = *self
            .lost_since
            .get_or_insert_with(tokio::time::Instant::now);
        loop {
            if self.reopened > 0 {
                tokio::time::sleep(STREAM_RESUME_PAUSE).await;
            }
            if since.elapsed() >= STREAM_RESUME_BUDGET {
                return Err(tonic::Status::unavailable(format!(
                    "no scheduler resumed the log stream within {} s; resume with Last-Event-ID",
                    STREAM_RESUME_BUDGET.as_secs()
                )));
            }
            self.reopened += 1;
            let opened = crate::auth::as_caller(
                self.caller.clone(),
                self.state.control().watch_logs(self.request.clone()),
            )
            .await;
            match opened {
                Ok(res) => {
                    tracing::info!(
                        run_id = %self.request.run_id,
                        after_id = self.request.after_id,
                        "log stream resumed"
                    );
                    self.events = Some(res.into_inner());
                    return Ok(());
                }
                Err(status) if scheduler_gone(&status) => {}
                Err(status) => return Err(status),
            }
        }
    }
}

/// The watch failed because no scheduler answered (rather than the scheduler refusing it).
fn scheduler_gone(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        Code::Unknown => crate::error::is_transport_failure(status),
        _ => false,
    }
}

/// The stream's `error` event: the client may resume with `Last-Event-ID`.
fn stream_error(message: String) -> SseEvent {
    SseEvent::Error(message)
}
