//! Defaults that more than one process (or more than one module) needs, each written once.

/// Seconds between SIGTERM and SIGKILL when a run is stopped or times out, unless the run or its
/// runner sets `stop_grace_seconds`.
pub const STOP_GRACE_SECONDS: u32 = 2;
