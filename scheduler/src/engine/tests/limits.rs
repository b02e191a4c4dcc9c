//! A store that takes only small transactions (etcd: 127 operations per request): one engine
//! operation that stages more — a batch of runs, a pass placing many runs, many runs waiting —
//! is split between units (a run's record stays with its index entries), and never fails.

use super::*;
use berth_core::store::{KeyValue, StoreError};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Refuses any transaction over `max` operations, as etcd refuses a request over its limit.
#[derive(Clone)]
struct Limited {
    inner: Arc<MemoryStore>,
    max: usize,
    largest: Arc<AtomicUsize>,
}

impl Store for Limited {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.range(start, end, limit).await
    }

    fn max_txn_ops(&self) -> usize {
        self.max
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        let n = txn.ops.len();
        self.largest.fetch_max(n, Ordering::SeqCst);
        let refused = n > self.max;
        let submitted = self.inner.submit(txn);
        async move {
            if refused {
                return Err(StoreError::Backend(format!("{n} operations: too many")));
            }
            submitted.await
        }
    }
}

#[tokio::test]
async fn operations_larger_than_one_transaction_are_split_between_units() {
    let store = Limited {
        inner: Arc::new(MemoryStore::new()),
        max: 12,
        largest: Arc::default(),
    };
    let s = Scheduler::open(store.clone(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    // 60 runs in one operation (each: record, runner index, active index).
    let runs = s
        .create_runs(P, &runner.id, vec![RunOverrides::default(); 60])
        .await
        .expect("a batch larger than one transaction");
    // Every run waits: one pass writes nothing per waiting run, and they say why.
    let waiting = s.get_run(P, &runner.id, &runs[59].id).await.expect("get");
    assert!(
        waiting
            .pending_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("no node in fra")),
        "{:?}",
        waiting.pending_reason
    );
    // A node with room for 40: one pass assigns 40 runs in one operation.
    let mut reg = register("fra-1", "fra", 40 * 512, &[]);
    reg.max_concurrent_runs = 40;
    let mut node = attach(&s, reg).await;
    for _ in 0..40 {
        next_assign(&mut node);
    }
    assert!(
        store.largest.load(Ordering::SeqCst) <= 12,
        "a transaction over the limit was sent"
    );
    s.assert_index_consistent().await;
    // Nothing lost: a new scheduler over the same store finds all 60 active, 40 assigned.
    let again = Scheduler::open(store.clone(), config())
        .await
        .expect("reopen");
    assert_eq!(again.active_run_count().await, 60);
    let mut assigned = 0;
    for r in &runs {
        let r = again.get_run(P, &runner.id, &r.id).await.expect("get");
        assigned += usize::from(r.node_id.is_some());
    }
    assert_eq!(assigned, 40);
}

#[test]
fn splitting_keeps_units_whole_and_in_order() {
    let put = |k: &str| berth_core::store::Op::Put {
        key: k.to_owned(),
        value: vec![0; 10],
        expect: Expect::Any,
        ttl: None,
    };
    let txn = Txn {
        ops: ["a1", "a2", "b1", "b2", "b3", "c1", "d1", "d2"]
            .iter()
            .map(|k| put(k))
            .collect(),
    };
    let keys = |t: &Txn| -> Vec<String> {
        t.ops
            .iter()
            .map(|op| match op {
                berth_core::store::Op::Put { key, .. }
                | berth_core::store::Op::Delete { key, .. } => key.clone(),
            })
            .collect()
    };
    let store = MemoryStore::new();
    let size = |op: &berth_core::store::Op| op.bytes(&store);
    let parts = split_at_units(txn.clone(), &[2, 5, 6], 4, usize::MAX, size);
    let got: Vec<Vec<String>> = parts.iter().map(keys).collect();
    assert_eq!(
        got,
        vec![
            vec!["a1", "a2"],
            vec!["b1", "b2", "b3", "c1"],
            vec!["d1", "d2"]
        ]
    );
    // Within the limits: one transaction, untouched.
    assert_eq!(
        split_at_units(txn.clone(), &[2, 5, 6], 100, usize::MAX, size),
        vec![txn.clone()]
    );
    // By bytes too (each op 12 bytes): at most 3 ops a part.
    let parts = split_at_units(txn.clone(), &[1, 2, 3, 4, 5, 6, 7], usize::MAX, 36, size);
    assert!(parts.iter().all(|p| p.ops.len() <= 3));
    assert_eq!(parts.iter().map(|p| p.ops.len()).sum::<usize>(), 8);
    // A unit larger than the limit stays whole.
    let parts = split_at_units(txn, &[5], 2, usize::MAX, size);
    assert_eq!(
        parts.iter().map(|p| p.ops.len()).collect::<Vec<_>>(),
        vec![5, 3]
    );
}
