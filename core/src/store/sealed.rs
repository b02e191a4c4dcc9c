//! A [`Store`] wrapper that seals the values under chosen key prefixes (with
//! [`SecretKey`](crate::secrets::SecretKey)) on the way in and unseals them on the way out, so
//! records holding secrets — runners' and runs' environment values — are encrypted at rest
//! whatever the backend. Keys, revisions and preconditions pass through untouched.

use super::{KeyValue, Op, Store, StoreError, Txn};
use crate::secrets::SecretKey;
use std::future::Future;
use std::sync::Arc;

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

    /// Opens a value under a sealed prefix. Anything else there — plaintext, a value sealed
    /// for another key — is refused: a value that is not sealed was not written by this
    /// store, and reading it would let whoever wrote it feed the scheduler records.
    fn open(&self, mut kv: KeyValue) -> Result<KeyValue, StoreError> {
        if !self.sealed(&kv.key) {
            return Ok(kv);
        }
        if !SecretKey::is_sealed(&kv.value) {
            return Err(StoreError::Backend(format!(
                "{} holds a value that is not sealed under a sealed prefix; refusing it",
                kv.key
            )));
        }
        let text = std::str::from_utf8(&kv.value)
            .map_err(|_| StoreError::Backend(format!("sealed value of {} is not text", kv.key)))?;
        kv.value = self
            .key
            .open(&kv.key, text)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", kv.key)))?;
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

    async fn range_rev(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let kvs = self.inner.range_rev(start, end, limit).await?;
        kvs.into_iter().map(|kv| self.open(kv)).collect()
    }

    fn max_txn_ops(&self) -> usize {
        self.inner.max_txn_ops()
    }

    fn max_txn_bytes(&self) -> usize {
        self.inner.max_txn_bytes()
    }

    /// A sealed value is larger than the plaintext (nonce, tag, text encoding): counted at the
    /// size the inner store will see.
    fn op_bytes(&self, key: &str, value_len: Option<usize>, expect: super::Expect) -> usize {
        let value_len = value_len.map(|n| {
            if self.sealed(key) {
                SecretKey::sealed_len(n)
            } else {
                n
            }
        });
        self.inner.op_bytes(key, value_len, expect)
    }

    /// Seals every put under a sealed prefix, bound to its key. If sealing fails the whole
    /// transaction fails: nothing is ever stored in clear or empty instead.
    fn submit(&self, txn: Txn) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static {
        let ops: Result<Vec<Op>, StoreError> =
            txn.ops
                .into_iter()
                .map(|op| match op {
                    Op::Put {
                        key,
                        value,
                        expect,
                        ttl,
                    } if self.sealed(&key) => {
                        let sealed = self.key.seal(&key, &value).map_err(|e| {
                            StoreError::Backend(format!("sealing {key} failed: {e}"))
                        })?;
                        Ok(Op::Put {
                            value: sealed.into_bytes(),
                            key,
                            expect,
                            ttl,
                        })
                    }
                    other => Ok(other),
                })
                .collect();
        let submitted = ops.map(|ops| self.inner.submit(Txn { ops }));
        async move { submitted?.await }
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

    /// Plaintext under a sealed prefix (written around the store, or by a build without
    /// sealing), and a sealed value moved to another key, are refused, loudly.
    #[tokio::test]
    async fn plaintext_or_a_moved_value_under_a_sealed_prefix_is_refused() {
        let key = Arc::new(SecretKey::generate());
        let store = SealedStore::new(MemoryStore::new(), key, &["runs/"]);
        store
            .inner
            .commit(Txn::new().put("runs/plain", br#"{"legacy":true}"#.to_vec(), Expect::Absent))
            .await
            .expect("seed");
        let refused = store.get("runs/plain").await;
        assert!(
            matches!(&refused, Err(StoreError::Backend(m)) if m.contains("not sealed")),
            "{refused:?}"
        );
        assert!(
            store.list_prefix("runs/").await.is_err(),
            "a range fails too"
        );

        store
            .commit(Txn::new().put("runs/a", b"secret-a".to_vec(), Expect::Absent))
            .await
            .expect("commit");
        let raw = store
            .inner
            .get("runs/a")
            .await
            .expect("get")
            .expect("present");
        assert!(SecretKey::is_sealed(&raw.value), "sealed underneath");
        store
            .inner
            .commit(Txn::new().put("runs/b", raw.value, Expect::Absent))
            .await
            .expect("copy");
        assert!(store.get("runs/b").await.is_err(), "bound to runs/a");
        let a = store.get("runs/a").await.expect("get").expect("present");
        assert_eq!(a.value, b"secret-a".to_vec());
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
