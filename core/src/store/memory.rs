//! An in-memory [`Store`] for unit tests. Same semantics as the real backends (the conformance
//! suite runs against it), no durability.

use super::{check, KeyValue, Op, Store, StoreError, Txn};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    kv: BTreeMap<String, KeyValue>,
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
        Ok(self.lock().kv.get(key).cloned())
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if start >= end {
            return Ok(vec![]);
        }
        let inner = self.lock();
        Ok(inner
            .kv
            .range(start.to_owned()..end.to_owned())
            .take(limit)
            .map(|(_, v)| v.clone())
            .collect())
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        std::future::ready(self.apply(txn))
    }
}

impl MemoryStore {
    fn apply(&self, txn: Txn) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        for op in &txn.ops {
            let (Op::Put { key, expect, .. } | Op::Delete { key, expect }) = op;
            check(key, *expect, inner.kv.get(key).map(|kv| kv.mod_revision))?;
        }
        if txn.ops.is_empty() {
            return Ok(inner.revision);
        }
        inner.revision += 1;
        let rev = inner.revision;
        for op in txn.ops {
            match op {
                Op::Put { key, value, .. } => {
                    let create_revision = inner.kv.get(&key).map_or(rev, |kv| kv.create_revision);
                    inner.kv.insert(
                        key.clone(),
                        KeyValue {
                            key,
                            value,
                            mod_revision: rev,
                            create_revision,
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
