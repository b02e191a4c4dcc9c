//! HTTP handlers: parse, validate (pure, in `berth_core::validate`), call the control service,
//! render. No state of their own.
//!
//! One module per resource; each holds its handlers (with their `#[utoipa::path]`), its query
//! and body types, and the JSON envelopes it answers (`{"runner": …}`). This module keeps the
//! parsing shared by all of them: path ids, page sizes, log ids. Nothing here reads the OpenAPI
//! document: [`crate::openapi`] is built from these handlers, not the other way round.

mod catalog;
mod health;
mod logs;
mod nodes;
mod registries;
mod runners;
mod runs;
mod schedules;
mod usage;

pub use catalog::*;
pub use health::*;
pub use logs::*;
pub use nodes::*;
pub use registries::*;
pub use runners::*;
pub use runs::*;
pub use schedules::*;
pub use usage::*;

use crate::body::Path;
use crate::error::ApiError;

type ApiResult<T> = Result<T, ApiError>;

const MAX_ID_LEN: usize = 64;

/// The two ids of a run's path, checked.
fn run_ids(Path((runner_id, run_id)): Path<(String, String)>) -> ApiResult<(String, String)> {
    check_id("runner_id", &runner_id)?;
    check_id("run_id", &run_id)?;
    Ok((runner_id, run_id))
}

fn check_id(field: &str, id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotFound {
            field: field.to_owned(),
            message: format!("no such {field}: {id}"),
        })
    }
}

/// A query number; present but empty (`?limit=`) is an invalid value, not an absent one.
fn parse_number<T: std::str::FromStr>(field: &str, v: Option<&str>) -> ApiResult<Option<T>> {
    v.map(|s| {
        s.parse::<T>().map_err(|_| {
            ApiError::Invalid(berth_core::validate::ValidationErrors::single(
                field,
                "must be a non-negative integer",
            ))
        })
    })
    .transpose()
}

/// A page size from the `limit` query parameter: 1 to `max`, `default` when absent.
fn parse_limit(v: Option<&str>, default: u32, max: u32) -> ApiResult<u32> {
    let limit = parse_number::<u32>("limit", v)?.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(berth_core::validate::ValidationErrors::single(
            "limit",
            format!("must be between 1 and {max}"),
        )
        .into());
    }
    Ok(limit)
}

/// A log id from a query or header: a non-negative integer up to `i64::MAX` (as documented).
fn parse_after_id(field: &str, v: Option<&str>) -> ApiResult<Option<u64>> {
    parse_number::<i64>(field, v)?
        .map(|n| {
            u64::try_from(n).map_err(|_| {
                ApiError::Invalid(berth_core::validate::ValidationErrors::single(
                    field,
                    "must be a non-negative integer",
                ))
            })
        })
        .transpose()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    summary = "Liveness: answers `ok`",
    security(()),
    responses(
        (status = 200, description = "The process is up", body = String, content_type = "text/plain"),
    )
)]
pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound {
        field: "path".to_owned(),
        message: "no such route".to_owned(),
    }
}
