//! Readiness (`/readyz`): whether this API replica can serve, that is whether a scheduler (the
//! leader: only it listens) answers. Liveness is `/healthz`.

use crate::AppState;
use axum::extract::State;
use axum::response::IntoResponse;
use berth_core::metrics::{readiness_response, Check, Readiness, CHECK_TIMEOUT};
use berth_proto::v1 as pb;
use serde::Serialize;
use utoipa::ToSchema;

/// `/readyz`'s body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessView {
    /// `ready` (every check passed) or `not_ready`.
    #[schema(pattern = "^(ready|not_ready)$")]
    pub status: String,
    pub checks: Vec<CheckView>,
}

/// One readiness check.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckView {
    /// What was checked (`scheduler`).
    pub name: String,
    pub ok: bool,
    /// What it found, or why it failed.
    pub detail: String,
}

/// This replica's checks: a scheduler answers a control call within [`CHECK_TIMEOUT`].
pub async fn readiness_checks(s: &AppState) -> Vec<Check> {
    let caller = crate::auth::Caller {
        project: berth_core::auth::DEFAULT_PROJECT.to_owned(),
        admin: false,
        key: "readiness".to_owned(),
    };
    let call = crate::auth::as_caller(caller, async {
        s.control().get_catalog(pb::GetCatalogRequest {}).await
    });
    let scheduler = match tokio::time::timeout(CHECK_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok("a scheduler answers".to_owned()),
        Ok(Err(status)) => Err(format!("the scheduler: {}", status.message())),
        Err(_) => Err(format!(
            "no scheduler answered within {} s",
            CHECK_TIMEOUT.as_secs()
        )),
    };
    vec![Check::new("scheduler", scheduler)]
}

/// The same checks for the metrics listener's `/readyz`.
pub fn readiness(s: AppState) -> Readiness {
    std::sync::Arc::new(move || {
        let s = s.clone();
        Box::pin(async move { readiness_checks(&s).await })
    })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "meta",
    summary = "Readiness: whether this replica can serve (a scheduler answers)",
    security(()),
    responses(
        (status = 200, description = "Ready", body = ReadinessView),
        (status = 503, description = "Not ready; the checks say why", body = ReadinessView),
    )
)]
pub async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    readiness_response(&readiness_checks(&s).await)
}
