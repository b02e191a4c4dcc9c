//! The state store: a small etcd-shaped key-value interface.
//!
//! Every write is a [`Txn`] of puts and deletes, each with an optional precondition on the key's
//! current revision; the whole transaction applies or none of it does, and it bumps the store's
//! single revision counter. Reads are by key or by key range. That is exactly what etcd offers,
//! so [`EtcdStore`] maps one to one (preconditions become etcd `Compare`s in one etcd `Txn`, the
//! per-key revisions are etcd's `mod_revision`/`create_revision`); [`EmbeddedStore`] is the
//! single-machine default and [`MemoryStore`] the fake for unit tests. [`conformance`] holds the
//! tests every backend must pass; the etcd backend's run them against a real `etcd` process.
//!
//! Where the backends differ: the embedded store gives every transaction its own revision, while
//! the etcd store may merge consecutive transactions with disjoint keys into one etcd request
//! that shares a revision (re-sending them one by one if a precondition fails). A single transaction must fit one etcd request (128
//! operations, about 1.5 MiB by etcd's defaults) or the etcd store refuses it with
//! [`StoreError::Backend`]. A transport error during an etcd commit is a
//! [`StoreError::Backend`] whose outcome is unknown; reads are retried with backoff instead.
//!
//! # Expiring keys
//! A put may carry a time to live ([`Txn::put_expiring`]): once it has passed, the key is gone
//! for every read and every precondition (a later `Expect::Absent` on it holds), as if deleted.
//! The promise is one-sided: a key lives *at least* its TTL after the write and is invisible
//! soon after it ends, within a bound each backend names. etcd attaches the key to a lease shared
//! by every expiring put of the same TTL in one time bucket (so the key lives up to a bucket
//! longer, and etcd deletes it itself); the embedded and memory stores hide an expired key at
//! once and delete it later, a bounded batch at a time. Another put of the key replaces its
//! expiry (a put without TTL makes it permanent again).

pub mod conformance;
mod election;
mod embedded;
mod etcd;
mod memory;
mod sealed;

pub use election::{Election, ElectionConfig, Leadership, LeaseState};
pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore, Fence, DEFAULT_PREFIX as ETCD_DEFAULT_PREFIX};
pub use memory::MemoryStore;
pub use sealed::SealedStore;

use std::future::Future;
use std::time::Duration;

/// One stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Store revision of the last write to this key.
    pub mod_revision: u64,
    /// Store revision at which this key was created.
    pub create_revision: u64,
}

/// What must be true of a key for a transaction to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this mod revision.
    Revision(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        expect: Expect,
        /// Gone this long after the write (see "Expiring keys" above); `None`: permanent.
        ttl: Option<Duration>,
    },
    Delete {
        key: String,
        expect: Expect,
    },
}

impl Op {
    /// [`Store::op_bytes`] of this operation.
    pub fn bytes(&self, store: &impl Store) -> usize {
        match self {
            Op::Put {
                key, value, expect, ..
            } => store.op_bytes(key, Some(value.len()), *expect),
            Op::Delete { key, expect } => store.op_bytes(key, None, *expect),
        }
    }
}

/// An all-or-nothing batch of writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>, expect: Expect) -> Txn {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            expect,
            ttl: None,
        });
        self
    }

    /// A put of a key that expires `ttl` after this write (see "Expiring keys" above).
    pub fn put_expiring(
        mut self,
        key: impl Into<String>,
        value: Vec<u8>,
        expect: Expect,
        ttl: Duration,
    ) -> Txn {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            expect,
            ttl: Some(ttl),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>, expect: Expect) -> Txn {
        self.ops.push(Op::Delete {
            key: key.into(),
            expect,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition did not hold; nothing was written.
    #[error("conflict on key {key}: expected {expected:?}, found revision {found:?}")]
    Conflict {
        key: String,
        expected: Expect,
        found: Option<u64>,
    },
    /// The backend failed (disk, network, corruption).
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The writer no longer holds the leadership its writes are fenced with (etcd): nothing
    /// was written, and nothing this process writes will be again.
    #[error("not the leader any more: {0}")]
    Fenced(String),
}

/// The interface every state backend implements.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Keys in `[start, end)`, ascending, at most `limit` of them.
    fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<KeyValue>, StoreError>> + Send;

    /// Keys in `[start, end)`, descending (the last first), at most `limit` of them. The
    /// default reads the whole range; backends that can walk backwards override it.
    fn range_rev(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<KeyValue>, StoreError>> + Send {
        let (start, end) = (start.to_owned(), end.to_owned());
        async move {
            let mut all = self.range(&start, &end, usize::MAX).await?;
            all.reverse();
            all.truncate(limit);
            Ok(all)
        }
    }

    /// Applies all of `txn` or nothing; returns the new store revision.
    fn commit(&self, txn: Txn) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.submit(txn)
    }

    /// Like [`Store::commit`], but `txn` takes its place in the commit order when this is
    /// *called*, not when the returned future is first polled: transactions submitted one after
    /// the other are applied in that order even if their futures are awaited elsewhere, later,
    /// or in another order. The future resolves once `txn` is durable (or has failed).
    fn submit(&self, txn: Txn) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static;

    /// The most operations one transaction may hold ([`usize::MAX`]: no limit). etcd's
    /// request limit makes it 127 there; a caller with more writes than that splits them.
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }

    /// The most bytes one transaction may hold ([`usize::MAX`]: no limit), each operation
    /// counted by [`Store::op_bytes`].
    fn max_txn_bytes(&self) -> usize {
        usize::MAX
    }

    /// What one operation counts against [`Store::max_txn_bytes`]: a put of `value_len`
    /// bytes at `key` (`None`: a delete), under `expect`. Its key and value by default; a
    /// backend with a request limit counts what the operation adds to its request (framing,
    /// the precondition's compare and read-back), a wrapper what it does to the value.
    fn op_bytes(&self, key: &str, value_len: Option<usize>, expect: Expect) -> usize {
        let _ = expect;
        key.len() + value_len.unwrap_or(0)
    }

    /// Every key starting with `prefix`.
    fn list_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<KeyValue>, StoreError>> + Send {
        let end = crate::keys::prefix_end(prefix);
        let start = prefix.to_owned();
        async move { self.range(&start, &end, usize::MAX).await }
    }
}

/// Checks `expect` against the key's current mod revision (`None` = absent).
pub(crate) fn check(key: &str, expect: Expect, found: Option<u64>) -> Result<(), StoreError> {
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Revision(r) => found == Some(r),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key: key.to_owned(),
            expected: expect,
            found,
        })
    }
}
