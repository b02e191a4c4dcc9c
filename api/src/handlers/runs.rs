//! Runs: start one (idempotently) or a batch, page through a runner's runs, get, stop.

use super::{check_id, parse_limit, run_ids, ApiResult};
use crate::body::{JsonBody, Path, Query};
use crate::error::{ApiError, ErrorBody};
use crate::views::{self, RunView};
use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use berth_core::convert::overrides_to_pb;
use berth_core::overrides::{check_batch, RunOverrides};
use berth_core::validate::RunInput;
use berth_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"run": …}`
#[derive(Debug, Serialize, ToSchema)]
pub struct RunResponse {
    pub run: RunView,
}

/// `{"runs": […]}`
#[derive(Debug, Serialize, ToSchema)]
pub struct RunsResponse {
    pub runs: Vec<RunView>,
}

/// A page of a runner's runs, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunsPage {
    pub runs: Vec<RunView>,
    /// Pass as `after` for the next page; `null` on the last one.
    #[schema(required = true)]
    pub next_after: Option<String>,
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
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
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
    let overrides = overrides_to_pb(RunOverrides::from_input(input)?);
    let req = pb::CreateRunRequest {
        runner_id,
        overrides: Some(overrides),
        idempotency_key,
    };
    let response = s.control().create_run(req).await?;
    let replayed = response.metadata().get("idempotent-replayed").is_some();
    let run = response.into_inner();
    let body = Json(RunResponse {
        run: views::run(&run)?,
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
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
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
    let runs = check_batch(items, RunOverrides::from_input)?
        .into_iter()
        .map(overrides_to_pb)
        .collect();
    let created = s
        .control()
        .create_runs(pb::CreateRunsRequest { runner_id, runs })
        .await?
        .into_inner();
    let runs = created
        .runs
        .iter()
        .map(views::run)
        .collect::<Result<_, _>>()?;
    Ok((StatusCode::CREATED, Json(RunsResponse { runs })))
}

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/runs",
    tag = "runs",
    summary = "A page of a runner's runs, oldest first (or newest first with `order=desc`)",
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
    let after_id = cursor(q.after)?;
    let newest_first = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(_) => {
            return Err(berth_core::validate::ValidationErrors::single(
                "order",
                "must be asc or desc",
            )
            .into())
        }
    };
    let list = s
        .control()
        .list_runs(pb::ListRunsRequest {
            runner_id,
            limit,
            after_id,
            newest_first,
        })
        .await?
        .into_inner();
    page(list)
}

/// A page cursor from a query: empty, or a run id (a page's `next_after`).
fn cursor(after: Option<String>) -> ApiResult<String> {
    let after_id = after.unwrap_or_default();
    if !after_id.is_empty() {
        // A cursor is a run id; anything else cannot be one.
        check_id("after", &after_id).map_err(|_| {
            ApiError::from(berth_core::validate::ValidationErrors::single(
                "after",
                "must be a run id (the `next_after` of the previous page)",
            ))
        })?;
    }
    Ok(after_id)
}

fn page(list: pb::ListRunsResponse) -> ApiResult<Json<RunsPage>> {
    Ok(Json(RunsPage {
        runs: list.runs.iter().map(views::run).collect::<Result<_, _>>()?,
        next_after: (!list.next_after_id.is_empty()).then_some(list.next_after_id),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    summary = "Runs that have not ended, across runners: the queue (pending, with position and reason) and what runs now; oldest first. A project key sees its project's, the admin token every project's",
    params(ActiveRunsQuery),
    responses(
        (status = 200, description = "Pending and running runs after `after`", body = RunsPage),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_active_runs(
    State(s): State<AppState>,
    Query(q): Query<ActiveRunsQuery>,
) -> ApiResult<Json<RunsPage>> {
    let limit = parse_limit(q.limit.as_deref(), RUNS_DEFAULT_LIMIT, RUNS_MAX_LIMIT)?;
    let after_id = cursor(q.after)?;
    let status = match q.status.as_deref() {
        None => String::new(),
        Some(s @ ("pending" | "running")) => s.to_owned(),
        Some(_) => {
            return Err(berth_core::validate::ValidationErrors::single(
                "status",
                "must be pending or running (only those runs are active)",
            )
            .into())
        }
    };
    let region = q.region.unwrap_or_default();
    if region.len() > 64 {
        return Err(berth_core::validate::ValidationErrors::single(
            "region",
            "must be at most 64 characters",
        )
        .into());
    }
    let list = s
        .control()
        .list_active_runs(pb::ListActiveRunsRequest {
            status,
            region,
            limit,
            after_id,
        })
        .await?
        .into_inner();
    page(list)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ActiveRunsQuery {
    /// `pending` or `running`; both when absent.
    #[param(pattern = "^(pending|running)$")]
    status: Option<String>,
    /// Only this region's runs.
    #[param(max_length = 64)]
    region: Option<String>,
    /// Only runs created after this run (the previous page's `next_after`).
    after: Option<String>,
    /// 1 to 1,000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs after this run in the listing's order (the previous page's `next_after`).
    after: Option<String>,
    /// `asc` (oldest first, the default) or `desc` (newest first).
    #[param(pattern = "^(asc|desc)$")]
    order: Option<String>,
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
        run: views::run(&run)?,
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
        run: views::run(&run)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch body rejects unknown fields, its items' too, naming them (`runs[i].field`).
    #[test]
    fn a_batch_rejects_unknown_fields_naming_them() {
        let unknown = |body: &str| match crate::body::parse::<BatchInput>(body.as_bytes()) {
            Err(ApiError::Malformed { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(unknown(r#"{"items": []}"#).as_deref(), Some("items"));
        assert_eq!(
            unknown(r#"{"runs": [{"x": 1}]}"#).as_deref(),
            Some("runs[0].x")
        );
    }
}
