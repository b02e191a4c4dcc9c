//! Schedules (issue #15, item 2): a runner fired by a cron expression in a time zone.
//!
//! A schedule is stored at `schedules/<id>` and owned by the scheduler's leader, which fires it:
//! each fire creates an ordinary run (recorded with the schedule and its intended fire time) in
//! the same store transaction that moves the schedule's `next_fire_at` past that fire, so a fire
//! happens once even across a restart or a failover. This module holds the record, its API
//! input, the checks and the pure arithmetic of fire times ([`Schedule::fires`]).

use crate::validate::{Collector, RunInput, ValidationErrors};
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// A fire this late (after its time plus jitter) still fires; an older one was *missed* (the
/// control plane was down) and `catch_up` decides.
pub const MISFIRE_GRACE_MILLIS: i64 = 60_000;
/// The most jitter a schedule may ask for.
pub const JITTER_MAX_SECONDS: u32 = 3_600;
/// The longest cron expression and time zone name accepted.
pub const CRON_MAX: usize = 200;
/// Fire times looked at in one go (a schedule every second left alone for a day has 86,400
/// missed fires; only the last matters for `run_once`).
const FIRES_SCAN_MAX: usize = 10_000;

/// What a fire does while an earlier run of the schedule has not ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// Start another run beside it.
    #[default]
    Allow,
    /// Skip this fire.
    Forbid,
    /// Stop the earlier runs, then start the new one.
    Replace,
}

/// What happens to fires missed while the control plane was down (older than a minute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Drop them.
    #[default]
    Skip,
    /// Fire once, for the latest of them.
    RunOnce,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: String,
    pub runner_id: String,
    pub project: String,
    /// As given (5 fields, or 6 with seconds first).
    pub cron: String,
    pub timezone: String,
    /// Overrides each fire's run gets (no files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunInput>,
    pub overlap: OverlapPolicy,
    pub catch_up: CatchUp,
    pub jitter_seconds: u32,
    pub paused: bool,
    /// The next intended fire time (unix ms, before jitter); None when the expression has no
    /// future time.
    pub next_fire_at: Option<i64>,
    #[serde(default)]
    pub last_fire_at: Option<i64>,
    #[serde(default)]
    pub last_run_id: Option<String>,
    /// Fires that created a run, and fires that did not (overlap `forbid`, missed).
    #[serde(default)]
    pub fired: u64,
    #[serde(default)]
    pub skipped: u64,
    /// Why the last fire that created no run did not.
    #[serde(default)]
    pub last_skip_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `POST /v1/runners/{id}/schedules` and `PATCH …/schedules/{schedule_id}` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleInput {
    /// A cron expression: 5 fields (`minute hour day-of-month month day-of-week`) or 6 with
    /// seconds first; names (`MON-FRI`, `JAN`) and `@hourly`, `@daily`… accepted. Required on
    /// create.
    #[schema(max_length = 200)]
    pub cron: Option<String>,
    /// An IANA time zone (`Europe/Berlin`) the expression is read in; `UTC` when absent.
    #[schema(max_length = 200)]
    pub timezone: Option<String>,
    /// Overrides every fire's run gets, as `POST /v1/runners/{id}/runs` takes them (no `files`).
    pub run: Option<RunInput>,
    /// `allow` (default), `forbid` (skip a fire while a run of the schedule has not ended) or
    /// `replace` (stop those runs, then start).
    pub overlap: Option<OverlapPolicy>,
    /// Fires missed while the control plane was down: `skip` (default) or `run_once`.
    pub catch_up: Option<CatchUp>,
    /// Each fire happens up to this many seconds late (0 to 3,600; the same delay for a given
    /// fire on every scheduler), to spread schedules that share a time.
    #[schema(minimum = 0, maximum = 3600)]
    pub jitter_seconds: Option<i64>,
    /// A paused schedule does not fire; resuming it fires from the next time on.
    pub paused: Option<bool>,
}

/// A parsed expression and zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    schedule: cron::Schedule,
    tz: chrono_tz::Tz,
}

impl CronSpec {
    pub fn parse(expr: &str, timezone: &str) -> Result<CronSpec, ValidationErrors> {
        let mut c = Collector::default();
        let spec = check(&mut c, expr, timezone);
        c.finish(())?;
        spec.ok_or_else(|| ValidationErrors::single("cron", "cannot be parsed"))
    }

    /// The first fire time strictly after `after` (unix ms).
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let at = Utc
            .timestamp_millis_opt(after)
            .single()?
            .with_timezone(&self.tz);
        self.schedule
            .after(&at)
            .next()
            .map(|t| t.with_timezone(&Utc).timestamp_millis())
    }
}

fn check(c: &mut Collector, expr: &str, timezone: &str) -> Option<CronSpec> {
    let mut ok = true;
    let expr = expr.trim();
    if expr.is_empty() || expr.chars().count() > CRON_MAX {
        c.push("cron", format!("must be 1 to {CRON_MAX} characters"));
        ok = false;
    }
    let tz = check_zone(c, timezone);
    if !ok {
        return None;
    }
    // The crate reads seconds first: a classic 5-field expression fires at second 0.
    let full = if !expr.starts_with('@') && expr.split_whitespace().count() == 5 {
        format!("0 {expr}")
    } else {
        expr.to_owned()
    };
    let schedule = match cron::Schedule::from_str(&full) {
        Ok(s) => s,
        Err(e) => {
            c.push(
                "cron",
                format!("is not a cron expression (5 fields, or 6 with seconds first): {e}"),
            );
            return None;
        }
    };
    Some(CronSpec { schedule, tz: tz? })
}

fn check_zone(c: &mut Collector, timezone: &str) -> Option<chrono_tz::Tz> {
    let tz = if timezone.chars().count() > CRON_MAX {
        None
    } else {
        chrono_tz::Tz::from_str(timezone).ok()
    };
    if tz.is_none() {
        c.push(
            "timezone",
            "must be an IANA time zone such as `UTC` or `Europe/Berlin`",
        );
    }
    tz
}

/// Checks a jitter value.
fn check_jitter(c: &mut Collector, v: Option<i64>) -> u32 {
    match v {
        None => 0,
        Some(j) if (0..=i64::from(JITTER_MAX_SECONDS)).contains(&j) => {
            u32::try_from(j).unwrap_or(0)
        }
        Some(_) => {
            c.push(
                "jitter_seconds",
                format!("must be between 0 and {JITTER_MAX_SECONDS}"),
            );
            0
        }
    }
}

fn check_run(c: &mut Collector, run: &Option<RunInput>) {
    let Some(run) = run else { return };
    if run.files.is_some() {
        c.push("run.files", "a schedule's runs cannot carry files");
    }
    if run.ephemeral == Some(true) {
        c.push(
            "run.ephemeral",
            "a schedule's runs are placed on the fleet; an ephemeral run is created by the job that runs it (berthctl run --here)",
        );
    }
    if let Err(e) = run.clone().validate() {
        for f in e.0 {
            c.push(&format!("run.{}", f.field), f.message);
        }
    }
}

/// What one fire time of a schedule does (see [`Schedule::fires`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fire {
    /// Create a run for this intended fire time.
    Run(i64),
    /// `n` fire times were missed and dropped (`catch_up: skip`, or all but the last with
    /// `run_once`).
    Missed(u64),
}

impl Schedule {
    /// A new schedule of `runner_id` from a create body; `now` fixes its first fire time.
    pub fn create(
        id: String,
        runner_id: &str,
        project: &str,
        input: ScheduleInput,
        now: i64,
    ) -> Result<Schedule, ValidationErrors> {
        let mut c = Collector::default();
        let timezone = input.timezone.unwrap_or_else(|| "UTC".to_owned());
        let (cron_expr, spec) = match input.cron {
            Some(expr) => {
                let spec = check(&mut c, &expr, &timezone);
                (expr, spec)
            }
            None => {
                c.push("cron", "is required");
                (String::new(), None)
            }
        };
        let jitter_seconds = check_jitter(&mut c, input.jitter_seconds);
        check_run(&mut c, &input.run);
        c.finish(())?;
        Ok(Schedule {
            id,
            runner_id: runner_id.to_owned(),
            project: project.to_owned(),
            next_fire_at: spec.and_then(|s| s.next_after(now)),
            cron: cron_expr.trim().to_owned(),
            timezone,
            run: input.run,
            overlap: input.overlap.unwrap_or_default(),
            catch_up: input.catch_up.unwrap_or_default(),
            jitter_seconds,
            paused: input.paused.unwrap_or(false),
            last_fire_at: None,
            last_run_id: None,
            fired: 0,
            skipped: 0,
            last_skip_reason: None,
            created_at: now,
            updated_at: now,
        })
    }

    /// Applies a PATCH body. A new expression or zone, or a resume, moves the next fire time to
    /// the first one after `now`.
    pub fn apply(&self, input: ScheduleInput, now: i64) -> Result<Schedule, ValidationErrors> {
        let mut c = Collector::default();
        let mut next = self.clone();
        let retime = input.cron.is_some()
            || input.timezone.is_some()
            || (self.paused && input.paused == Some(false));
        if let Some(v) = input.cron {
            next.cron = v.trim().to_owned();
        }
        if let Some(v) = input.timezone {
            next.timezone = v;
        }
        let spec = check(&mut c, &next.cron, &next.timezone);
        if input.run.is_some() {
            check_run(&mut c, &input.run);
            next.run = input.run;
        }
        if let Some(v) = input.overlap {
            next.overlap = v;
        }
        if let Some(v) = input.catch_up {
            next.catch_up = v;
        }
        if input.jitter_seconds.is_some() {
            next.jitter_seconds = check_jitter(&mut c, input.jitter_seconds);
        }
        if let Some(v) = input.paused {
            next.paused = v;
        }
        c.finish(())?;
        if retime {
            next.next_fire_at = spec.and_then(|s| s.next_after(now));
        }
        next.updated_at = now;
        Ok(next)
    }

    pub fn spec(&self) -> Option<CronSpec> {
        CronSpec::parse(&self.cron, &self.timezone).ok()
    }

    /// The delay of the fire intended at `at`: a hash of the schedule and the time, so every
    /// scheduler (a new leader too) computes the same.
    pub fn jitter_millis(&self, at: i64) -> i64 {
        if self.jitter_seconds == 0 {
            return 0;
        }
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("{}/{at}", self.id));
        let mut n = [0u8; 8];
        n.copy_from_slice(&digest[..8]);
        let span = u64::from(self.jitter_seconds) * 1000;
        i64::try_from(u64::from_le_bytes(n) % (span + 1)).unwrap_or(0)
    }

    /// When the next fire is due (its time plus its jitter), if it has one and is not paused.
    pub fn due_at(&self) -> Option<i64> {
        if self.paused {
            return None;
        }
        let at = self.next_fire_at?;
        Some(at + self.jitter_millis(at))
    }

    /// What is due at `now`, in order, and the next fire time after them: every fire time from
    /// `next_fire_at` whose due time has come. One due within [`MISFIRE_GRACE_MILLIS`] fires;
    /// older ones were missed: dropped (`skip`), or the latest of them fires when no fire is on
    /// time (`run_once`).
    pub fn fires(&self, spec: &CronSpec, now: i64) -> (Vec<Fire>, Option<i64>) {
        let mut on_time = Vec::new();
        let mut missed: Vec<i64> = Vec::new();
        let mut next = if self.paused { None } else { self.next_fire_at };
        let mut seen = 0;
        while let Some(at) = next {
            let due = at + self.jitter_millis(at);
            if due > now || seen == FIRES_SCAN_MAX {
                break;
            }
            seen += 1;
            if now - due <= MISFIRE_GRACE_MILLIS {
                on_time.push(at);
            } else {
                missed.push(at);
            }
            next = spec.next_after(at);
        }
        if seen == FIRES_SCAN_MAX {
            // Far behind: jump to the first time after now.
            next = spec.next_after(now);
        }
        let mut out = Vec::new();
        let dropped = match (self.catch_up, missed.last(), on_time.is_empty()) {
            (CatchUp::RunOnce, Some(&last), true) => {
                out.push(Fire::Run(last));
                missed.len() - 1
            }
            _ => missed.len(),
        };
        if dropped > 0 {
            out.insert(0, Fire::Missed(dropped as u64));
        }
        out.extend(on_time.into_iter().map(Fire::Run));
        (out, next)
    }
}

/// Checks a create's body as `Schedule::create` will (the scheduler re-checks what arrives).
pub fn validate_input(input: &ScheduleInput) -> Result<(), ValidationErrors> {
    Schedule::create(String::new(), "", "", input.clone(), 0).map(|_| ())
}

/// Checks the fields a PATCH body gives, each as a create would (a zone given alone is checked
/// as a zone; the whole result is checked again against the stored schedule by `apply`).
pub fn validate_patch(input: &ScheduleInput) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    let timezone = input.timezone.as_deref().unwrap_or("UTC");
    match &input.cron {
        Some(expr) => {
            check(&mut c, expr, timezone);
        }
        None => {
            check_zone(&mut c, timezone);
        }
    }
    check_jitter(&mut c, input.jitter_seconds);
    check_run(&mut c, &input.run);
    c.finish(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    fn schedule(cron: &str, tz: &str, catch_up: CatchUp) -> Schedule {
        Schedule::create(
            "s1".into(),
            "r",
            "p",
            ScheduleInput {
                cron: Some(cron.into()),
                timezone: Some(tz.into()),
                catch_up: Some(catch_up),
                ..Default::default()
            },
            T0,
        )
        .expect("valid")
    }

    #[test]
    fn five_fields_read_in_the_time_zone() {
        // 09:00 in Berlin is 08:00 UTC in winter.
        let s = schedule("0 9 * * *", "Europe/Berlin", CatchUp::Skip);
        assert_eq!(s.next_fire_at, Some(T0 + 8 * 3_600_000));
        // Six fields: seconds first.
        let s = schedule("*/2 * * * * *", "UTC", CatchUp::Skip);
        assert_eq!(s.next_fire_at, Some(T0 + 2_000));
        let spec = s.spec().expect("spec");
        assert_eq!(spec.next_after(T0 + 2_000), Some(T0 + 4_000));
    }

    #[test]
    fn fires_on_time_each_once_and_missed_ones_by_catch_up() {
        let s = schedule("*/10 * * * * *", "UTC", CatchUp::Skip);
        let spec = s.spec().expect("spec");
        let (fires, next) = s.fires(&spec, T0 + 5_000);
        assert!(fires.is_empty() && next == Some(T0 + 10_000), "not yet");
        // Two due, both within the grace: both fire, in order.
        let (fires, next) = s.fires(&spec, T0 + 25_000);
        assert_eq!(fires, [Fire::Run(T0 + 10_000), Fire::Run(T0 + 20_000)]);
        assert_eq!(next, Some(T0 + 30_000));
        // Down for ten minutes: the old ones are missed, the recent ones fire.
        let (fires, next) = s.fires(&spec, T0 + 600_000);
        assert_eq!(fires[0], Fire::Missed(53));
        assert_eq!(fires.len(), 1 + 7, "{fires:?}");
        assert_eq!(next, Some(T0 + 610_000));
        // run_once: with nothing on time, the latest missed fires.
        let s = schedule("0 * * * *", "UTC", CatchUp::RunOnce);
        let spec = s.spec().expect("spec");
        let (fires, next) = s.fires(&spec, T0 + 3 * 3_600_000 + 120_000);
        assert_eq!(
            fires,
            [Fire::Missed(2), Fire::Run(T0 + 3 * 3_600_000)],
            "three missed: one runs"
        );
        assert_eq!(next, Some(T0 + 4 * 3_600_000));
        let skip = schedule("0 * * * *", "UTC", CatchUp::Skip);
        let (fires, _) = skip.fires(&spec, T0 + 3 * 3_600_000 + 120_000);
        assert_eq!(fires, [Fire::Missed(3)]);
    }

    #[test]
    fn jitter_is_the_same_for_a_fire_everywhere_and_within_its_bound() {
        let mut s = schedule("* * * * *", "UTC", CatchUp::Skip);
        assert_eq!(s.jitter_millis(T0), 0);
        s.jitter_seconds = 30;
        let j: Vec<i64> = (0..50).map(|i| s.jitter_millis(T0 + i * 60_000)).collect();
        assert!(j.iter().all(|&d| (0..=30_000).contains(&d)));
        assert!(j.iter().any(|&d| d != j[0]), "spread");
        assert_eq!(s.jitter_millis(T0), s.clone().jitter_millis(T0));
    }

    #[test]
    fn bad_input_names_the_field() {
        let fields = |input: ScheduleInput| -> Vec<String> {
            validate_input(&input)
                .err()
                .map(|e| e.0.into_iter().map(|f| f.field).collect())
                .unwrap_or_default()
        };
        let ok = ScheduleInput {
            cron: Some("*/5 * * * *".into()),
            ..Default::default()
        };
        assert!(fields(ok.clone()).is_empty());
        assert_eq!(fields(ScheduleInput::default()), ["cron"]);
        // Given but empty is no better than absent, and the zone is checked all the same.
        assert_eq!(
            fields(ScheduleInput {
                cron: Some(String::new()),
                timezone: Some("0".repeat(201)),
                ..Default::default()
            }),
            ["cron", "timezone"]
        );
        assert_eq!(
            fields(ScheduleInput {
                cron: Some("every minute".into()),
                ..ok.clone()
            }),
            ["cron"]
        );
        assert_eq!(
            fields(ScheduleInput {
                timezone: Some("Mars/Olympus".into()),
                ..ok.clone()
            }),
            ["timezone"]
        );
        assert_eq!(
            fields(ScheduleInput {
                jitter_seconds: Some(3601),
                ..ok.clone()
            }),
            ["jitter_seconds"]
        );
        assert_eq!(
            fields(ScheduleInput {
                run: Some(RunInput {
                    argv: Some(vec![]),
                    ..Default::default()
                }),
                ..ok
            }),
            ["run.argv"]
        );
    }

    proptest::proptest! {
        /// Whatever a client sends as an expression or a zone, the answer is a value or a
        /// field error, never a panic; and a schedule that parses fires in order.
        #[test]
        fn any_expression_is_parsed_or_refused_never_a_panic(
            expr in "[0-9*/,A-Za-z@ #?LW-]{0,40}",
            tz in "[A-Za-z/_+-]{0,20}",
            now in 0i64..4_102_444_800_000,
        ) {
            let input = ScheduleInput { cron: Some(expr), timezone: Some(tz), ..Default::default() };
            if let Ok(s) = Schedule::create("p".into(), "r", "p", input, now) {
                if let (Some(spec), Some(at)) = (s.spec(), s.next_fire_at) {
                    proptest::prop_assert!(at > now);
                    let (fires, next) = s.fires(&spec, at + 1);
                    proptest::prop_assert!(!fires.is_empty());
                    proptest::prop_assert!(next.is_none_or(|n| n > at));
                }
            }
        }
    }

    #[test]
    fn a_resume_or_a_new_expression_starts_from_now() {
        let s = schedule("0 * * * *", "UTC", CatchUp::Skip);
        let paused = s
            .apply(
                ScheduleInput {
                    paused: Some(true),
                    ..Default::default()
                },
                T0 + 10,
            )
            .expect("pause");
        assert!(paused.paused && paused.due_at().is_none());
        let resumed = paused
            .apply(
                ScheduleInput {
                    paused: Some(false),
                    ..Default::default()
                },
                T0 + 5 * 3_600_000 + 1,
            )
            .expect("resume");
        assert_eq!(resumed.next_fire_at, Some(T0 + 6 * 3_600_000));
    }
}
