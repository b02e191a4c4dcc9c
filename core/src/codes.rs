//! The machine-readable words the system says about runs and nodes, each one enum written once:
//! the proto, the OpenAPI document, the store and the agent all use these, so a client can
//! match on them and a typo cannot invent a new one.
//!
//! On the JSON wire and in stored records each variant is its `snake_case` name (the strings the
//! API has always returned); in the proto each is an enum value of the same name.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a run failed or was stopped, beside its status and exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The image could not be resolved, fetched or unpacked (registry unreachable, 401, bad
    /// manifest or layer).
    ImagePullFailed,
    /// containerd refused to create the container.
    ContainerCreateFailed,
    /// The run's network namespace could not be set up.
    NetworkSetupFailed,
    /// The container's task could not be started.
    TaskStartFailed,
    /// containerd lost or could not report the run's task.
    TaskFailed,
    /// The effective command is empty (neither the run, the runner nor the image names one).
    InvalidCommand,
    /// The OCI runtime spec could not be built.
    InvalidSpec,
    /// The run's uploaded files could not be placed.
    FilesFailed,
    /// The agent could not write the run's journal or log.
    JournalFailed,
    /// The agent could not kill the run's process on stop or timeout.
    KillFailed,
    /// The run never started and the agent gave no more precise reason.
    StartFailed,
    /// The run's node stopped answering after the run started.
    NodeLost,
    /// The run's node came back under a new agent that no longer knew the run (it had started).
    NodeRestarted,
    /// The node is shutting down and refused the run (the scheduler re-queues it elsewhere; a
    /// run only keeps this code when it was also asked to stop).
    NodeDraining,
    /// The run exceeded its `timeout_seconds` (exit code [`TIMEOUT_EXIT_CODE`]).
    ///
    /// [`TIMEOUT_EXIT_CODE`]: crate::status::TIMEOUT_EXIT_CODE
    Timeout,
    /// The kernel's OOM killer ended the run at its memory limit.
    OomKilled,
    /// The image's `USER` names a user or group its own `/etc/passwd` or `/etc/group` does not
    /// have (or is not `user[:group]`): the run is not started rather than run as root.
    InvalidUser,
    /// The run wrote more to its own filesystem (its writable layer) than the node allows a
    /// run (`--max-run-disk-mib`): killed before it could fill the node's disk.
    DiskLimitExceeded,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::ImagePullFailed,
        ErrorCode::ContainerCreateFailed,
        ErrorCode::NetworkSetupFailed,
        ErrorCode::TaskStartFailed,
        ErrorCode::TaskFailed,
        ErrorCode::InvalidCommand,
        ErrorCode::InvalidSpec,
        ErrorCode::FilesFailed,
        ErrorCode::JournalFailed,
        ErrorCode::KillFailed,
        ErrorCode::StartFailed,
        ErrorCode::NodeLost,
        ErrorCode::NodeRestarted,
        ErrorCode::NodeDraining,
        ErrorCode::Timeout,
        ErrorCode::OomKilled,
        ErrorCode::InvalidUser,
        ErrorCode::DiskLimitExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ImagePullFailed => "image_pull_failed",
            ErrorCode::ContainerCreateFailed => "container_create_failed",
            ErrorCode::NetworkSetupFailed => "network_setup_failed",
            ErrorCode::TaskStartFailed => "task_start_failed",
            ErrorCode::TaskFailed => "task_failed",
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::FilesFailed => "files_failed",
            ErrorCode::JournalFailed => "journal_failed",
            ErrorCode::KillFailed => "kill_failed",
            ErrorCode::StartFailed => "start_failed",
            ErrorCode::NodeLost => "node_lost",
            ErrorCode::NodeRestarted => "node_restarted",
            ErrorCode::NodeDraining => "node_draining",
            ErrorCode::Timeout => "timeout",
            ErrorCode::OomKilled => "oom_killed",
            ErrorCode::InvalidUser => "invalid_user",
            ErrorCode::DiskLimitExceeded => "disk_limit_exceeded",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no [`ErrorCode`] (or [`NodeState`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown code {0:?}")]
pub struct UnknownCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

/// A node as the fleet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Connected and accepting runs.
    Ready,
    /// Connected but taking no new runs (drained by an operator, or shutting down).
    Draining,
    /// Its stream is down but its lease has not expired: its runs are kept.
    Disconnected,
    /// Silent past its lease: its started runs failed `node_lost`, the others were re-queued.
    Lost,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Ready,
        NodeState::Draining,
        NodeState::Disconnected,
        NodeState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Disconnected => "disconnected",
            NodeState::Lost => "lost",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_through_their_names_and_json() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            let json = serde_json::to_string(&code).expect("serialise");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(
                serde_json::from_str::<ErrorCode>(&json).expect("parse"),
                code
            );
        }
        assert_eq!(
            "image_pull".parse::<ErrorCode>(),
            Err(UnknownCode("image_pull".into()))
        );
    }

    #[test]
    fn node_states_round_trip_through_their_names_and_json() {
        for state in NodeState::ALL {
            assert_eq!(state.as_str().parse::<NodeState>(), Ok(state));
            let json = serde_json::to_string(&state).expect("serialise");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert!("gone".parse::<NodeState>().is_err());
    }
}
