//! # Layout
//! What every Berth process shares, with no I/O of its own except the embedded store and the
//! failover client to the schedulers:
//! - [`status`]: the one run lifecycle enum, [`RunStatus`], and its guarded transitions.
//! - [`codes`]: the other words the wire carries: run error codes and node states.
//! - [`defaults`]: each default that more than one process needs, written once.
//! - [`model`]: runners, runs, log entries, the catalogue of regions and instance types.
//! - [`validate`]: pure validation of user input; every error names its field.
//! - [`overrides`]: what a run changes from its runner ([`overrides::RunOverrides`]), its files
//!   decoded once (from the API's JSON, or as the gRPC message's bytes), and its checks;
//!   [`files`]: the checks on uploaded files as bytes.
//! - [`convert`]: the one mapping between the domain types and their gRPC forms, including every
//!   enum the wire carries.
//! - [`command`]: how a runner's command, argv and entrypoint (and a run's overrides) become the
//!   process a container starts.
//! - [`store`]: the state store trait (etcd-shaped: revisions, compare-and-set, range reads), the
//!   embedded backend that is the default on one machine, an in-memory fake, and the conformance
//!   suite every backend must pass.
//! - [`keys`]: where each record lives in the store.
//! - [`log_chunks`]: how a run's log lines are stored: compressed chunks keyed by their last
//!   line, and which lines of a batch still need storing.
//! - [`agent`]: what node agents report and what the scheduler commands them, as domain types,
//!   and the [`agent::AgentLink`] trait the scheduler reaches an agent through.
//! - [`failover`]: how the API and the agents reach whichever of several schedulers leads: the
//!   address list, the order they are tried in, keepalive, and a transport that fails over.
//! - [`config_file`]: daemon settings from `/etc/berth/<daemon>.toml` under flags and the
//!   environment, and the reference table of `docs/CONFIG.md`.
//! - [`auth`]: projects, and API keys (their format, hashing and constant-time verification).

pub mod agent;
pub mod auth;
pub mod codes;
pub mod command;
pub mod config_file;
pub mod convert;
pub mod defaults;
pub mod failover;
pub mod files;
pub mod keys;
pub mod log_chunks;
pub mod metrics;
pub mod model;
pub mod overrides;
pub mod process;
pub mod retry;
pub mod schedule;
pub mod secrets;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tls;
pub mod validate;
pub mod webhook;

pub use model::{
    Catalog, EnvVar, InstanceType, Isolation, LogEntry, LogStream, Run, Runner, RunnerSpec,
};
pub use status::{RunStatus, TransitionError};

/// Milliseconds since the Unix epoch, the unit of every timestamp in the state.
pub fn now_unix_millis() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Microseconds since the Unix epoch (a run's [`model::Timeline`]).
pub fn now_unix_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}
