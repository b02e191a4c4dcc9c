//! An in-memory [`Store`] for unit tests. Same semantics as the real backends (the conformance
//! suite runs against it), no durability. An expired key is invisible at once; each commit
//! deletes up to [`SWEEP_BATCH`] expired keys.

use super::{check, KeyValue, Op, Store, StoreError, Txn};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

/// The most expired keys one commit deletes.
const SWEEP_BATCH: usize = 64;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    kv: BTreeMap<String, Entry>,
    /// Keys with an expiry, by when it falls.
    expiring: BTreeSet<(Instant, String)>,
}

struct Entry {
    kv: KeyValue,
    expires_at: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> Option<&KeyValue> {
        match self.expires_at {
            Some(at) if at <= now => None,
            _ => Some(&self.kv),
        }
    }
}

impl Inner {
    fn live(&self, key: &str, now: Instant) -> Option<&KeyValue> {
        self.kv.get(key).and_then(|e| e.live(now))
    }

    /// Deletes up to [`SWEEP_BATCH`] keys whose expiry has passed.
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_BATCH {
            let Some((at, key)) = self.expiring.first().cloned() else {
                return;
            };
            if at > now {
                return;
            }
            self.expiring.pop_first();
            if self.kv.get(&key).and_then(|e| e.expires_at) == Some(at) {
                self.kv.remove(&key);
            }
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a test panicked mid-write; the data is still usable for reads.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().live(key, Instant::now()).cloned())
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.live_range(start, end, limit, false))
    }

    async fn range_rev(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.live_range(start, end, limit, true))
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        std::future::ready(self.apply(txn))
    }
}

impl MemoryStore {
    /// The live keys of `[start, end)`, ascending or descending, at most `limit`.
    fn live_range(&self, start: &str, end: &str, limit: usize, descending: bool) -> Vec<KeyValue> {
        if start >= end {
            return vec![];
        }
        let inner = self.lock();
        let now = Instant::now();
        let range = inner.kv.range(start.to_owned()..end.to_owned());
        let entries: Box<dyn Iterator<Item = _>> = if descending {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        entries
            .filter_map(|(_, e)| e.live(now).cloned())
            .take(limit)
            .collect()
    }

    fn apply(&self, txn: Txn) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.sweep(now);
        for op in &txn.ops {
            let (Op::Put { key, expect, .. } | Op::Delete { key, expect }) = op;
            check(key, *expect, inner.live(key, now).map(|kv| kv.mod_revision))?;
        }
        if txn.ops.is_empty() {
            return Ok(inner.revision);
        }
        inner.revision += 1;
        let rev = inner.revision;
        for op in txn.ops {
            match op {
                Op::Put {
                    key, value, ttl, ..
                } => {
                    let create_revision =
                        inner.live(&key, now).map_or(rev, |kv| kv.create_revision);
                    let expires_at = ttl.map(|ttl| now + ttl);
                    if let Some(at) = expires_at {
                        inner.expiring.insert((at, key.clone()));
                    }
                    inner.kv.insert(
                        key.clone(),
                        Entry {
                            kv: KeyValue {
                                key,
                                value,
                                mod_revision: rev,
                                create_revision,
                            },
                            expires_at,
                        },
                    );
                }
                Op::Delete { key, .. } => {
                    inner.kv.remove(&key);
                }
            }
        }
        Ok(rev)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conforms() {
        super::super::conformance::run_all(&super::MemoryStore::new()).await;
    }
}
