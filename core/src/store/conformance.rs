//! The behaviour every [`Store`] backend must show. Each backend's tests call [`run_all`].

use super::{Expect, Store, StoreError, Txn};
use std::time::{Duration, Instant};

/// Runs every conformance check against an empty store. Panics (it is test code) on the first
/// deviation, naming it.
pub async fn run_all<S: Store>(store: &S) {
    put_get_and_revisions(store).await;
    preconditions(store).await;
    transactions_are_atomic(store).await;
    later_ops_on_a_key_win(store).await;
    ranges(store).await;
    deletes(store).await;
    submit_order_is_call_order(store).await;
    many_small_transactions(store).await;
    one_failed_precondition_among_many(store).await;
    expiring_keys(store).await;
}

async fn put_get_and_revisions<S: Store>(s: &S) {
    assert!(
        s.get("pg/a").await.expect("get").is_none(),
        "empty store has no key"
    );
    let r1 = s
        .commit(Txn::new().put("pg/a", b"1".to_vec(), Expect::Any))
        .await
        .expect("put");
    let r2 = s
        .commit(Txn::new().put("pg/a", b"2".to_vec(), Expect::Any))
        .await
        .expect("put");
    assert!(r2 > r1, "revisions grow");
    let kv = s.get("pg/a").await.expect("get").expect("present");
    assert_eq!(kv.value, b"2".to_vec());
    assert_eq!(kv.mod_revision, r2, "mod revision is the last write");
    assert_eq!(kv.create_revision, r1, "create revision is the first write");
}

async fn preconditions<S: Store>(s: &S) {
    let r = s
        .commit(Txn::new().put("pc/a", b"1".to_vec(), Expect::Absent))
        .await
        .expect("create");
    let dup = s
        .commit(Txn::new().put("pc/a", b"x".to_vec(), Expect::Absent))
        .await;
    assert!(
        matches!(dup, Err(StoreError::Conflict { .. })),
        "Absent fails when present"
    );
    let stale = s
        .commit(Txn::new().put("pc/a", b"x".to_vec(), Expect::Revision(r + 100)))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "wrong revision fails"
    );
    s.commit(Txn::new().put("pc/a", b"2".to_vec(), Expect::Revision(r)))
        .await
        .expect("cas");
    let gone = s
        .commit(Txn::new().put("pc/none", b"x".to_vec(), Expect::Revision(1)))
        .await;
    assert!(
        matches!(gone, Err(StoreError::Conflict { .. })),
        "Revision fails on a missing key"
    );
    let kv = s.get("pc/a").await.expect("get").expect("present");
    assert_eq!(kv.value, b"2".to_vec(), "failed writes changed nothing");
}

async fn transactions_are_atomic<S: Store>(s: &S) {
    s.commit(Txn::new().put("tx/existing", b"1".to_vec(), Expect::Any))
        .await
        .expect("put");
    let failed = s
        .commit(Txn::new().put("tx/new", b"1".to_vec(), Expect::Any).put(
            "tx/existing",
            b"2".to_vec(),
            Expect::Absent,
        ))
        .await;
    assert!(failed.is_err());
    assert!(
        s.get("tx/new").await.expect("get").is_none(),
        "no partial transaction"
    );
    let rev = s
        .commit(Txn::new().put("tx/new", b"1".to_vec(), Expect::Absent).put(
            "tx/other",
            b"2".to_vec(),
            Expect::Absent,
        ))
        .await
        .expect("both");
    let a = s.get("tx/new").await.expect("get").expect("present");
    let b = s.get("tx/other").await.expect("get").expect("present");
    assert_eq!(
        (a.mod_revision, b.mod_revision),
        (rev, rev),
        "one revision per transaction"
    );
}

async fn ranges<S: Store>(s: &S) {
    let mut txn = Txn::new();
    for i in [3u32, 1, 2, 10] {
        txn = txn.put(format!("rg/{i:03}"), i.to_le_bytes().to_vec(), Expect::Any);
    }
    txn = txn.put("rh/outside", vec![], Expect::Any);
    s.commit(txn).await.expect("put");
    let all = s.list_prefix("rg/").await.expect("list");
    let keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["rg/001", "rg/002", "rg/003", "rg/010"],
        "prefix read is ordered and bounded"
    );
    let page = s.range("rg/002", "rg/999", 2).await.expect("range");
    let keys: Vec<&str> = page.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["rg/002", "rg/003"],
        "range starts inclusive and honours limit"
    );
    assert!(
        s.range("rg/5", "rg/1", 10).await.expect("range").is_empty(),
        "empty when start >= end"
    );
    let back = s.range_rev("rg/", "rg/010", 2).await.expect("range_rev");
    let keys: Vec<&str> = back.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["rg/003", "rg/002"],
        "a reverse range ends exclusive, walks down and honours limit"
    );
    let back = s
        .range_rev("rg/", "rg/\u{10FFFF}", 100)
        .await
        .expect("range_rev");
    let keys: Vec<&str> = back.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["rg/010", "rg/003", "rg/002", "rg/001"],
        "the whole prefix backwards, nothing outside it"
    );
    assert!(
        s.range_rev("rg/5", "rg/1", 10)
            .await
            .expect("range_rev")
            .is_empty(),
        "empty when start >= end"
    );
}

async fn deletes<S: Store>(s: &S) {
    let r = s
        .commit(Txn::new().put("dl/a", b"1".to_vec(), Expect::Any))
        .await
        .expect("put");
    let stale = s
        .commit(Txn::new().delete("dl/a", Expect::Revision(r + 5)))
        .await;
    assert!(stale.is_err(), "delete honours its precondition");
    s.commit(Txn::new().delete("dl/a", Expect::Revision(r)))
        .await
        .expect("delete");
    assert!(s.get("dl/a").await.expect("get").is_none());
    let again = s
        .commit(Txn::new().put("dl/a", b"2".to_vec(), Expect::Absent))
        .await
        .expect("recreate");
    let kv = s.get("dl/a").await.expect("get").expect("present");
    assert_eq!(
        kv.create_revision, again,
        "a re-created key has a new create revision"
    );
    // Without a precondition: a present key goes, an absent one is no error, and the
    // transaction's other writes apply.
    s.commit(
        Txn::new()
            .delete("dl/a", Expect::Any)
            .delete("dl/never", Expect::Any)
            .put("dl/b", b"3".to_vec(), Expect::Absent),
    )
    .await
    .expect("unconditional deletes");
    assert!(s.get("dl/a").await.expect("get").is_none());
    assert!(s.get("dl/never").await.expect("get").is_none());
    assert!(s.get("dl/b").await.expect("get").is_some());
}

/// Transactions take their place in the commit order when `submit` is called, even if their
/// futures are awaited in the opposite order.
async fn submit_order_is_call_order<S: Store>(s: &S) {
    let pending: Vec<_> = (0u32..20)
        .map(|i| s.submit(Txn::new().put("so/key", i.to_le_bytes().to_vec(), Expect::Any)))
        .collect();
    let mut revisions = Vec::new();
    for fut in pending.into_iter().rev() {
        revisions.push(fut.await.expect("submit"));
    }
    revisions.reverse();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "writes of one key apply in submit order: {revisions:?}"
    );
    let kv = s.get("so/key").await.expect("get").expect("present");
    assert_eq!(
        kv.value,
        19u32.to_le_bytes().to_vec(),
        "the last submitted write wins"
    );
    assert_eq!(kv.mod_revision, revisions[19]);
}

/// More waiting transactions than one backend request may carry (etcd: 128 operations) all
/// apply, in order, with their preconditions honoured.
async fn many_small_transactions<S: Store>(s: &S) {
    let pending: Vec<_> = (0u32..300)
        .map(|i| {
            // Every tenth transaction has a precondition, so conditional and unconditional
            // ones interleave.
            let expect = if i % 10 == 0 {
                Expect::Absent
            } else {
                Expect::Any
            };
            s.submit(Txn::new().put(format!("mt/{i:04}"), vec![1, 2], expect))
        })
        .collect();
    let mut last = 0;
    for fut in pending {
        let rev = fut.await.expect("submit");
        assert!(rev >= last, "revisions follow submit order");
        last = rev;
    }
    assert_eq!(s.list_prefix("mt/").await.expect("list").len(), 300);
    let dup = s
        .commit(Txn::new().put("mt/0010", vec![], Expect::Absent))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict { .. })));
}

/// Within one transaction, the last operation on a key decides its state.
async fn later_ops_on_a_key_win<S: Store>(s: &S) {
    s.commit(
        Txn::new()
            .put("lw/a", b"1".to_vec(), Expect::Absent)
            .put("lw/a", b"2".to_vec(), Expect::Any)
            .put("lw/b", b"1".to_vec(), Expect::Any)
            .delete("lw/b", Expect::Any),
    )
    .await
    .expect("commit");
    let a = s.get("lw/a").await.expect("get").expect("present");
    assert_eq!(a.value, b"2".to_vec(), "the later put wins");
    assert!(
        s.get("lw/b").await.expect("get").is_none(),
        "the later delete wins"
    );
}

/// Among many queued transactions (which a backend may send as one request), a precondition
/// that fails fails only its own transaction; the others apply, in order.
async fn one_failed_precondition_among_many<S: Store>(s: &S) {
    s.commit(Txn::new().put("fp/25", b"taken".to_vec(), Expect::Any))
        .await
        .expect("put");
    let pending: Vec<_> = (0u8..50)
        .map(|i| s.submit(Txn::new().put(format!("fp/{i:02}"), vec![i], Expect::Absent)))
        .collect();
    let mut last = 0;
    for (i, fut) in pending.into_iter().enumerate() {
        match fut.await {
            Err(StoreError::Conflict { key, .. }) if i == 25 => assert_eq!(key, "fp/25"),
            Ok(rev) if i != 25 => {
                assert!(rev >= last, "revisions follow submit order");
                last = rev;
            }
            other => panic!("transaction {i}: {other:?}"),
        }
    }
    let all = s.list_prefix("fp/").await.expect("list");
    assert_eq!(all.len(), 50);
    assert_eq!(
        all[25].value,
        b"taken".to_vec(),
        "the failed one wrote nothing"
    );
}

/// A put with a TTL is visible until the TTL has passed and gone soon after, for reads, ranges
/// and preconditions alike; a later plain put makes a key permanent again.
async fn expiring_keys<S: Store>(s: &S) {
    let ttl = Duration::from_secs(1);
    let written = Instant::now();
    s.commit(
        Txn::new()
            .put_expiring("ex/a", b"1".to_vec(), Expect::Absent, ttl)
            .put_expiring("ex/b", b"1".to_vec(), Expect::Absent, ttl)
            .put("ex/keep", b"k".to_vec(), Expect::Absent),
    )
    .await
    .expect("expiring puts");
    let a = s
        .get("ex/a")
        .await
        .expect("get")
        .expect("visible before its TTL");
    assert_eq!(a.value, b"1".to_vec());
    assert_eq!(s.list_prefix("ex/").await.expect("list").len(), 3);
    s.commit(Txn::new().put("ex/b", b"2".to_vec(), Expect::Any))
        .await
        .expect("made permanent");
    // The bound: etcd's lease is TTL + a one-second bucket, and etcd checks leases twice a
    // second; the other backends hide the key at once.
    let deadline = written + Duration::from_secs(20);
    while s.get("ex/a").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "ex/a never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        written.elapsed() >= ttl,
        "a key lives at least its TTL ({:?})",
        written.elapsed()
    );
    let left = s.list_prefix("ex/").await.expect("list");
    let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["ex/b", "ex/keep"], "ranges skip expired keys");
    let first = s.range("ex/", "ex/z", 1).await.expect("range");
    assert_eq!(first.len(), 1, "the limit counts live keys only");
    assert_eq!(first[0].key, "ex/b");
    let again = s
        .commit(Txn::new().put("ex/a", b"3".to_vec(), Expect::Absent))
        .await
        .expect("an expired key is absent for preconditions");
    let a = s.get("ex/a").await.expect("get").expect("present");
    assert_eq!((a.value, a.create_revision), (b"3".to_vec(), again));
}
