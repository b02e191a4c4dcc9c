//! How the API reaches the schedulers (`--scheduler`, a comma-separated list; only the leader
//! listens). Calls go through one [`FailoverChannel`]: to the address that last answered; a
//! call that never left (connect refused or timed out) is tried on the next address, for at
//! most [`FAILOVER_BUDGET`]; a call that may have reached a scheduler is sent again only if it
//! is one of the [`READS`]. A write that fails that way answers 503: the client sends it again
//! with its `Idempotency-Key`, which the scheduler honours, rather than the API guessing.

use berth_core::failover::{FailoverChannel, FailoverPolicy, SchedulerAddrs};
use std::time::Duration;

/// How long one request may spend failing over before it answers 503. A takeover after a
/// leader's crash takes up to its lease (a few seconds); a request arriving meanwhile waits up to
/// this long for the new leader rather than failing at once, and the client's own timeout
/// (usually 10 s or more) is not reached.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(5);

/// The control calls that change nothing: sent again after a failure that may have come after
/// the scheduler received them. Everything else is a write.
pub const READS: &[&str] = &[
    "GetRunner",
    "ListRunners",
    "GetRun",
    "ListRuns",
    "ListLogs",
    "WatchLogs",
    "ListNodes",
    "GetCatalog",
    "GetUsage",
    "ListContainerRegistries",
    "GetContainerRegistry",
    "ListApiKeys",
    "AuthenticateApiKey",
];

const CONTROL_SERVICE: &str = "/berth.v1.ControlService/";

/// Whether the call with gRPC path `path` is one of the [`READS`].
pub fn is_read(path: &str) -> bool {
    path.strip_prefix(CONTROL_SERVICE)
        .is_some_and(|method| READS.contains(&method))
}

/// The transport of every control call. Must be called inside a Tokio runtime; connects lazily.
pub fn channel(addrs: &SchedulerAddrs) -> FailoverChannel {
    FailoverChannel::new(
        addrs,
        FailoverPolicy {
            budget: FAILOVER_BUDGET,
            is_read,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_named_by_their_grpc_path_and_the_rest_are_writes() {
        assert!(is_read("/berth.v1.ControlService/GetRun"));
        assert!(is_read("/berth.v1.ControlService/WatchLogs"));
        assert!(!is_read("/berth.v1.ControlService/CreateRun"));
        assert!(!is_read("/berth.v1.ControlService/StopRun"));
        assert!(!is_read("/berth.v1.AgentService/GetRun"));
        assert!(!is_read("GetRun"));
    }
}
