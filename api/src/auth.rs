//! Who is calling. The [`authenticate`] middleware reads `Authorization: Bearer <key>` on every
//! `/v1` request and decides the caller before any handler runs:
//! - the admin token (`--token`, compared in constant time) → admin, acting in project
//!   `default`;
//! - an API key `berth_<key id>_<secret>` → its project, as the scheduler's
//!   `AuthenticateApiKey` says (asked on every request, no cache: a revoked key is refused on
//!   its next request);
//! - anything else, or no header → 401.
//!
//! The caller lives in a task-local for the rest of the request, and [`CallerInterceptor`] puts
//! it on every control call (`x-berth-project`, `x-berth-admin`), so handlers stay unaware of
//! it; a control call made outside an authenticated request carries no project and the
//! scheduler refuses it (fail closed).

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use berth_core::auth::{
    constant_time_eq, parse_key, ADMIN_METADATA, CLUSTER_TOKEN_METADATA, DEFAULT_PROJECT,
    PROJECT_METADATA,
};
use berth_proto::v1 as pb;
use tonic::metadata::MetadataValue;

/// The authenticated caller of the current request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub project: String,
    /// Holds the admin token: may manage nodes and API keys.
    pub admin: bool,
    /// Which credential: the API key's id, or [`ADMIN_KEY`]. Per-key limits count by it.
    pub key: String,
}

/// [`Caller::key`] of the admin token.
pub const ADMIN_KEY: &str = "admin";

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the request being handled, if it was authenticated.
pub fn current() -> Option<Caller> {
    CALLER.try_with(Caller::clone).ok()
}

/// Runs `f` as `caller`: control calls made in it carry the caller, as in the request that
/// authenticated it. For work that outlives the handler (a log stream re-opening its watch).
pub async fn as_caller<F: std::future::Future>(caller: Caller, f: F) -> F::Output {
    CALLER.scope(caller, f).await
}

/// `Bearer <token>` → the token. The scheme is case-insensitive (RFC 9110 §11.1), so
/// `bearer` and `BEARER` are accepted too.
fn bearer(req: &Request) -> Option<&str> {
    bearer_token(
        req.headers()
            .get(axum::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?,
    )
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    Some(token.trim())
        .filter(|_| scheme.eq_ignore_ascii_case("bearer"))
        .filter(|t| !t.is_empty())
}

pub async fn authenticate(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer(&req).ok_or(ApiError::Unauthorized)?;
    let caller = if constant_time_eq(token.as_bytes(), s.admin_token.as_bytes()) {
        Caller {
            project: DEFAULT_PROJECT.to_owned(),
            admin: true,
            key: ADMIN_KEY.to_owned(),
        }
    } else if let Some(presented) = parse_key(token) {
        let answer = s
            .control
            .clone()
            .authenticate_api_key(pb::AuthenticateApiKeyRequest {
                key: token.to_owned(),
            })
            .await;
        match answer {
            Ok(key) => Caller {
                project: key.into_inner().project,
                admin: false,
                key: presented.key_id.to_owned(),
            },
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(ApiError::Unauthorized)
            }
            // The scheduler is down: 503, not a wrong key.
            Err(status) => return Err(status.into()),
        }
    } else {
        return Err(ApiError::Unauthorized);
    };
    Ok(CALLER.scope(caller, next.run(req)).await)
}

/// Refuses callers that do not hold the admin token (403).
pub fn require_admin() -> Result<Caller, ApiError> {
    match current() {
        Some(c) if c.admin => Ok(c),
        Some(_) => Err(ApiError::Forbidden(
            "this operation needs the admin token; API keys act only within their project"
                .to_owned(),
        )),
        None => Err(ApiError::Unauthorized),
    }
}

/// The scheduler's cluster token (`--cluster-token`), put on every call to it when set.
#[derive(Debug, Clone, Default)]
pub struct ClusterToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl ClusterToken {
    /// Fails for a token that cannot travel as gRPC metadata (not visible ASCII).
    pub fn new(
        token: Option<&str>,
    ) -> Result<ClusterToken, tonic::metadata::errors::InvalidMetadataValue> {
        token
            .map(MetadataValue::try_from)
            .transpose()
            .map(ClusterToken)
    }

    /// The token, and the trace the call is part of (when traces are exported).
    fn stamp(&self, req: &mut tonic::Request<()>) {
        berth_core::telemetry::inject(req.metadata_mut());
        if let Some(token) = &self.0 {
            req.metadata_mut()
                .insert(CLUSTER_TOKEN_METADATA, token.clone());
        }
    }
}

impl tonic::service::Interceptor for ClusterToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.stamp(&mut req);
        Ok(req)
    }
}

/// Puts the current caller (and the cluster token) on a control call.
#[derive(Debug, Clone, Default)]
pub struct CallerInterceptor {
    pub cluster: ClusterToken,
}

impl tonic::service::Interceptor for CallerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.cluster.stamp(&mut req);
        let caller = current().ok_or_else(|| {
            tonic::Status::unauthenticated("a control call outside an authenticated request")
        })?;
        let project = MetadataValue::try_from(caller.project.as_str())
            .map_err(|_| tonic::Status::unauthenticated("the caller's project is not ASCII"))?;
        req.metadata_mut().insert(PROJECT_METADATA, project);
        if caller.admin {
            req.metadata_mut()
                .insert(ADMIN_METADATA, MetadataValue::from_static("true"));
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[tokio::test]
    async fn the_interceptor_names_the_caller_and_fails_closed_without_one() {
        let outside = CallerInterceptor::default().call(tonic::Request::new(()));
        assert!(outside.is_err(), "no caller, no project");
        let key = Caller {
            project: "alpha".into(),
            admin: false,
            key: "k1".into(),
        };
        let req = CALLER
            .scope(key, async {
                CallerInterceptor::default().call(tonic::Request::new(()))
            })
            .await
            .expect("in scope");
        assert_eq!(
            req.metadata()
                .get(PROJECT_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("alpha")
        );
        assert!(req.metadata().get(ADMIN_METADATA).is_none());
        let admin = Caller {
            project: DEFAULT_PROJECT.into(),
            admin: true,
            key: ADMIN_KEY.into(),
        };
        let req = CALLER
            .scope(admin, async {
                CallerInterceptor::default().call(tonic::Request::new(()))
            })
            .await
            .expect("in scope");
        assert!(req.metadata().get(ADMIN_METADATA).is_some());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc "] {
            assert_eq!(bearer_token(header), Some("abc"), "{header}");
        }
        for header in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(bearer_token(header), None, "{header}");
        }
    }

    #[tokio::test]
    async fn only_the_admin_passes_require_admin() {
        assert!(matches!(require_admin(), Err(ApiError::Unauthorized)));
        let key = Caller {
            project: "alpha".into(),
            admin: false,
            key: "k1".into(),
        };
        let r = CALLER.scope(key, async { require_admin() }).await;
        assert!(matches!(r, Err(ApiError::Forbidden(_))));
    }
}
