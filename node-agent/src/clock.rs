//! Wall-clock timestamps in the unit the protocol uses.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, as unix nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A protobuf timestamp as unix nanoseconds.
pub fn timestamp_nanos(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.nanos))
}
