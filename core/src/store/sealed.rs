//! A [`Store`] wrapper that seals the values under chosen key prefixes (with
//! [`SecretKey`](crate::secrets::SecretKey)) on the way in and unseals them on the way out, so
//! records holding secrets — runners' and runs' environment values — are encrypted at rest
//! whatever the backend. Keys, revisions and preconditions pass through untouched.

use super::{KeyValue, Op, Store, StoreError, Txn};
use crate::secrets::SecretKey;
use std::future::Future;
use std::sync::Arc;

const SEALED_PREFIX: &[u8] = b"v1:";

pub struct SealedStore<S> {
    inner: S,
    key: Arc<SecretKey>,
    prefixes: Vec<String>,
}

impl<S: Store> SealedStore<S> {
    pub fn new(inner: S, key: Arc<SecretKey>, prefixes: &[&str]) -> SealedStore<S> {
        SealedStore {
            inner,
            key,
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn sealed(&self, key: &str) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }

    fn open(&self, mut kv: KeyValue) -> Result<KeyValue, StoreError> {
        // A value written before sealing was turned on is plain JSON (it cannot start with the
        // sealed form's `v1:`): read it as it is; the next write of the key seals it.
        if self.sealed(&kv.key) && kv.value.starts_with(SEALED_PREFIX) {
            let text = std::str::from_utf8(&kv.value).map_err(|_| {
                StoreError::Backend(format!("sealed value of {} is not text", kv.key))
            })?;
            kv.value = self
                .key
                .open(text)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", kv.key)))?
                .into_bytes();
        }
        Ok(kv)
    }
}

impl<S: Store> Store for SealedStore<S> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner
            .get(key)
            .await?
            .map(|kv| self.open(kv))
            .transpose()
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let kvs = self.inner.range(start, end, limit).await?;
        kvs.into_iter().map(|kv| self.open(kv)).collect()
    }

    fn max_txn_ops(&self) -> usize {
        self.inner.max_txn_ops()
    }

    /// Sealing grows a value (nonce, tag, encoding): leave half of the inner limit.
    fn max_txn_bytes(&self) -> usize {
        self.inner.max_txn_bytes() / 2
    }

    fn submit(&self, txn: Txn) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static {
        let ops = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put {
                    key,
                    value,
                    expect,
                    ttl,
                } if self.sealed(&key) => {
                    let plain = String::from_utf8_lossy(&value);
                    Op::Put {
                        value: self.key.seal(&plain).into_bytes(),
                        key,
                        expect,
                        ttl,
                    }
                }
                other => other,
            })
            .collect();
        self.inner.submit(Txn { ops })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Expect, MemoryStore};

    #[tokio::test]
    async fn conforms() {
        let key = Arc::new(SecretKey::generate());
        let store = SealedStore::new(MemoryStore::new(), key, &["pg/", "tx/", "rg/", "ex/"]);
        crate::store::conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn records_written_before_sealing_are_still_read_and_sealed_on_their_next_write() {
        let key = Arc::new(SecretKey::generate());
        let inner = MemoryStore::new();
        inner
            .commit(Txn::new().put("runs/old", br#"{"legacy":true}"#.to_vec(), Expect::Absent))
            .await
            .expect("seed");
        let store = SealedStore::new(inner, key, &["runs/"]);
        let old = store.get("runs/old").await.expect("get").expect("present");
        assert_eq!(old.value, br#"{"legacy":true}"#.to_vec());
        store
            .commit(Txn::new().put("runs/old", br#"{"legacy":false}"#.to_vec(), Expect::Any))
            .await
            .expect("rewrite");
        let raw = store
            .inner
            .get("runs/old")
            .await
            .expect("get")
            .expect("present");
        assert!(raw.value.starts_with(SEALED_PREFIX), "sealed on rewrite");
        let back = store.get("runs/old").await.expect("get").expect("present");
        assert_eq!(back.value, br#"{"legacy":false}"#.to_vec());
    }

    #[tokio::test]
    async fn sealed_prefixes_are_ciphertext_underneath() {
        let key = Arc::new(SecretKey::generate());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let inner = crate::store::EmbeddedStore::open(&path).expect("open");
            let store = SealedStore::new(inner, key.clone(), &["runs/"]);
            let txn = Txn::new()
                .put(
                    "runs/a",
                    br#"{"env":"TOPSECRET-VALUE"}"#.to_vec(),
                    Expect::Absent,
                )
                .put("logs/a", b"PLAINLINE-VALUE".to_vec(), Expect::Absent);
            store.commit(txn).await.expect("commit");
            let back = store.get("runs/a").await.expect("get").expect("present");
            assert_eq!(back.value, br#"{"env":"TOPSECRET-VALUE"}"#.to_vec());
        }
        let raw = std::fs::read(&path).expect("read");
        let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        assert!(
            !has(b"TOPSECRET-VALUE"),
            "a sealed prefix is not stored in clear"
        );
        assert!(has(b"PLAINLINE-VALUE"), "other prefixes are untouched");
    }
}
