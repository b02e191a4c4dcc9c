//! Billed usage of the runs that ended in a period, grouped.

use super::ApiResult;
use crate::body::Query;
use crate::error::{ApiError, ErrorBody};
use crate::views;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use berth_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// A date (`YYYY-MM-DD`, midnight UTC) or RFC 3339 timestamp; default `to` minus 30 days.
    from: Option<String>,
    /// A date or RFC 3339 timestamp; default now.
    to: Option<String>,
    /// `runner` (default), `instance_type` or `day`.
    group_by: Option<String>,
}

/// `2026-11-01` (midnight UTC) or an RFC 3339 timestamp, as unix millis.
fn parse_instant(field: &str, v: &str) -> ApiResult<i64> {
    use time::format_description::well_known::Rfc3339;
    let invalid = || {
        ApiError::Invalid(berth_core::validate::ValidationErrors::single(
            field,
            "must be a date (YYYY-MM-DD) or an RFC 3339 timestamp",
        ))
    };
    let at = match time::OffsetDateTime::parse(v, &Rfc3339) {
        Ok(t) => t,
        Err(_) => {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(v, &format)
                .map_err(|_| invalid())?
                .midnight()
                .assume_utc()
        }
    };
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid())
}

/// Billed usage of the runs that ended in `[from, to)`; defaults: the last 30 days, by runner.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "usage",
    summary = "Billed usage of the runs that ended in `[from, to)`",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage by group and in total", body = UsageResponse),
        (status = 400, description = "Unknown query parameters", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Validation failed; each error names its field", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn usage(
    State(s): State<AppState>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageResponse>> {
    let now = berth_core::now_unix_millis();
    let to = match q.to.as_deref() {
        Some(v) => parse_instant("to", v)?,
        None => now,
    };
    let from = match q.from.as_deref() {
        Some(v) => parse_instant("from", v)?,
        None => to - 30 * 86_400_000,
    };
    if from >= to {
        return Err(
            berth_core::validate::ValidationErrors::single("from", "must be before to").into(),
        );
    }
    let group_by = q.group_by.unwrap_or_else(|| "runner".to_owned());
    let req = pb::GetUsageRequest {
        from_unix_millis: from,
        to_unix_millis: to,
        group_by: group_by.clone(),
    };
    let rows = s.control().get_usage(req).await?.into_inner().rows;
    let total_cost: u64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    let total_seconds: u64 = rows.iter().map(|r| r.billed_seconds).sum();
    let usage = rows
        .iter()
        .map(|r| UsageRow {
            key: r.key.clone(),
            runs: r.runs,
            billed_seconds: r.billed_seconds,
            cost_usd: views::nano_usd(r.cost_nano_usd),
        })
        .collect();
    Ok(Json(UsageResponse {
        from: views::timestamp_millis(from),
        to: views::timestamp_millis(to),
        group_by,
        usage,
        total: UsageTotal {
            billed_seconds: total_seconds,
            cost_usd: views::nano_usd(total_cost),
        },
    }))
}
