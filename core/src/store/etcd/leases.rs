//! Expiring puts on etcd: one lease per (TTL, time bucket), granted on first use and shared by
//! every expiring put of that TTL in that bucket, instead of one lease per key (a lease is a
//! raft entry and server state of its own; thousands of them would cost more than the keys).
//!
//! A lease granted in bucket `b` has TTL `ttl + bucket`: the last put attached to it happens
//! before `b` ends, at most one bucket after the grant, so every key still lives at least `ttl`
//! after its write, and at most `ttl + bucket`. The bucket is an hour, or an eighth of the TTL
//! when that is shorter (at least a second), so the slack stays a small part of the retention.

use super::super::{Op, StoreError, Txn};
use super::members::Members;
use etcd_client::PutOptions;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest bucket.
const MAX_BUCKET_SECS: u64 = 3600;

/// Whole seconds of `ttl`, rounded up, at least one.
fn ttl_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

/// The bucket length for a TTL of `ttl_secs`.
pub(super) fn bucket_secs(ttl_secs: u64) -> u64 {
    (ttl_secs / 8).clamp(1, MAX_BUCKET_SECS)
}

pub(super) struct LeaseCache {
    members: Arc<Members>,
    /// (TTL seconds, bucket index) → lease id.
    granted: Mutex<HashMap<(u64, u64), i64>>,
}

/// The lease of each TTL a transaction uses.
pub(super) type TxnLeases = HashMap<Duration, i64>;

impl LeaseCache {
    pub(super) fn new(members: Arc<Members>) -> LeaseCache {
        LeaseCache {
            members,
            granted: Mutex::new(HashMap::new()),
        }
    }

    /// The leases `txn`'s expiring puts attach to, granting those not granted yet.
    pub(super) async fn for_txn(&self, txn: &Txn) -> Result<TxnLeases, StoreError> {
        let mut out = TxnLeases::new();
        for op in &txn.ops {
            if let Op::Put { ttl: Some(ttl), .. } = op {
                if !out.contains_key(ttl) {
                    out.insert(*ttl, self.lease(*ttl).await?);
                }
            }
        }
        Ok(out)
    }

    async fn lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let secs = ttl_secs(ttl);
        let bucket = bucket_secs(secs);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let slot = (secs, now / bucket);
        if let Some(id) = self.lock().get(&slot) {
            return Ok(*id);
        }
        let lease_ttl = i64::try_from(secs + bucket).unwrap_or(i64::MAX);
        // A grant is a new lease each time, so one lost to a failed member costs nothing but
        // its TTL: try each member once.
        let granted = self
            .members
            .call_on_each(
                |client| async move { client.lease_client().grant(lease_ttl, None).await },
            )
            .await
            .map_err(|e| StoreError::Backend(format!("granting an etcd lease: {e}")))?;
        let id = granted.id();
        tracing::debug!(
            lease_id = id,
            ttl_secs = lease_ttl,
            "granted a lease for expiring keys"
        );
        let mut cache = self.lock();
        // Earlier buckets of this TTL are done with.
        cache.retain(|(t, b), _| *t != secs || *b >= slot.1);
        cache.insert(slot, id);
        Ok(id)
    }

    /// Drops every cached lease, e.g. after etcd said one is gone (restored from a snapshot,
    /// revoked by hand): the next expiring put grants a fresh one.
    pub(super) fn forget(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), i64>> {
        self.granted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The put options for an op with `ttl`: attached to its lease.
pub(super) fn put_options(leases: &TxnLeases, ttl: Option<Duration>) -> Option<PutOptions> {
    let id = leases.get(&ttl?)?;
    Some(PutOptions::new().with_lease(*id))
}

/// Whether a failed commit says a lease no longer exists.
pub(super) fn lease_gone(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_an_hour_or_an_eighth_of_a_short_ttl() {
        assert_eq!(bucket_secs(168 * 3600), 3600);
        assert_eq!(bucket_secs(8 * 3600), 3600);
        assert_eq!(bucket_secs(800), 100);
        assert_eq!(bucket_secs(2), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(0)), 1);
    }
}
