//! Idempotency keys expire: a retry after the TTL creates a new run, the sweep deletes expired
//! keys (a bounded number per call), and a key reused since stays.

use super::*;
use crate::engine::idempotency;

const HOUR: i64 = 3_600_000;

fn config_ttl_one_hour() -> Config {
    Config {
        idempotency_ttl: Duration::from_secs(3600),
        ..config()
    }
}

async fn stored_keys<S: Store>(s: &Scheduler<S>, prefix: &str) -> usize {
    s.store.list_prefix(prefix).await.expect("list").len()
}

#[tokio::test]
async fn an_expired_key_creates_a_new_run_and_the_sweep_deletes_it() {
    let s = Scheduler::open(MemoryStore::new(), config_ttl_one_hour())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let create = |now: i64| {
        let (s, id) = (s.clone(), runner.id.clone());
        async move {
            s.create_run_with_key_at(P, &id, RunOverrides::default(), Some("k"), now)
                .await
                .expect("create")
        }
    };
    // Expiry counts from the run's creation, the time in its UUIDv7 id.
    let created = |run: &Run| idempotency::created_at_millis(&run.id).expect("a v7 id");
    let (first, replayed) = create(now_unix_millis()).await;
    assert!(!replayed);
    let expires = created(&first) + HOUR;
    let (again, replayed) = create(expires - 1).await;
    assert!(replayed && again.id == first.id, "replays within the TTL");

    // At the TTL: a new run, and the key names it now (created a few ms after the first, so
    // still live at the same instant).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (second, replayed) = create(expires).await;
    assert!(
        !replayed && second.id != first.id,
        "an expired key does not replay"
    );
    assert!(created(&second) > created(&first));
    let (third, replayed) = create(expires).await;
    assert!(
        replayed && third.id == second.id,
        "the reused key replays the new run"
    );

    // The first run's key has expired but was reused: the sweep drops only the first's expiry
    // entry and keeps the key.
    assert_eq!(s.sweep_idempotency(expires).await.expect("sweep"), 0);
    assert_eq!(stored_keys(&s, "idempotency/").await, 1);
    assert_eq!(stored_keys(&s, keys::IDEMPOTENCY_EXPIRY).await, 1);
    let (fourth, replayed) = create(expires).await;
    assert!(replayed && fourth.id == second.id);

    // Once the second run's key has expired too, the sweep deletes it and its entry.
    let much_later = created(&second) + HOUR;
    assert_eq!(s.sweep_idempotency(much_later).await.expect("sweep"), 1);
    assert_eq!(stored_keys(&s, "idempotency/").await, 0);
    assert_eq!(stored_keys(&s, keys::IDEMPOTENCY_EXPIRY).await, 0);
    assert!(
        s.state.lock().await.idempotency.is_empty(),
        "memory forgets the swept key"
    );
    let (fifth, replayed) = create(much_later).await;
    assert!(!replayed && fifth.id != second.id);
}

#[tokio::test]
async fn a_restarted_scheduler_replaces_an_expired_key_it_never_saw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, first) = {
        let s = Scheduler::open(
            EmbeddedStore::open(&path).expect("store"),
            config_ttl_one_hour(),
        )
        .await
        .expect("open");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let (run, _) = s
            .create_run_with_key(P, &runner.id, RunOverrides::default(), Some("k"))
            .await
            .expect("create");
        (runner.id, run.id)
    };
    let s = Scheduler::open(
        EmbeddedStore::open(&path).expect("store"),
        config_ttl_one_hour(),
    )
    .await
    .expect("reopen");
    let now = now_unix_millis();
    let (run, replayed) = s
        .create_run_with_key_at(P, &runner_id, RunOverrides::default(), Some("k"), now)
        .await
        .expect("create");
    assert!(
        replayed && run.id == first,
        "a new process replays a live key"
    );
    let (run, replayed) = s
        .create_run_with_key_at(
            P,
            &runner_id,
            RunOverrides::default(),
            Some("k"),
            now + 2 * HOUR,
        )
        .await
        .expect("an expired stored key is overwritten, not a conflict");
    assert!(!replayed && run.id != first);
    let (again, replayed) = s
        .create_run_with_key(P, &runner_id, RunOverrides::default(), Some("k"))
        .await
        .expect("create");
    assert!(replayed && again.id == run.id);
}

#[tokio::test]
async fn one_sweep_is_bounded_and_later_sweeps_finish_the_work() {
    let s = Scheduler::open(MemoryStore::new(), config_ttl_one_hour())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let bound = idempotency::SWEEP_PAGE * idempotency::SWEEP_PAGES;
    let total = bound + idempotency::SWEEP_PAGE + 7;
    // Keys as `create_run_with_key` stages them (without the runs: they play no part here).
    let done = {
        let mut st = s.state.lock().await;
        for i in 0..total {
            let run_id = uuid::Uuid::now_v7().to_string();
            st.stage_idempotency_key(&runner.id, &format!("hash-{i}"), &run_id, false);
        }
        s.flush(&mut st)
    };
    committed(done).await.expect("commit");
    let later = now_unix_millis() + 2 * HOUR;
    assert_eq!(s.sweep_idempotency(later).await.expect("sweep"), bound);
    assert_eq!(stored_keys(&s, "idempotency/").await, total - bound);
    assert_eq!(
        s.sweep_idempotency(later).await.expect("sweep"),
        total - bound
    );
    assert_eq!(stored_keys(&s, "idempotency/").await, 0);
    assert_eq!(stored_keys(&s, keys::IDEMPOTENCY_EXPIRY).await, 0);
    assert_eq!(s.sweep_idempotency(later).await.expect("sweep"), 0);
}

/// Two requests with one key at once (a client that gave up on the first and sent it again): the
/// second, arriving while the first's run is staged but not yet durable, replays that run once
/// it is durable. It used to read the run from the store at once and answer "not found".
#[tokio::test]
async fn a_replay_of_a_run_still_on_its_way_to_the_store_waits_for_it() {
    let store = super::logs::HeldCommits::default();
    let s = Scheduler::open(store.clone(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let create = || {
        let (s, id) = (s.clone(), runner.id.clone());
        tokio::spawn(async move {
            s.create_run_with_key(P, &id, RunOverrides::default(), Some("k"))
                .await
        })
    };
    store.hold();
    let first = create();
    while store.waiting().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = create();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !second.is_finished(),
        "the replay answered before the first run was durable: {:?}",
        second.await
    );
    store.release();
    let (a, a_replayed) = first.await.expect("join").expect("first");
    let (b, b_replayed) = second.await.expect("join").expect("the replay");
    assert!(!a_replayed && b_replayed, "the second is the replay");
    assert_eq!(a.id, b.id, "one run for one key");
}
