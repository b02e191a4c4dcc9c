//! A run's output: paged (`/logs`) and as Server-Sent Events (`/logs/stream`).

use super::{parse_after_id, parse_limit, run_ids, ApiResult};
use crate::body::{Path, Query};
use crate::error::ErrorBody;
use crate::views::{self, LogView};
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use berth_core::convert::run_status_from_pb;
use berth_proto::v1 as pb;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
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
/// the stream ends. Resumes after `?after_id=` or the `Last-Event-ID` header.
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
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let (runner_id, run_id) = run_ids(path)?;
    let caller = crate::auth::current().ok_or(crate::error::ApiError::Unauthorized)?;
    // Held by the stream until it ends or the client goes away.
    let permit = s.streams.acquire(&caller.key)?;
    let from_header = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let after_id = match parse_after_id("after_id", q.after_id.as_deref())? {
        Some(v) => v,
        None => parse_after_id("Last-Event-ID", from_header)?.unwrap_or(0),
    };
    let events = s
        .control()
        .watch_logs(pb::WatchLogsRequest {
            runner_id,
            run_id,
            after_id,
        })
        .await?
        .into_inner();
    let stream = events.map(move |item| {
        let _held = &permit;
        let event = match item.map(|e| e.event) {
            Ok(Some(pb::watch_logs_event::Event::Log(l))) => match views::log(&l) {
                Ok(view) => Event::default()
                    .event("log")
                    .id(l.id.to_string())
                    .data(serde_json::to_string(&view).unwrap_or_default()),
                Err(e) => stream_error(e.to_string()),
            },
            Ok(Some(pb::watch_logs_event::Event::State(st))) => {
                match run_status_from_pb(st.status) {
                    Ok(status) => Event::default().event("state").data(
                        serde_json::to_string(&views::RunStateView {
                            status,
                            exit_code: st.exit_code,
                        })
                        .unwrap_or_default(),
                    ),
                    Err(e) => stream_error(e.to_string()),
                }
            }
            Ok(None) => Event::default().comment("empty"),
            Err(status) => stream_error(status.message().to_owned()),
        };
        Ok(event)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The stream's `error` event: the client may resume with `Last-Event-ID`.
fn stream_error(message: String) -> Event {
    Event::default().event("error").data(
        serde_json::to_string(&views::StreamErrorView {
            code: "stream_failed".to_owned(),
            message,
        })
        .unwrap_or_default(),
    )
}
