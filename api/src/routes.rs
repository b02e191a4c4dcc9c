//! The route table: every (verb, path) the API serves, its handler, and whether it needs the
//! token. [`crate::router`] is built from it; the OpenAPI document is checked against it here.
//! It depends on the handlers and the document, and neither of them on it.

use crate::{admin, body, handlers, openapi, AppState};
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};

/// An HTTP method a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    Post,
    Patch,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    /// Lower case, as OpenAPI names operations.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

/// One entry of [`routes`].
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    /// Whether the bearer token is required.
    pub authenticated: bool,
    pub(crate) handler: MethodRouter<AppState>,
}

fn route<H, T>(verb: Verb, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Route {
        verb,
        path,
        authenticated: true,
        handler: axum::routing::on(verb.filter(), handler),
    }
}

fn public(r: Route) -> Route {
    Route {
        authenticated: false,
        ..r
    }
}

/// `r` with its own request body limit instead of [`crate::body::MAX_BODY_BYTES`].
fn body_limit(r: Route, bytes: usize) -> Route {
    Route {
        handler: r.handler.layer(axum::extract::DefaultBodyLimit::max(bytes)),
        ..r
    }
}

/// Every route of the API. [`crate::router`] is built from this table alone, and a test checks
/// it against the OpenAPI document ([`crate::openapi`]) both ways: a route without its
/// `#[utoipa::path]` (or a documented path that is not served) fails it.
pub fn routes() -> Vec<Route> {
    use handlers::*;
    use Verb::*;
    vec![
        public(route(Get, "/healthz", healthz)),
        public(route(Get, "/readyz", readyz)),
        public(route(Get, "/v1/openapi.json", openapi::openapi_json)),
        route(Get, "/v1/runners", list_runners),
        route(Post, "/v1/runners", create_runner),
        route(Get, "/v1/runners/{id}", get_runner),
        route(Patch, "/v1/runners/{id}", update_runner),
        route(Delete, "/v1/runners/{id}", delete_runner),
        route(Get, "/v1/runners/{id}/runs", list_runs),
        route(Get, "/v1/runs", list_active_runs),
        // Uploaded files make a run's body larger than the others.
        body_limit(
            route(Post, "/v1/runners/{id}/runs", create_run),
            body::MAX_RUN_BODY_BYTES,
        ),
        route(Post, "/v1/runners/{id}/runs/batch", create_runs),
        route(Get, "/v1/runners/{id}/runs/{run_id}", get_run),
        route(Post, "/v1/runners/{id}/runs/{run_id}/stop", stop_run),
        route(Get, "/v1/runners/{id}/runs/{run_id}/logs", list_logs),
        route(
            Get,
            "/v1/runners/{id}/runs/{run_id}/logs/stream",
            stream_logs,
        ),
        route(Post, "/v1/runners/{id}/warmup", warmup_runner),
        route(Get, "/v1/runners/{id}/schedules", list_schedules),
        route(Post, "/v1/runners/{id}/schedules", create_schedule),
        route(
            Get,
            "/v1/runners/{id}/schedules/{schedule_id}",
            get_schedule,
        ),
        route(
            Patch,
            "/v1/runners/{id}/schedules/{schedule_id}",
            update_schedule,
        ),
        route(
            Delete,
            "/v1/runners/{id}/schedules/{schedule_id}",
            delete_schedule,
        ),
        route(Get, "/v1/container_registries", list_registries),
        route(Post, "/v1/container_registries", create_registry),
        route(Get, "/v1/container_registries/{id}", get_registry),
        route(Delete, "/v1/container_registries/{id}", delete_registry),
        route(Get, "/v1/usage", usage),
        route(Get, "/v1/nodes", list_nodes),
        route(Post, "/v1/nodes/{id}/drain", drain_node),
        route(Post, "/v1/nodes/{id}/resume", resume_node),
        route(Post, "/v1/nodes/{id}/revoke", revoke_node),
        route(Delete, "/v1/nodes/{id}", remove_node),
        route(Get, "/v1/instance_types", list_instance_types),
        route(Get, "/v1/regions", list_regions),
        route(Get, "/v1/admin/api_keys", admin::list_api_keys),
        route(Post, "/v1/admin/api_keys", admin::create_api_key),
        route(Delete, "/v1/admin/api_keys/{key_id}", admin::revoke_api_key),
        route(
            Get,
            "/v1/admin/registration_tokens",
            admin::list_registration_tokens,
        ),
        route(
            Post,
            "/v1/admin/registration_tokens",
            admin::create_registration_token,
        ),
        route(
            Delete,
            "/v1/admin/registration_tokens/{token_id}",
            admin::revoke_registration_token,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openapi::document;
    use std::collections::BTreeSet;

    /// (method, path) of every operation in the document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = document();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                if [
                    "get", "put", "post", "delete", "patch", "head", "options", "trace",
                ]
                .contains(&method.as_str())
                {
                    ops.insert((method.clone(), path.clone()));
                }
            }
        }
        ops
    }

    #[test]
    fn every_route_is_documented_and_every_documented_operation_is_served() {
        let served: BTreeSet<(String, String)> = routes()
            .iter()
            .map(|r| (r.verb.as_str().to_owned(), r.path.to_owned()))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "documented but not routed: {unserved:?}"
        );
        assert_eq!(served.len(), routes().len(), "a route is listed twice");
    }

    #[test]
    fn the_document_says_which_routes_need_the_token() {
        let doc = document();
        assert_eq!(doc["security"], serde_json::json!([{ "bearer": [] }]));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        for r in routes() {
            let op = &doc["paths"][r.path][r.verb.as_str()];
            // An operation without its own `security` inherits the document's (the token).
            let open = op["security"] == serde_json::json!([{}]);
            assert_eq!(open, !r.authenticated, "{} {}", r.verb.as_str(), r.path);
        }
    }
}
