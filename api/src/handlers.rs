//! HTTP handlers: parse, validate (pure, in `berth_core::validate`), call the control service,
//! render. No state of their own.

use crate::body::{JsonBody, Path, Query};
use crate::error::{ApiError, ErrorBody};
use crate::openapi::{
    InstanceTypesResponse, LogsPage, NodeResponse, NodesResponse, Region, RegionsResponse,
    RegistriesResponse, RegistryResponse, RunResponse, RunnerResponse, RunnersResponse, RunsPage,
    RunsResponse, UsageResponse, UsageRow, UsageTotal,
};
use crate::{views, AppState};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use berth_core::convert::{env_to_pb, files_to_upload_pb};
use berth_core::validate::{RegistryInput, RunInput, RunnerInput};
use berth_core::{Catalog, RunnerSpec};
use berth_proto::v1 as pb;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use std::convert::Infallible;

type ApiResult<T> = Result<T, ApiError>;

const MAX_ID_LEN: usize = 64;

/// The two ids of a run's path, checked.
fn run_ids(Path((runner_id, run_id)): Path<(String, String)>) -> ApiResult<(String, String)> {
    check_id("runner_id", &runner_id)?;
    check_id("run_id", &run_id)?;
    Ok((runner_id, run_id))
}

fn check_id(field: &str, id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotFound {
            field: field.to_owned(),
            message: format!("no such {field}: {id}"),
        })
    }
}

#[utoipa::path(
    post,
    path = "/v1/runners",
    tag = "runners",
    summary = "Create a runner",
    request_body = RunnerInput,
    responses(
        (status = 201, description = "Created", body = RunnerResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_runner(
    State(s): State<AppState>,
    JsonBody(input): JsonBody<RunnerInput>,
) -> ApiResult<impl IntoResponse> {
    let spec = input.into_spec(&catalog(&s).await?)?;
    let runner = s
        .control()
        .create_runner(pb::CreateRunnerRequest {
            spec: Some((&spec).into()),
        })
        .await?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        Json(RunnerResponse {
            runner: views::runner(&runner),
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/runners",
    tag = "runners",
    summary = "List runners",
    responses(
        (status = 200, description = "All runners", body = RunnersResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_runners(State(s): State<AppState>) -> ApiResult<Json<RunnersResponse>> {
    let list = s
        .control()
        .list_runners(pb::ListRunnersRequest {})
        .await?
        .into_inner();
    Ok(Json(RunnersResponse {
        runners: list.runners.iter().map(views::runner).collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/runners/{id}",
    tag = "runners",
    summary = "Get a runner",
    params(("id" = String, Path, description = "The runner's id")),
    responses(
        (status = 200, description = "The runner", body = RunnerResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn get_runner(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RunnerResponse>> {
    check_id("runner_id", &id)?;
    let runner = s
        .control()
        .get_runner(pb::GetRunnerRequest { id })
        .await?
        .into_inner();
    Ok(Json(RunnerResponse {
        runner: views::runner(&runner),
    }))
}

/// Read-modify-write with compare-and-set, retried when another update won the race.
#[utoipa::path(
    patch,
    path = "/v1/runners/{id}",
    tag = "runners",
    summary = "Update a runner: present fields replace its own",
    params(("id" = String, Path, description = "The runner's id")),
    request_body = RunnerInput,
    responses(
        (status = 200, description = "The updated runner", body = RunnerResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn update_runner(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<RunnerInput>,
) -> ApiResult<Json<RunnerResponse>> {
    check_id("runner_id", &id)?;
    let mut attempts = 0;
    loop {
        let current = s
            .control()
            .get_runner(pb::GetRunnerRequest { id: id.clone() })
            .await?
            .into_inner();
        let spec: RunnerSpec = current.spec.clone().unwrap_or_default().into();
        let next = patch.clone().apply(&spec, &catalog(&s).await?)?;
        let req = pb::UpdateRunnerRequest {
            id: id.clone(),
            spec: Some((&next).into()),
            revision: current.revision,
        };
        match s.control().update_runner(req).await {
            Ok(r) => {
                return Ok(Json(RunnerResponse {
                    runner: views::runner(&r.into_inner()),
                }))
            }
            Err(status) if status.code() == tonic::Code::Aborted && attempts < 5 => attempts += 1,
            Err(status) => return Err(status.into()),
        }
    }
}

#[utoipa::path(
    delete,
    path = "/v1/runners/{id}",
    tag = "runners",
    summary = "Delete a runner",
    params(("id" = String, Path, description = "The runner's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn delete_runner(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    check_id("runner_id", &id)?;
    s.control()
        .delete_runner(pb::DeleteRunnerRequest { id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A run's checked overrides in their gRPC form (uploaded files decoded).
fn overrides(input: RunInput) -> ApiResult<pb::RunOverrides> {
    let files = files_to_upload_pb(&input.decoded_files()?);
    Ok(pb::RunOverrides {
        argv_set: input.argv.is_some(),
        argv: input.argv.unwrap_or_default(),
        command: input.command,
        entrypoint: input.entrypoint,
        env_variables: env_to_pb(&input.env_variables.unwrap_or_default()),
        files,
        stop_grace_seconds: input.stop_grace_seconds.and_then(|g| u32::try_from(g).ok()),
    })
}

pub const IDEMPOTENCY_KEY_MAX: usize = 255;

/// The optional `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_MAX)
        .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(k) => Ok(Some(k.to_owned())),
        None => Err(berth_core::validate::ValidationErrors::single(
            "Idempotency-Key",
            format!("must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
        )
        .into()),
    }
}

/// Creates a run (201). With an `Idempotency-Key`, a retry returns the first run (200, header
/// `Idempotent-Replayed: true`).
#[utoipa::path(
    post,
    path = "/v1/runners/{id}/runs",
    tag = "runs",
    summary = "Start a run, with optional overrides",
    params(("id" = String, Path, description = "The runner's id"), ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters; a retry with the same key (per runner) returns the first run")),
    request_body(content = Option<RunInput>, description = "Per-run overrides; an empty body means none"),
    responses(
        (status = 201, description = "Created", body = RunResponse),
        (status = 200, description = "A retry with the same `Idempotency-Key`: the run the first request created", body = RunResponse, headers(("Idempotent-Replayed" = String, description = "`true`"))),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_run(
    State(s): State<AppState>,
    Path(runner_id): Path<String>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<RunInput, true>,
) -> ApiResult<impl IntoResponse> {
    check_id("runner_id", &runner_id)?;
    let idempotency_key = idempotency_key(&headers)?;
    let input = input.validate()?;
    let o = overrides(input)?;
    let req = pb::CreateRunRequest {
        runner_id,
        argv_set: o.argv_set,
        argv: o.argv,
        command: o.command,
        entrypoint: o.entrypoint,
        env_variables: o.env_variables,
        idempotency_key,
        files: o.files,
        stop_grace_seconds: o.stop_grace_seconds,
    };
    let response = s.control().create_run(req).await?;
    let replayed = response.metadata().get("idempotent-replayed").is_some();
    let run = response.into_inner();
    let body = Json(RunResponse {
        run: views::run(&run),
    });
    Ok(if replayed {
        (StatusCode::OK, [("idempotent-replayed", "true")], body).into_response()
    } else {
        (StatusCode::CREATED, body).into_response()
    })
}

/// `POST /v1/runners/{id}/runs/batch` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    /// 1 to 1,000 run overrides; an invalid item rejects the batch, naming `runs[i].field`.
    #[schema(min_items = 1, max_items = 1000)]
    runs: Option<Vec<RunInput>>,
}

pub const BATCH_MAX_RUNS: usize = 1_000;

/// Creates one run per item (data-driven fan-out); all are placed together.
#[utoipa::path(
    post,
    path = "/v1/runners/{id}/runs/batch",
    tag = "runs",
    summary = "Start several runs at once",
    params(("id" = String, Path, description = "The runner's id")),
    request_body = BatchInput,
    responses(
        (status = 201, description = "Created, in the order of the items", body = RunsResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_runs(
    State(s): State<AppState>,
    Path(runner_id): Path<String>,
    JsonBody(input): JsonBody<BatchInput>,
) -> ApiResult<impl IntoResponse> {
    check_id("runner_id", &runner_id)?;
    let items = input.runs.unwrap_or_default();
    if items.is_empty() || items.len() > BATCH_MAX_RUNS {
        return Err(berth_core::validate::ValidationErrors::single(
            "runs",
            format!("must hold 1 to {BATCH_MAX_RUNS} runs"),
        )
        .into());
    }
    let runs = berth_core::validate::validate_batch(items)?
        .into_iter()
        .map(overrides)
        .collect::<ApiResult<_>>()?;
    let created = s
        .control()
        .create_runs(pb::CreateRunsRequest { runner_id, runs })
        .await?
        .into_inner();
    let runs = created.runs.iter().map(views::run).collect();
    Ok((StatusCode::CREATED, Json(RunsResponse { runs })))
}

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/runs",
    tag = "runs",
    summary = "A page of a runner's runs, oldest first",
    params(("id" = String, Path, description = "The runner's id"), RunsQuery),
    responses(
        (status = 200, description = "The runner's runs after `after`", body = RunsPage),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_runs(
    State(s): State<AppState>,
    Path(runner_id): Path<String>,
    Query(q): Query<RunsQuery>,
) -> ApiResult<Json<RunsPage>> {
    check_id("runner_id", &runner_id)?;
    let limit = parse_limit(q.limit.as_deref(), RUNS_DEFAULT_LIMIT, RUNS_MAX_LIMIT)?;
    let after_id = q.after.unwrap_or_default();
    if !after_id.is_empty() {
        // A cursor is a run id; anything else cannot be one.
        check_id("after", &after_id).map_err(|_| {
            ApiError::Invalid(berth_core::validate::ValidationErrors::single(
                "after",
                "must be a run id (the `next_after` of the previous page)",
            ))
        })?;
    }
    let list = s
        .control()
        .list_runs(pb::ListRunsRequest {
            runner_id,
            limit,
            after_id,
        })
        .await?
        .into_inner();
    Ok(Json(RunsPage {
        runs: list.runs.iter().map(views::run).collect(),
        next_after: (!list.next_after_id.is_empty()).then_some(list.next_after_id),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs created after this run (the previous page's `next_after`).
    after: Option<String>,
    /// 1 to 1,000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

pub const RUNS_DEFAULT_LIMIT: u32 = 100;
pub const RUNS_MAX_LIMIT: u32 = 1000;

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/runs/{run_id}",
    tag = "runs",
    summary = "Get a run",
    params(("id" = String, Path, description = "The runner's id"), ("run_id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or run", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn get_run(
    State(s): State<AppState>,
    path: Path<(String, String)>,
) -> ApiResult<Json<RunResponse>> {
    let (runner_id, run_id) = run_ids(path)?;
    let run = s
        .control()
        .get_run(pb::GetRunRequest { runner_id, run_id })
        .await?
        .into_inner();
    Ok(Json(RunResponse {
        run: views::run(&run),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/runners/{id}/runs/{run_id}/stop",
    tag = "runs",
    summary = "Stop a run",
    params(("id" = String, Path, description = "The runner's id"), ("run_id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run, normally already `canceled`; a finished run unchanged", body = RunResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or run", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn stop_run(
    State(s): State<AppState>,
    path: Path<(String, String)>,
) -> ApiResult<Json<RunResponse>> {
    let (runner_id, run_id) = run_ids(path)?;
    let run = s
        .control()
        .stop_run(pb::StopRunRequest { runner_id, run_id })
        .await?
        .into_inner();
    Ok(Json(RunResponse {
        run: views::run(&run),
    }))
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

/// A query number; present but empty (`?limit=`) is an invalid value, not an absent one.
fn parse_number<T: std::str::FromStr>(field: &str, v: Option<&str>) -> ApiResult<Option<T>> {
    v.map(|s| {
        s.parse::<T>().map_err(|_| {
            ApiError::Invalid(berth_core::validate::ValidationErrors::single(
                field,
                "must be a non-negative integer",
            ))
        })
    })
    .transpose()
}

/// A page size from the `limit` query parameter: 1 to `max`, `default` when absent.
fn parse_limit(v: Option<&str>, default: u32, max: u32) -> ApiResult<u32> {
    let limit = parse_number::<u32>("limit", v)?.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(berth_core::validate::ValidationErrors::single(
            "limit",
            format!("must be between 1 and {max}"),
        )
        .into());
    }
    Ok(limit)
}

/// A log id from a query or header: a non-negative integer up to `i64::MAX` (as documented).
fn parse_after_id(field: &str, v: Option<&str>) -> ApiResult<Option<u64>> {
    parse_number::<i64>(field, v)?
        .map(|n| {
            u64::try_from(n).map_err(|_| {
                ApiError::Invalid(berth_core::validate::ValidationErrors::single(
                    field,
                    "must be a non-negative integer",
                ))
            })
        })
        .transpose()
}

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
        logs: page.logs.iter().map(views::log).collect(),
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
    let stream = events.map(|item| {
        let event = match item.map(|e| e.event) {
            Ok(Some(pb::watch_logs_event::Event::Log(l))) => Event::default()
                .event("log")
                .id(l.id.to_string())
                .data(serde_json::to_string(&views::log(&l)).unwrap_or_default()),
            Ok(Some(pb::watch_logs_event::Event::State(st))) => {
                Event::default().event("state").data(
                    serde_json::to_string(&views::RunStateView {
                        status: st.status,
                        exit_code: st.exit_code,
                    })
                    .unwrap_or_default(),
                )
            }
            Ok(None) => Event::default().comment("empty"),
            Err(status) => Event::default().event("error").data(
                serde_json::to_string(&views::StreamErrorView {
                    code: "stream_failed".to_owned(),
                    message: status.message().to_owned(),
                })
                .unwrap_or_default(),
            ),
        };
        Ok(event)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "nodes",
    summary = "List nodes",
    responses(
        (status = 200, description = "All nodes the scheduler knows", body = NodesResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_nodes(State(s): State<AppState>) -> ApiResult<Json<NodesResponse>> {
    let list = s
        .control()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner();
    Ok(Json(NodesResponse {
        nodes: list.nodes.iter().map(views::node).collect(),
    }))
}

/// The scheduler's catalog: the regions and instance types runners may name.
async fn catalog(s: &AppState) -> ApiResult<Catalog> {
    let c = s.control().get_catalog(pb::GetCatalogRequest {}).await?;
    Ok(c.into_inner().into())
}

#[utoipa::path(
    get,
    path = "/v1/instance_types",
    tag = "catalog",
    summary = "The instance types runners may name",
    responses(
        (status = 200, description = "The catalog's instance types", body = InstanceTypesResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_instance_types(
    State(s): State<AppState>,
) -> ApiResult<Json<InstanceTypesResponse>> {
    Ok(Json(InstanceTypesResponse {
        instance_types: catalog(&s).await?.instance_types,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/regions",
    tag = "catalog",
    summary = "The regions runners may name",
    responses(
        (status = 200, description = "The catalog's regions", body = RegionsResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_regions(State(s): State<AppState>) -> ApiResult<Json<RegionsResponse>> {
    let regions = catalog(&s).await?.regions;
    let regions = regions.into_iter().map(|slug| Region { slug }).collect();
    Ok(Json(RegionsResponse { regions }))
}

/// Starts a warmup and answers at once; the runner's `warmup_status` tells how it goes.
#[utoipa::path(
    post,
    path = "/v1/runners/{id}/warmup",
    tag = "runners",
    summary = "Pull a runner's image onto a node ahead of its runs",
    params(("id" = String, Path, description = "The runner's id")),
    responses(
        (status = 202, description = "Started; `warmup_status` tells how it goes", body = RunnerResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn warmup_runner(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    check_id("runner_id", &id)?;
    let runner = s
        .control()
        .warmup_runner(pb::WarmupRunnerRequest { id })
        .await?
        .into_inner();
    Ok((
        StatusCode::ACCEPTED,
        Json(RunnerResponse {
            runner: views::runner(&runner),
        }),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/container_registries",
    tag = "registries",
    summary = "Store a private registry's credentials",
    request_body = RegistryInput,
    responses(
        (status = 201, description = "Created (the password is never returned)", body = RegistryResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_registry(
    State(s): State<AppState>,
    JsonBody(input): JsonBody<RegistryInput>,
) -> ApiResult<impl IntoResponse> {
    let spec = input.validate()?;
    let req = pb::CreateContainerRegistryRequest {
        name: spec.name,
        host: spec.host,
        username: spec.username,
        password: spec.password,
    };
    let reg = s
        .control()
        .create_container_registry(req)
        .await?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        Json(RegistryResponse {
            container_registry: views::registry(&reg),
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/container_registries",
    tag = "registries",
    summary = "List private registries",
    responses(
        (status = 200, description = "All registries", body = RegistriesResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_registries(State(s): State<AppState>) -> ApiResult<Json<RegistriesResponse>> {
    let list = s
        .control()
        .list_container_registries(pb::ListContainerRegistriesRequest {})
        .await?
        .into_inner();
    Ok(Json(RegistriesResponse {
        container_registries: list
            .container_registries
            .iter()
            .map(views::registry)
            .collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/container_registries/{id}",
    tag = "registries",
    summary = "Get a private registry",
    params(("id" = String, Path, description = "The registry's id")),
    responses(
        (status = 200, description = "The registry", body = RegistryResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such registry", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn get_registry(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RegistryResponse>> {
    check_id("container_registry_id", &id)?;
    let reg = s
        .control()
        .get_container_registry(pb::ContainerRegistryRequest { id })
        .await?
        .into_inner();
    Ok(Json(RegistryResponse {
        container_registry: views::registry(&reg),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/container_registries/{id}",
    tag = "registries",
    summary = "Delete a private registry",
    params(("id" = String, Path, description = "The registry's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such registry", body = ErrorBody),
        (status = 409, description = "Runners still name it", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn delete_registry(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    check_id("container_registry_id", &id)?;
    s.control()
        .delete_container_registry(pb::ContainerRegistryRequest { id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// A date (`YYYY-MM-DD`, midnight UTC) or RFC 3339 timestamp; default `to` minus 30 days.
    from: Option<String>,
    /// A date or RFC 3339 timestamp; default now.
    to: Option<String>,
    /// `runner` (default), `instance_type` or `day`.
    group_by: Option<String>,
}

/// `2026-11-01` (midnight UTC) or an RFC 3339 timestamp, as unix millis.
fn parse_instant(field: &str, v: &str) -> ApiResult<i64> {
    use time::format_description::well_known::Rfc3339;
    let invalid = || {
        ApiError::Invalid(berth_core::validate::ValidationErrors::single(
            field,
            "must be a date (YYYY-MM-DD) or an RFC 3339 timestamp",
        ))
    };
    let at = match time::OffsetDateTime::parse(v, &Rfc3339) {
        Ok(t) => t,
        Err(_) => {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(v, &format)
                .map_err(|_| invalid())?
                .midnight()
                .assume_utc()
        }
    };
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid())
}

/// Billed usage of the runs that ended in `[from, to)`; defaults: the last 30 days, by runner.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "usage",
    summary = "Billed usage of the runs that ended in `[from, to)`",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage by group and in total", body = UsageResponse),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn usage(
    State(s): State<AppState>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageResponse>> {
    let now = berth_core::now_unix_millis();
    let to = match q.to.as_deref() {
        Some(v) => parse_instant("to", v)?,
        None => now,
    };
    let from = match q.from.as_deref() {
        Some(v) => parse_instant("from", v)?,
        None => to - 30 * 86_400_000,
    };
    if from >= to {
        return Err(
            berth_core::validate::ValidationErrors::single("from", "must be before to").into(),
        );
    }
    let group_by = q.group_by.unwrap_or_else(|| "runner".to_owned());
    let req = pb::GetUsageRequest {
        from_unix_millis: from,
        to_unix_millis: to,
        group_by: group_by.clone(),
    };
    let rows = s.control().get_usage(req).await?.into_inner().rows;
    let total_cost: u64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    let total_seconds: u64 = rows.iter().map(|r| r.billed_seconds).sum();
    let usage = rows
        .iter()
        .map(|r| UsageRow {
            key: r.key.clone(),
            runs: r.runs,
            billed_seconds: r.billed_seconds,
            cost_usd: views::nano_usd(r.cost_nano_usd),
        })
        .collect();
    Ok(Json(UsageResponse {
        from: views::timestamp_millis(from),
        to: views::timestamp_millis(to),
        group_by,
        usage,
        total: UsageTotal {
            billed_seconds: total_seconds,
            cost_usd: views::nano_usd(total_cost),
        },
    }))
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/drain",
    tag = "nodes",
    summary = "Drain a node: no new runs; running runs finish",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = NodeResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn drain_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .drain_node(pb::NodeRequest { id })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/resume",
    tag = "nodes",
    summary = "Resume a drained node",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = NodeResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn resume_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .resume_node(pb::NodeRequest { id })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node),
    }))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    summary = "Liveness: answers `ok`",
    security(()),
    responses(
        (status = 200, description = "The process is up", body = String, content_type = "text/plain"),
    )
)]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    summary = "This document",
    security(()),
    responses(
        (status = 200, description = "The OpenAPI 3 document", body = Object),
    )
)]
pub async fn openapi_json() -> Json<&'static serde_json::Value> {
    crate::openapi::json()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound {
        field: "path".to_owned(),
        message: "no such route".to_owned(),
    }
}
