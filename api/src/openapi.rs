//! The OpenAPI 3 document, served at `GET /v1/openapi.json`. It is generated (utoipa) from the
//! types the handlers parse and render: the request bodies of `berth_core::validate`, the
//! response structs of [`crate::views`] and [`crate::error::ErrorBody`], and the
//! `#[utoipa::path]` annotation on every handler. A test checks it against the router's route
//! table ([`crate::routes`]) both ways.

use crate::error::ErrorBody;
use crate::views::{LogView, NodeView, RegistryView, RunView, RunnerView};
use axum::Json;
use berth_core::validate::{FieldError, RegistryInput, RunInput, RunnerInput};
use berth_core::{EnvVar, InstanceType};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

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

/// A page of a run's output lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogsPage {
    pub logs: Vec<LogView>,
    pub has_more: bool,
    /// Pass as `after_id` to get the next page.
    pub next_after_id: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeResponse {
    pub node: NodeView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodesResponse {
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistryResponse {
    pub container_registry: RegistryView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistriesResponse {
    pub container_registries: Vec<RegistryView>,
}

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

/// One group of `GET /v1/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRow {
    /// The runner id, instance type slug or day (`YYYY-MM-DD`), by `group_by`.
    pub key: String,
    pub runs: u64,
    pub billed_seconds: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageTotal {
    pub billed_seconds: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    #[schema(required = true, format = DateTime)]
    pub from: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub to: Option<String>,
    pub group_by: String,
    pub usage: Vec<UsageRow>,
    pub total: UsageTotal,
}

/// Adds the bearer scheme every `/v1` route but this document requires.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The API token (`berth-api --token`)"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Berth",
        description = "Berth's public REST API: runners, runs, their logs (paged and as Server-Sent Events), nodes, private registries, usage. Every error is `{\"code\", \"errors\": [{\"field\", \"message\"}]}` naming the field.",
        license(name = "Apache-2.0"),
    ),
    security(("bearer" = [])),
    modifiers(&BearerAuth),
    paths(
        crate::handlers::healthz,
        crate::handlers::openapi_json,
        crate::handlers::list_runners,
        crate::handlers::create_runner,
        crate::handlers::get_runner,
        crate::handlers::update_runner,
        crate::handlers::delete_runner,
        crate::handlers::list_runs,
        crate::handlers::create_run,
        crate::handlers::create_runs,
        crate::handlers::get_run,
        crate::handlers::stop_run,
        crate::handlers::list_logs,
        crate::handlers::stream_logs,
        crate::handlers::warmup_runner,
        crate::handlers::list_registries,
        crate::handlers::create_registry,
        crate::handlers::get_registry,
        crate::handlers::delete_registry,
        crate::handlers::usage,
        crate::handlers::list_nodes,
        crate::handlers::drain_node,
        crate::handlers::resume_node,
        crate::handlers::list_instance_types,
        crate::handlers::list_regions,
    ),
    components(schemas(
        ErrorBody, FieldError, RunnerInput, RunInput, crate::handlers::BatchInput, RegistryInput, EnvVar,
        InstanceType,
    ))
)]
pub struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

pub fn json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}
