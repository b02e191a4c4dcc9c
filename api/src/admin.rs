//! Admin routes (the admin token only; a project key gets 403): API keys and registration tokens.
//! `POST /v1/admin/api_keys` `{"project", "name"}` answers the plaintext key once, in `key`;
//! `GET /v1/admin/api_keys[?project=]`; `DELETE /v1/admin/api_keys/{key_id}` revokes.
//! `POST /v1/admin/registration_tokens` `{"region", "name", "expires_in_seconds", "single_use"}`
//! answers the plaintext token once, in `token`; `GET` lists; `DELETE …/{token_id}` revokes.

use crate::auth::require_admin;
use crate::body::{JsonBody, Path, Query};
use crate::error::{ApiError, ErrorBody};
use crate::{views, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use berth_core::auth::{is_key_id, validate_key_name, validate_project};
use berth_core::validate::ValidationErrors;
use berth_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A key's or token's public id from the path: 404 naming `field` when it cannot be one.
fn public_id(field: &str, id: String) -> Result<String, ApiError> {
    if is_key_id(&id) {
        Ok(id)
    } else {
        Err(ApiError::NotFound {
            field: field.to_owned(),
            message: format!("no such {field}: {id}"),
        })
    }
}

/// `POST /v1/admin/api_keys` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyInput {
    /// The project the key belongs to: `[a-z0-9][a-z0-9-]{0,62}`.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    project: Option<String>,
    /// A label for people (who or what uses the key).
    name: Option<String>,
}

/// An API key as the admin sees it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub key_id: String,
    pub project: String,
    pub name: String,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
    /// When it was revoked; `null` while it is valid.
    #[schema(required = true, format = DateTime)]
    pub revoked_at: Option<String>,
}

pub fn api_key_view(k: &pb::ApiKey) -> ApiKeyView {
    ApiKeyView {
        key_id: k.key_id.clone(),
        project: k.project.clone(),
        name: k.name.clone(),
        created_at: views::timestamp_millis(k.created_at_unix_millis),
        revoked_at: k.revoked_at_unix_millis.and_then(views::timestamp_millis),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyResponse {
    pub api_key: ApiKeyView,
}

/// The answer to a create: the only time the plaintext key is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKeyResponse {
    pub api_key: ApiKeyView,
    /// The key itself (`berth_<key_id>_<secret>`); only its hash is stored.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeysResponse {
    pub api_keys: Vec<ApiKeyView>,
}

#[utoipa::path(
    post,
    path = "/v1/admin/api_keys",
    tag = "admin",
    summary = "Create an API key for a project (admin token only)",
    request_body = ApiKeyInput,
    responses(
        (status = 201, description = "Created; `key` is shown this once", body = CreatedApiKeyResponse),
        (status = 400, description = "Malformed JSON or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
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
        // The only time the key is shown: the scheduler keeps only its hash.
        Json(CreatedApiKeyResponse {
            api_key: api_key_view(&key),
            key: created.plaintext_key,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this project's keys.
    project: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/admin/api_keys",
    tag = "admin",
    summary = "List API keys, revoked ones included (admin token only)",
    params(ListQuery),
    responses(
        (status = 200, description = "The keys, without their secrets", body = ApiKeysResponse),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_api_keys(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ApiKeysResponse>, ApiError> {
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
    Ok(Json(ApiKeysResponse {
        api_keys: list.api_keys.iter().map(api_key_view).collect(),
    }))
}

/// Revokes a key (it stays listed, with `revoked_at`); its next request gets 401.
#[utoipa::path(
    delete,
    path = "/v1/admin/api_keys/{key_id}",
    tag = "admin",
    summary = "Revoke an API key (admin token only)",
    params(("key_id" = String, Path, description = "The key's public id")),
    responses(
        (status = 200, description = "Revoked (again: unchanged)", body = ApiKeyResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn revoke_api_key(
    State(s): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<ApiKeyResponse>, ApiError> {
    require_admin()?;
    let key_id = public_id("key_id", key_id)?;
    let key = s
        .control()
        .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
        .await?
        .into_inner();
    Ok(Json(ApiKeyResponse {
        api_key: api_key_view(&key),
    }))
}

/// `POST /v1/admin/registration_tokens` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistrationTokenInput {
    /// The region every node enrolled with the token registers in.
    region: Option<String>,
    /// A label for people (which pool or machine it is for).
    name: Option<String>,
    /// How long the token can enroll nodes: 1 to 2,592,000 seconds (30 days); default 3,600.
    #[schema(minimum = 1, maximum = 2592000)]
    expires_in_seconds: Option<u64>,
    /// Refused after it enrolled one node. Default `false`.
    single_use: Option<bool>,
}

/// A registration token as the admin sees it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationTokenView {
    pub token_id: String,
    pub region: String,
    pub name: String,
    #[schema(required = true, format = DateTime)]
    pub created_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub expires_at: Option<String>,
    pub single_use: bool,
    /// Nodes enrolled with it.
    pub uses: u64,
    /// When it was revoked; `null` while it is valid.
    #[schema(required = true, format = DateTime)]
    pub revoked_at: Option<String>,
}

pub fn registration_token_view(t: &pb::RegistrationToken) -> RegistrationTokenView {
    RegistrationTokenView {
        token_id: t.token_id.clone(),
        region: t.region.clone(),
        name: t.name.clone(),
        created_at: views::timestamp_millis(t.created_at_unix_millis),
        expires_at: views::timestamp_millis(t.expires_at_unix_millis),
        single_use: t.single_use,
        uses: t.uses,
        revoked_at: t.revoked_at_unix_millis.and_then(views::timestamp_millis),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationTokenResponse {
    pub registration_token: RegistrationTokenView,
}

/// The answer to a create: the only time the plaintext token is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedRegistrationTokenResponse {
    pub registration_token: RegistrationTokenView,
    /// The token itself (`berthreg_<token_id>_<secret>`); only its hash is stored. Give it to
    /// the node agent (`--registration-token-file`), which exchanges it for its own credential.
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationTokensResponse {
    pub registration_tokens: Vec<RegistrationTokenView>,
}

/// The longest a registration token may be valid (30 days), as the scheduler enforces.
const MAX_EXPIRES_IN_SECONDS: u64 = 30 * 24 * 3600;

#[utoipa::path(
    post,
    path = "/v1/admin/registration_tokens",
    tag = "admin",
    summary = "Create a registration token that enrolls nodes in a region (admin token only)",
    request_body = RegistrationTokenInput,
    responses(
        (status = 201, description = "Created; `token` is shown this once", body = CreatedRegistrationTokenResponse),
        (status = 400, description = "Malformed JSON or unknown fields", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body read timeout", body = ErrorBody),
        (status = 413, description = "The body is larger than the route allows", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn create_registration_token(
    State(s): State<AppState>,
    JsonBody(input): JsonBody<RegistrationTokenInput>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin()?;
    let mut errors = Vec::new();
    let region = input.region.unwrap_or_default();
    if region.is_empty() {
        errors.extend(ValidationErrors::single("region", "is required").0);
    }
    let name = input.name.unwrap_or_default();
    if let Err(e) = validate_key_name("name", &name) {
        errors.extend(e.0);
    }
    let expires_in_seconds = input.expires_in_seconds.unwrap_or(0);
    if input.expires_in_seconds.is_some()
        && !(1..=MAX_EXPIRES_IN_SECONDS).contains(&expires_in_seconds)
    {
        let message = format!("must be 1 to {MAX_EXPIRES_IN_SECONDS} seconds (30 days)");
        errors.extend(ValidationErrors::single("expires_in_seconds", message).0);
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors).into());
    }
    let created = s
        .control()
        .create_registration_token(pb::CreateRegistrationTokenRequest {
            region,
            name,
            expires_in_seconds,
            single_use: input.single_use.unwrap_or(false),
        })
        .await?
        .into_inner();
    let token = created.registration_token.unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(CreatedRegistrationTokenResponse {
            registration_token: registration_token_view(&token),
            token: created.plaintext_token,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/admin/registration_tokens",
    tag = "admin",
    summary = "List registration tokens, expired and revoked ones included (admin token only)",
    responses(
        (status = 200, description = "The tokens, without their secrets", body = RegistrationTokensResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_registration_tokens(
    State(s): State<AppState>,
) -> Result<Json<RegistrationTokensResponse>, ApiError> {
    require_admin()?;
    let list = s
        .control()
        .list_registration_tokens(pb::ListRegistrationTokensRequest {})
        .await?
        .into_inner();
    Ok(Json(RegistrationTokensResponse {
        registration_tokens: list
            .registration_tokens
            .iter()
            .map(registration_token_view)
            .collect(),
    }))
}

/// Revokes a registration token: no node enrolls with it any more; nodes it enrolled keep
/// their credentials (revoke those with `POST /v1/nodes/{id}/revoke`).
#[utoipa::path(
    delete,
    path = "/v1/admin/registration_tokens/{token_id}",
    tag = "admin",
    summary = "Revoke a registration token (admin token only)",
    params(("token_id" = String, Path, description = "The token's public id")),
    responses(
        (status = 200, description = "Revoked (again: unchanged)", body = RegistrationTokenResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key on an admin route", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn revoke_registration_token(
    State(s): State<AppState>,
    Path(token_id): Path<String>,
) -> Result<Json<RegistrationTokenResponse>, ApiError> {
    require_admin()?;
    let token_id = public_id("token_id", token_id)?;
    let token = s
        .control()
        .revoke_registration_token(pb::RevokeRegistrationTokenRequest { token_id })
        .await?
        .into_inner();
    Ok(Json(RegistrationTokenResponse {
        registration_token: registration_token_view(&token),
    }))
}
