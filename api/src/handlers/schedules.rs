//! A runner's schedules: create, list, get, update (pause/resume included), delete.

use super::{check_id, ApiResult};
use crate::body::{JsonBody, Path};
use crate::error::ErrorBody;
use crate::views::{self, ScheduleView};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use berth_core::convert::schedule_input_to_pb;
use berth_core::schedule::ScheduleInput;
use berth_proto::v1 as pb;
use serde::Serialize;
use utoipa::ToSchema;

/// `{"schedule": …}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleResponse {
    pub schedule: ScheduleView,
}

/// `{"schedules": […]}`
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulesResponse {
    pub schedules: Vec<ScheduleView>,
}

fn ids(Path((runner_id, id)): Path<(String, String)>) -> ApiResult<(String, String)> {
    check_id("runner_id", &runner_id)?;
    check_id("schedule_id", &id)?;
    Ok((runner_id, id))
}

#[utoipa::path(
    post,
    path = "/v1/runners/{id}/schedules",
    tag = "schedules",
    summary = "Create a schedule: the runner fired by a cron expression in a time zone",
    params(("id" = String, Path, description = "The runner's id")),
    request_body = ScheduleInput,
    responses(
        (status = 201, description = "Created", body = ScheduleResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_schedule(
    State(s): State<AppState>,
    Path(runner_id): Path<String>,
    JsonBody(input): JsonBody<ScheduleInput>,
) -> ApiResult<impl IntoResponse> {
    check_id("runner_id", &runner_id)?;
    berth_core::schedule::validate_input(&input)?;
    let schedule = s
        .control()
        .create_schedule(pb::CreateScheduleRequest {
            runner_id,
            input: Some(schedule_input_to_pb(&input)),
        })
        .await?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        Json(ScheduleResponse {
            schedule: views::schedule(&schedule),
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/schedules",
    tag = "schedules",
    summary = "List a runner's schedules",
    params(("id" = String, Path, description = "The runner's id")),
    responses(
        (status = 200, description = "Its schedules", body = SchedulesResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_schedules(
    State(s): State<AppState>,
    Path(runner_id): Path<String>,
) -> ApiResult<Json<SchedulesResponse>> {
    check_id("runner_id", &runner_id)?;
    let list = s
        .control()
        .list_schedules(pb::ListSchedulesRequest { runner_id })
        .await?
        .into_inner();
    Ok(Json(SchedulesResponse {
        schedules: list.schedules.iter().map(views::schedule).collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/runners/{id}/schedules/{schedule_id}",
    tag = "schedules",
    summary = "Get a schedule",
    params(
        ("id" = String, Path, description = "The runner's id"),
        ("schedule_id" = String, Path, description = "The schedule's id"),
    ),
    responses(
        (status = 200, description = "The schedule", body = ScheduleResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or schedule", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn get_schedule(
    State(s): State<AppState>,
    path: Path<(String, String)>,
) -> ApiResult<Json<ScheduleResponse>> {
    let (runner_id, id) = ids(path)?;
    let schedule = s
        .control()
        .get_schedule(pb::ScheduleRequest { runner_id, id })
        .await?
        .into_inner();
    Ok(Json(ScheduleResponse {
        schedule: views::schedule(&schedule),
    }))
}

/// Present fields replace the schedule's; `{"paused": true}` pauses it, `{"paused": false}`
/// resumes it from the next fire time on.
#[utoipa::path(
    patch,
    path = "/v1/runners/{id}/schedules/{schedule_id}",
    tag = "schedules",
    summary = "Update, pause or resume a schedule",
    params(
        ("id" = String, Path, description = "The runner's id"),
        ("schedule_id" = String, Path, description = "The schedule's id"),
    ),
    request_body = ScheduleInput,
    responses(
        (status = 200, description = "The updated schedule", body = ScheduleResponse),
        (status = 400, description = "Malformed request: not JSON, wrong types or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or schedule", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn update_schedule(
    State(s): State<AppState>,
    path: Path<(String, String)>,
    JsonBody(input): JsonBody<ScheduleInput>,
) -> ApiResult<Json<ScheduleResponse>> {
    let (runner_id, id) = ids(path)?;
    berth_core::schedule::validate_patch(&input)?;
    let schedule = s
        .control()
        .update_schedule(pb::UpdateScheduleRequest {
            runner_id,
            id,
            input: Some(schedule_input_to_pb(&input)),
        })
        .await?
        .into_inner();
    Ok(Json(ScheduleResponse {
        schedule: views::schedule(&schedule),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/runners/{id}/schedules/{schedule_id}",
    tag = "schedules",
    summary = "Delete a schedule (its runs stay)",
    params(
        ("id" = String, Path, description = "The runner's id"),
        ("schedule_id" = String, Path, description = "The schedule's id"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such runner or schedule", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn delete_schedule(
    State(s): State<AppState>,
    path: Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (runner_id, id) = ids(path)?;
    s.control()
        .delete_schedule(pb::ScheduleRequest { runner_id, id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
