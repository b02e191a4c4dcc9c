//! Retry policies (issue #15, item 3): which endings of a run start another attempt, how many
//! attempts in all, and how long each waits. A runner sets one; a run may bring its own instead.
//!
//! Each attempt is a run of its own (billed for itself), linked to the one before and to the
//! first. What retries is named by cause; what never retries is everything else: a run stopped
//! by its user (canceled), a run that succeeded, a run that could not be started for a reason
//! that another attempt would meet again (an invalid command, spec or user), and a timeout
//! unless `timeout` is listed.

use crate::codes::ErrorCode;
use crate::model::Run;
use crate::status::RunStatus;
use crate::validate::{Collector, ValidationErrors};
use serde::{Deserialize, Serialize};

/// Attempts in all, the first included.
pub const MAX_ATTEMPTS_MIN: u32 = 1;
pub const MAX_ATTEMPTS_MAX: u32 = 10;
/// The wait before the second attempt, and the longest any wait may be, in seconds.
pub const BACKOFF_MAX_SECONDS: u32 = 3_600;
pub const BACKOFF_MULTIPLIER_MAX: u32 = 10;
/// Exit codes a policy may list.
pub const EXIT_CODES_MAX: usize = 64;

/// An ending of a run that may start another attempt.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RetryCause {
    /// The process exited with a non-zero code (of `exit_codes`, when the policy lists some);
    /// not 124 for a timeout nor an OOM kill, which are causes of their own.
    ExitCode,
    /// The run's node was lost or restarted without it after it started.
    NodeLost,
    /// The kernel killed the run at its memory limit (exit 137, `oom_killed`).
    OomKilled,
    /// The image could not be pulled.
    ImagePullFailed,
    /// The run exceeded its timeout (exit 124).
    Timeout,
}

impl RetryCause {
    pub const ALL: [RetryCause; 5] = [
        RetryCause::ExitCode,
        RetryCause::NodeLost,
        RetryCause::OomKilled,
        RetryCause::ImagePullFailed,
        RetryCause::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::ExitCode => "exit_code",
            RetryCause::NodeLost => "node_lost",
            RetryCause::OomKilled => "oom_killed",
            RetryCause::ImagePullFailed => "image_pull_failed",
            RetryCause::Timeout => "timeout",
        }
    }

    /// Why `run`, which has ended, ended, as a cause a policy can name; None for an ending that
    /// never retries.
    pub fn of(run: &Run) -> Option<RetryCause> {
        if run.status != RunStatus::Failed {
            return None;
        }
        if run.oom_killed || run.error_code == Some(ErrorCode::OomKilled) {
            return Some(RetryCause::OomKilled);
        }
        match run.error_code {
            Some(ErrorCode::Timeout) => Some(RetryCause::Timeout),
            Some(ErrorCode::NodeLost | ErrorCode::NodeRestarted) => Some(RetryCause::NodeLost),
            Some(ErrorCode::ImagePullFailed) => Some(RetryCause::ImagePullFailed),
            // The agent lost the task: the process's own exit code is what there is.
            None | Some(ErrorCode::TaskFailed) => run
                .exit_code
                .filter(|&c| c != 0)
                .map(|_| RetryCause::ExitCode),
            Some(_) => None,
        }
    }
}

/// How a runner's (or one run's) failed attempts are tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 1 to 10 (1: never retry).
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: u32,
    /// Seconds before the second attempt is placed, 0 to 3,600 (default 0).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 3600)]
    pub backoff_seconds: u32,
    /// Each later wait is this many times the one before, 1 to 10 (default 2).
    #[serde(default = "default_multiplier")]
    #[schema(minimum = 1, maximum = 10)]
    pub backoff_multiplier: u32,
    /// The longest wait, 0 to 3,600 seconds (default 3,600).
    #[serde(default = "default_max_backoff")]
    #[schema(minimum = 0, maximum = 3600)]
    pub max_backoff_seconds: u32,
    /// The endings that start another attempt. A run stopped by its user never retries; a
    /// timeout only when `timeout` is listed.
    #[serde(default)]
    pub retry_on: Vec<RetryCause>,
    /// With `exit_code` in `retry_on`: only these exit codes (1 to 255) retry; empty or absent:
    /// any non-zero exit code. At most 64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub exit_codes: Vec<i32>,
}

fn default_multiplier() -> u32 {
    2
}

fn default_max_backoff() -> u32 {
    BACKOFF_MAX_SECONDS
}

impl RetryPolicy {
    /// Checks the policy, naming each bad field `{prefix}.{field}`.
    pub(crate) fn check(&self, c: &mut Collector, prefix: &str) {
        let field = |f: &str| format!("{prefix}.{f}");
        if !(MAX_ATTEMPTS_MIN..=MAX_ATTEMPTS_MAX).contains(&self.max_attempts) {
            c.push(
                &field("max_attempts"),
                format!("must be between {MAX_ATTEMPTS_MIN} and {MAX_ATTEMPTS_MAX}"),
            );
        }
        if self.backoff_seconds > BACKOFF_MAX_SECONDS {
            c.push(
                &field("backoff_seconds"),
                format!("must be between 0 and {BACKOFF_MAX_SECONDS}"),
            );
        }
        if !(1..=BACKOFF_MULTIPLIER_MAX).contains(&self.backoff_multiplier) {
            c.push(
                &field("backoff_multiplier"),
                format!("must be between 1 and {BACKOFF_MULTIPLIER_MAX}"),
            );
        }
        if self.max_backoff_seconds > BACKOFF_MAX_SECONDS {
            c.push(
                &field("max_backoff_seconds"),
                format!("must be between 0 and {BACKOFF_MAX_SECONDS}"),
            );
        }
        if self.exit_codes.len() > EXIT_CODES_MAX {
            c.push(
                &field("exit_codes"),
                format!("at most {EXIT_CODES_MAX} exit codes"),
            );
        } else if let Some(i) = self.exit_codes.iter().position(|x| !(1..=255).contains(x)) {
            c.push(
                &format!("{prefix}.exit_codes[{i}]"),
                "must be an exit code between 1 and 255",
            );
        } else if !self.exit_codes.is_empty() && !self.retry_on.contains(&RetryCause::ExitCode) {
            c.push(
                &field("exit_codes"),
                "needs `exit_code` in retry_on (the codes say which exits retry)",
            );
        }
    }

    /// Whether a run that ended for `cause` as its `attempt`-th attempt is tried again.
    pub fn retries(&self, run: &Run) -> Option<RetryCause> {
        if run.attempt >= self.max_attempts {
            return None;
        }
        let cause = RetryCause::of(run)?;
        if !self.retry_on.contains(&cause) {
            return None;
        }
        if cause == RetryCause::ExitCode
            && !self.exit_codes.is_empty()
            && !run.exit_code.is_some_and(|c| self.exit_codes.contains(&c))
        {
            return None;
        }
        Some(cause)
    }

    /// Seconds the attempt after the `attempt`-th waits: `backoff_seconds` ×
    /// `backoff_multiplier`^(attempt − 1), at most `max_backoff_seconds`.
    pub fn backoff_seconds_after(&self, attempt: u32) -> u32 {
        let mut wait = u64::from(self.backoff_seconds);
        for _ in 1..attempt {
            wait = wait.saturating_mul(u64::from(self.backoff_multiplier));
            if wait >= u64::from(self.max_backoff_seconds) {
                break;
            }
        }
        u32::try_from(wait.min(u64::from(self.max_backoff_seconds))).unwrap_or(u32::MAX)
    }
}

/// Checks a policy given alone (the scheduler re-checks what arrives over gRPC).
pub fn validate(policy: &RetryPolicy, prefix: &str) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    policy.check(&mut c, prefix);
    c.finish(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: &[RetryCause], exit_codes: &[i32]) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff_seconds: 2,
            backoff_multiplier: 3,
            max_backoff_seconds: 10,
            retry_on: retry_on.to_vec(),
            exit_codes: exit_codes.to_vec(),
        }
    }

    fn ended(
        status: RunStatus,
        exit_code: Option<i32>,
        error_code: Option<ErrorCode>,
        attempt: u32,
    ) -> Run {
        let mut r: Run = serde_json::from_value(serde_json::json!({
            "id": "r", "runner_id": "x", "status": "pending", "exit_code": null,
            "command": null, "argv": [], "entrypoint": null, "env": [], "image": "i",
            "image_digest": null, "region": "fra", "instance_type": "standard-s",
            "memory_mib": 1, "cpu_millis": 1, "timeout_seconds": 1, "node_id": null,
            "lease_epoch": 0, "created_at": 0, "started_at": null, "completed_at": null,
            "error_code": null, "error_message": null, "pending_reason": null,
            "stop_requested": false,
        }))
        .expect("a run record");
        r.status = status;
        r.exit_code = exit_code;
        r.error_code = error_code;
        r.oom_killed = error_code == Some(ErrorCode::OomKilled);
        r.attempt = attempt;
        r
    }

    #[test]
    fn causes_are_named_by_how_the_run_ended() {
        use ErrorCode as E;
        use RunStatus as S;
        let cases = [
            (
                ended(S::Failed, Some(3), None, 1),
                Some(RetryCause::ExitCode),
            ),
            (
                ended(S::Failed, Some(124), Some(E::Timeout), 1),
                Some(RetryCause::Timeout),
            ),
            (
                ended(S::Failed, Some(137), Some(E::OomKilled), 1),
                Some(RetryCause::OomKilled),
            ),
            (
                ended(S::Failed, None, Some(E::NodeLost), 1),
                Some(RetryCause::NodeLost),
            ),
            (
                ended(S::Failed, None, Some(E::NodeRestarted), 1),
                Some(RetryCause::NodeLost),
            ),
            (
                ended(S::Failed, None, Some(E::ImagePullFailed), 1),
                Some(RetryCause::ImagePullFailed),
            ),
            (
                ended(S::Failed, Some(2), Some(E::TaskFailed), 1),
                Some(RetryCause::ExitCode),
            ),
            // Never: succeeded, stopped by the user, a start another attempt would fail alike.
            (ended(S::Succeeded, Some(0), None, 1), None),
            (ended(S::Canceled, Some(143), None, 1), None),
            (ended(S::Failed, None, Some(E::InvalidCommand), 1), None),
            (ended(S::Failed, None, Some(E::InvalidUser), 1), None),
        ];
        for (i, (run, want)) in cases.iter().enumerate() {
            assert_eq!(RetryCause::of(run), *want, "case {i}");
        }
    }

    #[test]
    fn a_policy_retries_the_causes_it_lists_up_to_its_attempts() {
        use RetryCause as C;
        let p = policy(&[C::ExitCode, C::NodeLost], &[]);
        let exit = |code, attempt| ended(RunStatus::Failed, Some(code), None, attempt);
        assert_eq!(p.retries(&exit(1, 1)), Some(C::ExitCode));
        assert_eq!(p.retries(&exit(1, 2)), Some(C::ExitCode));
        assert_eq!(
            p.retries(&exit(1, 3)),
            None,
            "the third attempt is the last"
        );
        let timeout = ended(RunStatus::Failed, Some(124), Some(ErrorCode::Timeout), 1);
        assert_eq!(p.retries(&timeout), None, "a timeout only when listed");
        let with_timeout = policy(&[C::Timeout], &[]);
        assert_eq!(with_timeout.retries(&timeout), Some(C::Timeout));
        let only = policy(&[C::ExitCode], &[75, 76]);
        assert_eq!(only.retries(&exit(75, 1)), Some(C::ExitCode));
        assert_eq!(only.retries(&exit(1, 1)), None, "not a listed code");
        let stopped = ended(RunStatus::Canceled, Some(143), None, 1);
        let all = policy(&C::ALL, &[]);
        assert_eq!(all.retries(&stopped), None, "stopped by the user: never");
    }

    #[test]
    fn waits_grow_by_the_multiplier_up_to_the_longest() {
        let p = policy(&[], &[]);
        let waits: Vec<u32> = (1..=5).map(|a| p.backoff_seconds_after(a)).collect();
        assert_eq!(waits, [2, 6, 10, 10, 10]);
        let huge = RetryPolicy {
            backoff_seconds: 3600,
            backoff_multiplier: 10,
            max_backoff_seconds: 3600,
            ..p
        };
        assert_eq!(huge.backoff_seconds_after(10), 3600);
    }

    #[test]
    fn checks_name_the_field() {
        let fields = |p: RetryPolicy| -> Vec<String> {
            validate(&p, "retry_policy")
                .err()
                .map(|e| e.0.into_iter().map(|f| f.field).collect())
                .unwrap_or_default()
        };
        let ok = policy(&[RetryCause::ExitCode], &[1]);
        assert!(fields(ok.clone()).is_empty());
        assert_eq!(
            fields(RetryPolicy {
                max_attempts: 0,
                ..ok.clone()
            }),
            ["retry_policy.max_attempts"]
        );
        assert_eq!(
            fields(RetryPolicy {
                max_attempts: 11,
                backoff_multiplier: 0,
                ..ok.clone()
            }),
            [
                "retry_policy.max_attempts",
                "retry_policy.backoff_multiplier"
            ]
        );
        assert_eq!(
            fields(RetryPolicy {
                backoff_seconds: 3601,
                ..ok.clone()
            }),
            ["retry_policy.backoff_seconds"]
        );
        assert_eq!(
            fields(RetryPolicy {
                exit_codes: vec![1, 256],
                ..ok.clone()
            }),
            ["retry_policy.exit_codes[1]"]
        );
        assert_eq!(
            fields(RetryPolicy {
                retry_on: vec![],
                ..ok
            }),
            ["retry_policy.exit_codes"]
        );
    }
}
