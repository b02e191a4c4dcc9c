//! Runners: create, list, get, update (compare-and-set), delete, warm up.

use super::catalog::catalog;
use super::{check_id, ApiResult};
use crate::body::{JsonBody, Path};
use crate::error::ErrorBody;
use crate::views::{self, RunnerView};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use berth_core::validate::RunnerInput;
use berth_core::RunnerSpec;
use berth_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"runner": …}`
#[derive(Debug, Serialize, ToSchema)]
pub struct RunnerResponse {
    pub runner: RunnerView,
}

/// `{"runners": […]}`
#[derive(Debug, Serialize, ToSchema)]
pub struct RunnersResponse {
    pub runners: Vec<RunnerView>,
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
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
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
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
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

/// What a warmup keeps ready besides the image.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmupInput {
    /// Ready sandboxes the warmed node keeps for the runner (0 to 16, default 0): containers
    /// created ahead for a run with no overrides, each used by one run and replaced. Each holds
    /// the runner's memory on that node while the warmup stands.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 16)]
    pub sandboxes: u32,
}

/// Starts a warmup and answers at once; the runner's `warmup_status` tells how it goes.
#[utoipa::path(
    post,
    path = "/v1/runners/{id}/warmup",
    tag = "runners",
    summary = "Pull a runner's image onto a node ahead of its runs",
    params(("id" = String, Path, description = "The runner's id")),
    request_body(content = Option<WarmupInput>, description = "Optional; no body is `{}`"),
    responses(
        (status = 202, description = "Started; `warmup_status` tells how it goes", body = RunnerResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
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
    JsonBody(input): JsonBody<WarmupInput, true>,
) -> ApiResult<impl IntoResponse> {
    check_id("runner_id", &id)?;
    let runner = s
        .control()
        .warmup_runner(pb::WarmupRunnerRequest {
            id,
            sandboxes: input.sandboxes,
        })
        .await?
        .into_inner();
    Ok((
        StatusCode::ACCEPTED,
        Json(RunnerResponse {
            runner: views::runner(&runner),
        }),
    ))
}
