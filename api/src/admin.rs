//! Admin routes (the admin token only; a project key gets 403): API keys.
//! `POST /v1/admin/api_keys` `{"project", "name"}` answers the plaintext key once, in `key`;
//! `GET /v1/admin/api_keys[?project=]`; `DELETE /v1/admin/api_keys/{key_id}` revokes.

use crate::auth::require_admin;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::{views, AppState};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use berth_core::auth::{is_key_id, validate_key_name, validate_project};
use berth_core::validate::ValidationErrors;
use berth_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{json, Value};

/// `POST /v1/admin/api_keys` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyInput {
    project: Option<String>,
    name: Option<String>,
}

pub fn api_key_view(k: &pb::ApiKey) -> Value {
    json!({
        "key_id": k.key_id,
        "project": k.project,
        "name": k.name,
        "created_at": views::timestamp_millis(k.created_at_unix_millis),
        "revoked_at": k.revoked_at_unix_millis.map_or(Value::Null, views::timestamp_millis),
    })
}

pub async fn create_api_key(
    State(s): State<AppState>,
    JsonBody(input): JsonBody<ApiKeyInput>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin()?;
    let project = input
        .project
        .ok_or_else(|| ValidationErrors::single("project", "is required"))?;
    validate_project("project", &project)?;
    let name = input.name.unwrap_or_default();
    validate_key_name("name", &name)?;
    let created = s
        .control()
        .create_api_key(pb::CreateApiKeyRequest { project, name })
        .await?
        .into_inner();
    let key = created.api_key.unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "api_key": api_key_view(&key),
            // The only time the key is shown: the scheduler keeps only its hash.
            "key": created.plaintext_key,
        })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    project: Option<String>,
}

pub async fn list_api_keys(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    require_admin()?;
    let project = q.project.unwrap_or_default();
    if !project.is_empty() {
        validate_project("project", &project)?;
    }
    let list = s
        .control()
        .list_api_keys(pb::ListApiKeysRequest { project })
        .await?
        .into_inner();
    let keys: Vec<Value> = list.api_keys.iter().map(api_key_view).collect();
    Ok(Json(json!({ "api_keys": keys })))
}

/// Revokes a key (it stays listed, with `revoked_at`); its next request gets 401.
pub async fn revoke_api_key(
    State(s): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin()?;
    if !is_key_id(&key_id) {
        return Err(ApiError::NotFound {
            field: "key_id".to_owned(),
            message: format!("no such key_id: {key_id}"),
        });
    }
    let key = s
        .control()
        .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
        .await?
        .into_inner();
    Ok(Json(json!({ "api_key": api_key_view(&key) })))
}
