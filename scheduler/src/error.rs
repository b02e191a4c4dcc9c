//! The scheduler's errors and their one mapping to `tonic::Status`.

use berth_core::store::StoreError;
use berth_core::validate::ValidationErrors;
use berth_core::TransitionError;

pub use berth_core::auth::ACTIVE_RUNS_METADATA;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The named record does not exist.
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    /// A compare-and-set lost against a concurrent writer.
    #[error("{0} was changed concurrently; retry")]
    Stale(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Secret(#[from] berth_core::secrets::SecretError),
    /// The record is still in use (e.g. a registry that runners name).
    #[error("{0}")]
    InUse(String),
    /// The call cannot be served in the state things are in (e.g. an ephemeral node for a run
    /// that has ended).
    #[error("{0}")]
    Refused(String),
    /// A presented API key is malformed, unknown, revoked, or its secret is wrong (the caller
    /// is not told which).
    #[error("invalid API key")]
    Unauthenticated,
    /// A node credential or registration token is missing, malformed, unknown, revoked,
    /// expired or used up; says which when the secret matched (never to a wrong secret).
    #[error("{0}")]
    NodeUnauthenticated(String),
    /// A node with this id is connected: a second agent cannot take its id.
    #[error("{0}")]
    NodeIdTaken(String),
    /// The node still holds runs, so it is not removed; `message` says what to do.
    #[error("{message}")]
    NodeHoldsRuns { runs: usize, message: String },
    /// The caller may not do this (a project key on an admin operation).
    #[error("{0}")]
    Forbidden(String),
    /// An agent broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message held no known value where one is required (an `UNSPECIFIED` or newer enum).
    #[error("protocol violation: {0}")]
    UnknownEnum(#[from] berth_core::convert::UnknownEnumValue),
}

impl From<StoreError> for SchedulerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { key, .. } => SchedulerError::Stale(key),
            other => SchedulerError::Store(other),
        }
    }
}

impl From<SchedulerError> for tonic::Status {
    fn from(e: SchedulerError) -> Self {
        match &e {
            SchedulerError::NotFound { .. } => tonic::Status::not_found(e.to_string()),
            // The API decodes the field list from the message.
            SchedulerError::Invalid(v) => tonic::Status::invalid_argument(
                serde_json::to_string(&v.0).unwrap_or_else(|_| v.to_string()),
            ),
            SchedulerError::Stale(_) => tonic::Status::aborted(e.to_string()),
            SchedulerError::Transition(_)
            | SchedulerError::InUse(_)
            | SchedulerError::Refused(_) => tonic::Status::failed_precondition(e.to_string()),
            SchedulerError::Protocol(_) | SchedulerError::UnknownEnum(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            SchedulerError::Unauthenticated | SchedulerError::NodeUnauthenticated(_) => {
                tonic::Status::unauthenticated(e.to_string())
            }
            SchedulerError::NodeIdTaken(_) => tonic::Status::already_exists(e.to_string()),
            SchedulerError::NodeHoldsRuns { runs, .. } => {
                let mut status = tonic::Status::failed_precondition(e.to_string());
                status.metadata_mut().insert(
                    ACTIVE_RUNS_METADATA,
                    tonic::metadata::MetadataValue::from(*runs),
                );
                status
            }
            SchedulerError::Forbidden(_) => tonic::Status::permission_denied(e.to_string()),
            // The store is down, or this scheduler is no longer the leader: another scheduler
            // (or this one, restarted) can serve the same call, so clients may retry.
            SchedulerError::Store(_) => {
                tracing::warn!(error = %e, "the store refused or failed a call");
                tonic::Status::unavailable(e.to_string())
            }
            SchedulerError::Corrupt { .. } | SchedulerError::Secret(_) => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
