//! Private container registries: store credentials, list, get, delete.

use super::{check_id, ApiResult};
use crate::body::{JsonBody, Path};
use crate::error::ErrorBody;
use crate::views::{self, RegistryView};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use berth_core::validate::RegistryInput;
use berth_proto::v1 as pb;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistryResponse {
    pub container_registry: RegistryView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistriesResponse {
    pub container_registries: Vec<RegistryView>,
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
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
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
