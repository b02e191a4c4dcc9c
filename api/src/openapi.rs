//! The OpenAPI 3 document, served at `GET /v1/openapi.json` (by [`openapi_json`], here, so
//! that the handlers never depend on the document built from them). It is generated (utoipa)
//! from the types the handlers parse and render: the request bodies of `berth_core::validate`,
//! the response envelopes of [`crate::handlers`] and views of [`crate::views`],
//! [`crate::error::ErrorBody`], and the `#[utoipa::path]` annotation on every handler. A test in
//! [`crate::routes`] checks it against the route table both ways.

use crate::error::ErrorBody;
use crate::views::{LogView, RunStateView, StreamErrorView};
use axum::Json;
use berth_core::validate::{FieldError, RegistryInput, RunInput, RunnerInput};
use berth_core::{EnvVar, InstanceType};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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
        crate::handlers::readyz,
        openapi_json,
        crate::handlers::list_runners,
        crate::handlers::create_runner,
        crate::handlers::get_runner,
        crate::handlers::update_runner,
        crate::handlers::delete_runner,
        crate::handlers::list_runs,
        crate::handlers::list_active_runs,
        crate::handlers::create_run,
        crate::handlers::create_runs,
        crate::handlers::get_run,
        crate::handlers::stop_run,
        crate::handlers::list_logs,
        crate::handlers::stream_logs,
        crate::handlers::warmup_runner,
        crate::handlers::list_schedules,
        crate::handlers::create_schedule,
        crate::handlers::get_schedule,
        crate::handlers::update_schedule,
        crate::handlers::delete_schedule,
        crate::handlers::list_registries,
        crate::handlers::create_registry,
        crate::handlers::get_registry,
        crate::handlers::delete_registry,
        crate::handlers::usage,
        crate::handlers::list_nodes,
        crate::handlers::drain_node,
        crate::handlers::resume_node,
        crate::handlers::revoke_node,
        crate::handlers::remove_node,
        crate::handlers::list_instance_types,
        crate::handlers::list_regions,
        crate::admin::create_api_key,
        crate::admin::list_api_keys,
        crate::admin::revoke_api_key,
        crate::admin::create_registration_token,
        crate::admin::list_registration_tokens,
        crate::admin::revoke_registration_token,
    ),
    components(schemas(
        ErrorBody, FieldError, RunnerInput, RunInput, crate::handlers::BatchInput, RegistryInput, EnvVar,
        InstanceType, LogView, RunStateView, StreamErrorView, crate::handlers::WarmupInput,
        crate::handlers::ReadinessView, crate::handlers::CheckView,
    ))
)]
pub struct ApiDoc;

const LOG_STREAM: &str = "/v1/runners/{id}/runs/{run_id}/logs/stream";

/// The document, built once. The log stream's event schema is added here (one `oneOf` branch
/// per event type, each event's `data` a JSON document with its own schema), which utoipa's
/// annotations cannot express.
pub fn document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        let pointer = format!(
            "/paths/{}/get/responses/200/content/text~1event-stream",
            LOG_STREAM.replace('/', "~1")
        );
        if let Some(content) = doc.pointer_mut(&pointer) {
            content["schema"] = log_stream_event_schema();
        }
        doc
    })
}

/// One Server-Sent Event of the log stream, as `{event, id, data}`.
fn log_stream_event_schema() -> serde_json::Value {
    let event = |name: &str, id_required: bool, data: &str| {
        let mut required = vec!["event", "data"];
        if id_required {
            required.push("id");
        }
        serde_json::json!({
            "type": "object",
            "required": required,
            "properties": {
                "event": { "const": name },
                "id": { "type": "string" },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": { "$ref": format!("#/components/schemas/{data}") },
                },
            },
        })
    };
    serde_json::json!({
        "oneOf": [
            event("log", true, "LogView"),
            event("state", false, "RunStateView"),
            event("error", false, "StreamErrorView"),
        ]
    })
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
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The wire's words are enums in the document, listing exactly the values the code has.
    #[test]
    fn statuses_and_error_codes_are_enums_of_the_domains_values() {
        use berth_core::codes::{ErrorCode, NodeState};
        use berth_core::RunStatus;
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let values = |schema: &str| -> Vec<String> {
            schemas[schema]["enum"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            values("RunStatus"),
            names(&RunStatus::ALL.map(RunStatus::as_str))
        );
        assert_eq!(
            values("ErrorCode"),
            names(&ErrorCode::ALL.map(ErrorCode::as_str))
        );
        assert_eq!(
            values("NodeState"),
            names(&NodeState::ALL.map(NodeState::as_str))
        );
        assert_eq!(
            values("ApiErrorCode"),
            names(&[
                "malformed_request",
                "unauthorized",
                "forbidden",
                "not_found",
                "method_not_allowed",
                "request_timeout",
                "conflict",
                "payload_too_large",
                "validation_failed",
                "too_many_requests",
                "internal",
                "unavailable"
            ])
        );
        let reference = |schema: &str, field: &str| {
            serde_json::to_string(&schemas[schema]["properties"][field]).unwrap_or_default()
        };
        assert!(reference("RunView", "status").contains("#/components/schemas/RunStatus"));
        assert!(reference("RunView", "error_code").contains("#/components/schemas/ErrorCode"));
        assert!(reference("RunStateView", "status").contains("#/components/schemas/RunStatus"));
        assert!(reference("NodeView", "status").contains("#/components/schemas/NodeState"));
        assert!(reference("LogView", "stream").contains("#/components/schemas/LogStream"));
        assert!(
            reference("RunnerView", "warmup_status").contains("#/components/schemas/WarmupStatus")
        );
        assert!(reference("ErrorBody", "code").contains("#/components/schemas/ApiErrorCode"));
    }

    #[test]
    fn the_log_stream_documents_each_event() {
        let doc = document();
        let op = &doc["paths"][LOG_STREAM]["get"]["responses"]["200"]["content"];
        let branches = op["text/event-stream"]["schema"]["oneOf"].as_array();
        assert_eq!(branches.map(Vec::len), Some(3), "{op}");
        for schema in ["LogView", "RunStateView", "StreamErrorView"] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
    }

    /// The limits the document states are the ones `berth_core::validate` enforces.
    #[test]
    fn documented_limits_are_the_enforced_ones() {
        use berth_core::validate as v;
        let doc = document();
        let prop = |schema: &str, field: &str, key: &str| {
            doc["components"]["schemas"][schema]["properties"][field][key].as_u64()
        };
        let n = |x: usize| u64::try_from(x).ok();
        let cases = [
            (prop("RunnerInput", "name", "minLength"), n(v::NAME_MIN)),
            (prop("RunnerInput", "name", "maxLength"), n(v::NAME_MAX)),
            (
                prop("RunnerInput", "run_command", "maxLength"),
                n(v::RUN_COMMAND_MAX),
            ),
            (
                prop("RunnerInput", "argv", "maxItems"),
                n(v::ARGV_MAX_ELEMENTS),
            ),
            (
                prop("RunnerInput", "entrypoint", "maxLength"),
                n(v::ENTRYPOINT_MAX),
            ),
            (
                prop("RunnerInput", "env_variables", "maxItems"),
                n(v::ENV_MAX_VARIABLES),
            ),
            (
                prop("RunnerInput", "timeout_seconds", "minimum"),
                u64::try_from(v::TIMEOUT_MIN).ok(),
            ),
            (
                prop("RunnerInput", "timeout_seconds", "maximum"),
                u64::try_from(v::TIMEOUT_MAX).ok(),
            ),
            (
                prop("RunnerInput", "max_concurrent_runs", "minimum"),
                u64::try_from(v::MAX_CONCURRENT_RUNS_MIN).ok(),
            ),
            (
                prop("RunnerInput", "max_concurrent_runs", "maximum"),
                u64::try_from(v::MAX_CONCURRENT_RUNS_MAX).ok(),
            ),
            (
                prop("RetryPolicy", "max_attempts", "minimum"),
                u64::from(berth_core::retry::MAX_ATTEMPTS_MIN).into(),
            ),
            (
                prop("RetryPolicy", "max_attempts", "maximum"),
                u64::from(berth_core::retry::MAX_ATTEMPTS_MAX).into(),
            ),
            (
                prop("RetryPolicy", "backoff_seconds", "maximum"),
                u64::from(berth_core::retry::BACKOFF_MAX_SECONDS).into(),
            ),
            (
                prop("RetryPolicy", "backoff_multiplier", "maximum"),
                u64::from(berth_core::retry::BACKOFF_MULTIPLIER_MAX).into(),
            ),
            (
                prop("RetryPolicy", "exit_codes", "maxItems"),
                n(berth_core::retry::EXIT_CODES_MAX),
            ),
            (
                prop("RunInput", "command", "maxLength"),
                n(v::RUN_OVERRIDE_COMMAND_MAX),
            ),
            (
                prop("RunInput", "argv", "maxItems"),
                n(v::ARGV_MAX_ELEMENTS),
            ),
            (
                prop("RunInput", "entrypoint", "maxLength"),
                n(v::ENTRYPOINT_MAX),
            ),
            (
                prop("RunInput", "env_variables", "maxItems"),
                n(v::ENV_MAX_VARIABLES),
            ),
            (prop("RegistryInput", "name", "minLength"), n(v::NAME_MIN)),
            (prop("RegistryInput", "name", "maxLength"), n(v::NAME_MAX)),
            (
                prop("RegistryInput", "username", "maxLength"),
                n(v::REGISTRY_USERNAME_MAX),
            ),
            (
                prop("BatchInput", "runs", "maxItems"),
                n(crate::handlers::BATCH_MAX_RUNS),
            ),
        ];
        for (i, (documented, enforced)) in cases.iter().enumerate() {
            assert!(
                documented.is_some() && documented == enforced,
                "case {i}: {documented:?} vs {enforced:?}"
            );
        }
        let key = doc["paths"]["/v1/runners/{id}/runs"]["post"]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "Idempotency-Key")
            .map(|p| p["schema"]["maxLength"].as_u64());
        assert_eq!(key, Some(n(crate::handlers::IDEMPOTENCY_KEY_MAX)));
        // The env key pattern is the one `is_env_key` implements.
        let pattern = &doc["components"]["schemas"]["EnvVar"]["properties"]["env_key"]["pattern"];
        assert_eq!(pattern, "^[A-Za-z_][A-Za-z0-9_]*$");
    }

    #[test]
    fn bodies_that_reject_unknown_fields_say_so() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        for name in [
            "RunnerInput",
            "RunInput",
            "BatchInput",
            "RegistryInput",
            "EnvVar",
        ] {
            assert_eq!(
                schemas[name]["additionalProperties"],
                serde_json::Value::Bool(false),
                "{name}"
            );
        }
    }

    #[test]
    fn every_key_a_view_renders_is_in_its_schema_and_required() {
        use berth_proto::v1 as pb;
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let run = pb::Run {
            status: pb::RunStatus::Failed.into(),
            exit_code: Some(1),
            started_at_unix_millis: Some(1),
            completed_at_unix_millis: Some(2),
            ..Default::default()
        };
        let cases = [
            (
                "RunView",
                serde_json::to_value(crate::views::run(&run).expect("a known status")),
            ),
            (
                "RunnerView",
                serde_json::to_value(crate::views::runner(&pb::Runner::default())),
            ),
            (
                "NodeView",
                serde_json::to_value(
                    crate::views::node(&pb::Node {
                        status: pb::NodeState::Ready.into(),
                        ..Default::default()
                    })
                    .expect("a known state"),
                ),
            ),
        ];
        for (name, value) in cases {
            let value = value.unwrap_or_default();
            let rendered: BTreeSet<&String> = value
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            let properties: BTreeSet<&String> = schemas[name]["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            let required: BTreeSet<&str> = schemas[name]["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            assert!(!rendered.is_empty(), "{name}");
            assert_eq!(rendered, properties, "{name}");
            for key in rendered {
                assert!(
                    required.contains(key.as_str()),
                    "{name}.{key} is always rendered"
                );
            }
        }
    }
}
