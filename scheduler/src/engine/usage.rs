//! Metering: billed usage of ended runs, grouped by runner, instance type or UTC day.

use super::{decode, Scheduler};
use crate::error::SchedulerError;
use berth_core::store::Store;
use berth_core::{keys, Run};
use std::collections::BTreeMap;

impl<S: Store> Scheduler<S> {
    /// Billed usage of `project`'s runs that ended in `[from, to)` (unix millis), grouped by
    /// `group`.
    pub async fn usage(
        &self,
        project: &str,
        from: i64,
        to: i64,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, SchedulerError> {
        let mut rows: BTreeMap<String, UsageRow> = BTreeMap::new();
        for kv in self.store.list_prefix(keys::RUNS).await? {
            let run: Run = decode(&kv.key, &kv.value)?;
            if run.project != project {
                continue;
            }
            let (Some(completed), Some(seconds), Some(cost)) = (
                run.completed_at,
                run.duration_seconds(),
                run.cost_nano_usd(),
            ) else {
                continue;
            };
            if completed < from || completed >= to {
                continue;
            }
            let key = match group {
                UsageGroup::Runner => run.runner_id.clone(),
                UsageGroup::InstanceType => run.instance_type.clone(),
                UsageGroup::Day => utc_day(completed),
            };
            let row = rows.entry(key.clone()).or_insert_with(|| UsageRow {
                key,
                ..UsageRow::default()
            });
            row.runs += 1;
            row.billed_seconds += seconds;
            row.cost_nano_usd += cost;
        }
        Ok(rows.into_values().collect())
    }
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Runner,
    InstanceType,
    Day,
}

impl UsageGroup {
    pub fn parse(s: &str) -> Option<UsageGroup> {
        match s {
            "runner" => Some(UsageGroup::Runner),
            "instance_type" => Some(UsageGroup::InstanceType),
            "day" => Some(UsageGroup::Day),
            _ => None,
        }
    }
}

/// One group of billed usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub key: String,
    pub runs: u64,
    pub billed_seconds: u64,
    pub cost_nano_usd: u64,
}

/// `YYYY-MM-DD` (UTC) of a unix-millis instant. Instants beyond the calendar `time` supports
/// (years ±9999) clamp to its first or last day.
pub(super) fn utc_day(millis: i64) -> String {
    const DAY: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]");
    let date = time::OffsetDateTime::from_unix_timestamp(millis.div_euclid(1000)).map_or_else(
        |_| {
            if millis < 0 {
                time::Date::MIN
            } else {
                time::Date::MAX
            }
        },
        |t| t.date(),
    );
    date.format(DAY).unwrap_or_default()
}
