//! The scheduler's catalog: the regions and instance types runners may name.

use super::ApiResult;
use crate::error::ErrorBody;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use berth_core::{Catalog, InstanceType};
use berth_proto::v1 as pb;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceTypesResponse {
    pub instance_types: Vec<InstanceType>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Region {
    pub slug: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegionsResponse {
    pub regions: Vec<Region>,
}

/// The scheduler's catalog: the regions and instance types runners may name.
pub(super) async fn catalog(s: &AppState) -> ApiResult<Catalog> {
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
