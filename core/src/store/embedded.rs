//! The embedded [`Store`]: one redb file, ACID, fsync on every commit. The default on a single
//! machine; the scheduler is its only user (one process owns the file).

use super::{check, KeyValue, Op, Store, StoreError, Txn};
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Each value is stored behind a header of mod revision and create revision.
const HEADER: usize = 16;

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < HEADER {
        return Err(backend(format!("value of {key} is truncated")));
    }
    let (head, value) = raw.split_at(HEADER);
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&head[..8]);
    b.copy_from_slice(&head[8..]);
    Ok(KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        mod_revision: u64::from_le_bytes(a),
        create_revision: u64::from_le_bytes(b),
    })
}

fn encode(mod_revision: u64, create_revision: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path).map_err(backend)?;
        let tx = db.begin_write().map_err(backend)?;
        {
            tx.open_table(KV).map_err(backend)?;
            tx.open_table(META).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let found = table.get(key).map_err(backend)?;
        found.map(|v| decode(key, v.value())).transpose()
    }

    fn range_blocking(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if start >= end {
            return Ok(vec![]);
        }
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.range(start..end).map_err(backend)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(backend)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn commit_blocking(&self, txn: Txn) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let rev = {
            let mut kv = tx.open_table(KV).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            let current = meta
                .get(REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value());
            let mut found = Vec::with_capacity(txn.ops.len());
            for op in &txn.ops {
                let (Op::Put { key, expect, .. } | Op::Delete { key, expect }) = op;
                let existing = kv.get(key.as_str()).map_err(backend)?;
                let existing = existing.map(|v| decode(key, v.value())).transpose()?;
                check(key, *expect, existing.as_ref().map(|e| e.mod_revision))?;
                found.push(existing.map(|e| e.create_revision));
            }
            if txn.ops.is_empty() {
                return Ok(current);
            }
            let rev = current + 1;
            for (op, create) in txn.ops.into_iter().zip(found) {
                match op {
                    Op::Put { key, value, .. } => {
                        let create = create.unwrap_or(rev);
                        kv.insert(key.as_str(), encode(rev, create, &value).as_slice())
                            .map_err(backend)?;
                    }
                    Op::Delete { key, .. } => {
                        kv.remove(key.as_str()).map_err(backend)?;
                    }
                }
            }
            meta.insert(REVISION, rev).map_err(backend)?;
            rev
        };
        tx.commit().map_err(backend)?;
        Ok(rev)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(this))
            .await
            .map_err(backend)?
    }
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| s.get_blocking(&key)).await
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (start, end) = (start.to_owned(), end.to_owned());
        self.blocking(move |s| s.range_blocking(&start, &end, limit))
            .await
    }

    async fn commit(&self, txn: Txn) -> Result<u64, StoreError> {
        self.blocking(move |s| s.commit_blocking(txn)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Expect;

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open");
        crate::store::conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).expect("open");
            store
                .commit(Txn::new().put("a", b"1".to_vec(), Expect::Absent))
                .await
                .expect("commit")
        };
        let store = EmbeddedStore::open(&path).expect("reopen");
        let kv = store.get("a").await.expect("get").expect("present");
        assert_eq!((kv.value, kv.mod_revision), (b"1".to_vec(), rev));
        let next = store
            .commit(Txn::new().put("b", b"2".to_vec(), Expect::Any))
            .await
            .expect("commit");
        assert_eq!(next, rev + 1, "the revision counter survives a restart");
    }
}
