//! The run lifecycle, shared by the API, the scheduler and the agent.
//!
//! ```text
//!            ┌──────────────► canceled ◄──────────┐
//!            │                                     │
//!  pending ──┼──► running ──┬──► succeeded (exit 0)│
//!    ▲   │   │              └──► failed (exit ≠ 0, timeout 124, node lost)
//!    └───┘   └──► failed (never started: image pull failed, invalid command)
//!  (re-queued when its node went away before the run started)
//! ```
//! Terminal states never change again; every state change in the system goes through
//! [`RunStatus::transition`], so an out-of-order or repeated report cannot resurrect a run.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The exit code of a run ended by its timeout (as `timeout(1)` reports it).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Queued, or assigned to a node that has not started it yet.
    Pending,
    /// The container's process has started.
    Running,
    /// The process exited with code 0.
    Succeeded,
    /// Non-zero exit, timeout (124), a start failure, or its node was lost.
    Failed,
    /// Stopped on request.
    Canceled,
}

/// A state change the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a run cannot go from {from} to {to}")]
pub struct TransitionError {
    pub from: RunStatus,
    pub to: RunStatus,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Canceled,
    ];

    /// Succeeded, failed and canceled runs never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Canceled
        )
    }

    /// The one table of allowed transitions.
    pub fn can_transition_to(self, next: RunStatus) -> bool {
        use RunStatus::*;
        match (self, next) {
            // Re-queue (node went away before start), start, never-started failure, cancel.
            (Pending, Pending | Running | Failed | Canceled) => true,
            (Running, Succeeded | Failed | Canceled) => true,
            _ => false,
        }
    }

    pub fn transition(self, next: RunStatus) -> Result<RunStatus, TransitionError> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(TransitionError {
                from: self,
                to: next,
            })
        }
    }

    /// The terminal status a process exit code means.
    pub fn from_exit_code(code: i32) -> RunStatus {
        if code == 0 {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        for from in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in RunStatus::ALL {
                assert!(
                    from.transition(to).is_err(),
                    "{from} -> {to} must be refused"
                );
            }
        }
    }

    #[test]
    fn running_cannot_go_back_to_pending() {
        assert_eq!(
            RunStatus::Running.transition(RunStatus::Pending),
            Err(TransitionError {
                from: RunStatus::Running,
                to: RunStatus::Pending
            })
        );
    }

    #[test]
    fn the_normal_paths_are_allowed() {
        assert_eq!(
            RunStatus::Pending.transition(RunStatus::Running),
            Ok(RunStatus::Running)
        );
        assert_eq!(
            RunStatus::Running.transition(RunStatus::Succeeded),
            Ok(RunStatus::Succeeded)
        );
        assert_eq!(
            RunStatus::Pending.transition(RunStatus::Canceled),
            Ok(RunStatus::Canceled)
        );
        assert_eq!(
            RunStatus::Pending.transition(RunStatus::Failed),
            Ok(RunStatus::Failed)
        );
    }

    #[test]
    fn exit_codes_map_to_statuses() {
        assert_eq!(RunStatus::from_exit_code(0), RunStatus::Succeeded);
        assert_eq!(RunStatus::from_exit_code(3), RunStatus::Failed);
        assert_eq!(RunStatus::from_exit_code(124), RunStatus::Failed);
    }

    #[test]
    fn the_openapi_schema_lists_the_json_names() {
        let schema = <RunStatus as utoipa::PartialSchema>::schema();
        let json = serde_json::to_string(&schema).unwrap_or_default();
        for s in RunStatus::ALL {
            assert!(json.contains(&format!("\"{}\"", s.as_str())), "{json}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).ok(),
                Some(format!("\"{}\"", s.as_str()))
            );
        }
    }
}
