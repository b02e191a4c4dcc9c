//! Logs as stored chunks: pages across chunk boundaries, re-sent batches stored once however
//! they are cut, logs written one key per line by an older build, and retention.

use super::*;
use berth_core::log_chunks;
use berth_core::model::LogEntry;
use berth_core::store::{StoreError, Txn};

fn line(seq: u64, msg: &str) -> LogLine {
    LogLine {
        seq,
        stream: if seq.is_multiple_of(3) {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        msg: msg.into(),
        ts_unix_nanos: 1_000 + seq as i64,
    }
}

fn batch(run_id: &str, seqs: impl IntoIterator<Item = u64>) -> LogBatch {
    LogBatch {
        run_id: run_id.to_owned(),
        lines: seqs
            .into_iter()
            .map(|seq| line(seq, &format!("line {seq}")))
            .collect(),
    }
}

/// A scheduler with one started run on `ams-1`: it, the runner id, the run id, and the node's
/// command channel (kept open by the caller).
async fn started_run<S: Store>(
    store: S,
    config: Config,
) -> (Arc<Scheduler<S>>, String, String, Rx) {
    let s = Scheduler::open(store, config).await.expect("open");
    let mut ams = attach(&s, register("ams-1", "ams", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut ams);
    s.run_started("ams-1", started(&a)).await.expect("started");
    (s, runner.id, a.run_id, ams)
}

async fn all_lines<S: Store>(s: &Scheduler<S>, runner: &str, run: &str, page: usize) -> Vec<u64> {
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let (lines, more) = s
            .list_logs(P, runner, run, after, page)
            .await
            .expect("logs");
        after = lines.last().map_or(after, |l| l.id);
        seen.extend(lines.iter().map(|l| l.id));
        if !more {
            return seen;
        }
        assert!(!lines.is_empty(), "more, but an empty page");
    }
}

async fn stored_keys<S: Store>(s: &Scheduler<S>, run: &str) -> Vec<berth_core::store::KeyValue> {
    s.store
        .list_prefix(&keys::logs_prefix(run))
        .await
        .expect("list")
}

/// The ids of every line stored for `run`, ascending (a line stored twice is there twice).
async fn stored_ids<S: Store>(s: &Scheduler<S>, run: &str) -> Vec<u64> {
    let mut stored: Vec<u64> = Vec::new();
    for kv in stored_keys(s, run).await {
        stored.extend(
            log_chunks::decode(&kv.value)
                .expect("decode")
                .iter()
                .map(|l| l.id),
        );
    }
    stored.sort_unstable();
    stored
}

#[tokio::test]
async fn pages_start_anywhere_inside_a_chunk_and_run_across_chunk_boundaries() {
    let (s, runner, run, _node) = started_run(MemoryStore::new(), config()).await;
    // Batches of 7, 1 and 2500 lines: chunks of 7, 1, 1024, 1024 and 452.
    s.append_logs("ams-1", batch(&run, 1..=7)).await.expect("a");
    s.append_logs("ams-1", batch(&run, 8..=8)).await.expect("b");
    s.append_logs("ams-1", batch(&run, 9..=2508))
        .await
        .expect("c");
    let chunks = stored_keys(&s, &run).await;
    assert_eq!(chunks.len(), 5, "one key per chunk, not per line");
    assert!(chunks.iter().all(|kv| kv.value[0] == log_chunks::FORMAT_V1));
    assert!(
        chunks[0].key.ends_with(&format!("{:020}", 7)),
        "keyed by last seq"
    );
    for after in [0u64, 3, 6, 7, 8, 9, 1031, 1032, 1033, 2507, 2508, 5000] {
        let (page, more) = s
            .list_logs(P, &runner, &run, after, 10)
            .await
            .expect("page");
        let want: Vec<u64> = (after + 1..=(after + 10).min(2508)).collect();
        let got: Vec<u64> = page.iter().map(|l| l.id).collect();
        assert_eq!(got, want, "after {after}");
        assert_eq!(more, after + 10 < 2508, "more after {after}");
        for l in &page {
            assert_eq!(l.msg, format!("line {}", l.id));
            assert_eq!(l.ts_unix_nanos, 1_000 + l.id as i64);
        }
    }
    for page in [1, 7, 100, 1000] {
        assert_eq!(
            all_lines(&s, &runner, &run, page).await,
            (1..=2508).collect::<Vec<_>>(),
            "page of {page}"
        );
    }
}

/// An agent re-sends what was not acknowledged; after a restart it re-reads its journal and
/// may cut the same lines into other batches. Each line is still stored once.
#[tokio::test]
async fn a_re_sent_batch_however_cut_stores_each_line_once() {
    let (s, runner, run, _node) = started_run(MemoryStore::new(), config()).await;
    s.append_logs("ams-1", batch(&run, 1..=10))
        .await
        .expect("first");
    s.append_logs("ams-1", batch(&run, 1..=10))
        .await
        .expect("same");
    s.append_logs("ams-1", batch(&run, 5..=15))
        .await
        .expect("overlap");
    s.append_logs("ams-1", batch(&run, [3, 12, 20, 18, 16, 17, 19]))
        .await
        .expect("mixed");
    // A gap (21..=24 not yet sent), later filled by a re-send around it.
    s.append_logs("ams-1", batch(&run, 25..=30))
        .await
        .expect("after a gap");
    s.append_logs("ams-1", batch(&run, 19..=32))
        .await
        .expect("filling");
    let mut stored: Vec<u64> = Vec::new();
    for kv in stored_keys(&s, &run).await {
        stored.extend(
            log_chunks::decode(&kv.value)
                .expect("decode")
                .iter()
                .map(|l| l.id),
        );
    }
    assert_eq!(
        stored,
        (1..=32).collect::<Vec<_>>(),
        "each line exactly once"
    );
    assert_eq!(
        all_lines(&s, &runner, &run, 4).await,
        (1..=32).collect::<Vec<_>>()
    );
}

/// Two deliveries of one batch at the same time (an old session still handling it while the
/// agent's new session re-sends it) store it once: the check and the write are serialised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_of_one_batch_store_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open");
    let (s, _runner, run, _node) = started_run(store, config()).await;
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let s = s.clone();
        let b = batch(&run, (1 + i * 10)..=(100 + i * 10));
        tasks.push(tokio::spawn(async move { s.append_logs("ams-1", b).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    let stored = stored_ids(&s, &run).await;
    assert_eq!(stored, (1..=170).collect::<Vec<_>>());
    assert_eq!(
        s.log_appends.in_use(),
        0,
        "each run's lock goes with its last append"
    );
}

/// A store whose commits, while held, wait unseen by reads until released, then are applied in
/// the order they were submitted: commits on their way that are not durable yet.
#[derive(Clone, Default)]
pub(super) struct HeldCommits {
    inner: Arc<MemoryStore>,
    #[allow(clippy::type_complexity)]
    held: Arc<
        std::sync::Mutex<Option<Vec<(Txn, tokio::sync::oneshot::Sender<Result<u64, StoreError>>)>>>,
    >,
}

impl HeldCommits {
    pub(super) fn hold(&self) {
        *self.held.lock().expect("lock") = Some(Vec::new());
    }

    /// Transactions waiting, and their operations.
    pub(super) fn waiting(&self) -> Vec<usize> {
        let held = self.held.lock().expect("lock");
        held.iter().flatten().map(|(t, _)| t.ops.len()).collect()
    }

    pub(super) fn release(&self) {
        let held = self.held.lock().expect("lock").take();
        for (txn, done) in held.into_iter().flatten() {
            let result = futures::FutureExt::now_or_never(self.inner.submit(txn))
                .expect("the memory store commits at once");
            let _ = done.send(result);
        }
    }
}

impl Store for HeldCommits {
    async fn get(&self, key: &str) -> Result<Option<berth_core::store::KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<berth_core::store::KeyValue>, StoreError> {
        self.inner.range(start, end, limit).await
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        let mut held = self.held.lock().expect("lock");
        let (waiting, now) = match held.as_mut() {
            Some(queue) => {
                let (done, waiting) = tokio::sync::oneshot::channel();
                queue.push((txn, done));
                (Some(waiting), None)
            }
            None => (None, Some(self.inner.submit(txn))),
        };
        async move {
            match (waiting, now) {
                (Some(waiting), _) => waiting
                    .await
                    .unwrap_or_else(|_| Err(StoreError::Backend("dropped".into()))),
                (None, Some(now)) => now.await,
                (None, None) => Err(StoreError::Backend("unreachable".into())),
            }
        }
    }
}

/// A batch staged but not yet durable counts as stored: the same lines delivered again
/// meanwhile (an agent session re-sending while the first delivery's commit is on its way) are
/// not submitted a second time, and once the commits land every line is stored once.
#[tokio::test]
async fn lines_on_their_way_to_the_store_count_as_stored() {
    let store = HeldCommits::default();
    let (s, _runner, run, _node) = started_run(store.clone(), config()).await;
    store.hold();
    let first = s
        .stage_logs("ams-1", batch(&run, 1..=100))
        .await
        .expect("stage");
    let again = s
        .stage_logs("ams-1", batch(&run, 50..=150))
        .await
        .expect("stage");
    assert_eq!(
        store.waiting(),
        vec![1, 1],
        "one chunk each: 1..=100, then only 101..=150"
    );
    assert!(
        stored_keys(&s, &run).await.is_empty(),
        "nothing is durable yet"
    );
    store.release();
    first.await.expect("durable");
    again.await.expect("durable");
    let stored = stored_ids(&s, &run).await;
    assert_eq!(stored, (1..=150).collect::<Vec<_>>());
    assert_eq!(
        s.log_appends.in_use(),
        0,
        "the run's entry goes with its last commit"
    );
}

/// A store written by an older build holds one JSON line per key under the same names: those
/// runs' logs read as they are, and a run that spans the upgrade reads on into chunks.
#[tokio::test]
async fn lines_stored_one_per_key_by_an_older_build_are_still_read() {
    let (s, runner, run, _node) = started_run(MemoryStore::new(), config()).await;
    let mut txn = Txn::new();
    for seq in 1..=5u64 {
        let old = LogEntry {
            id: seq,
            stream: LogStream::Stdout,
            msg: format!("old {seq}"),
            ts_unix_nanos: 7,
        };
        txn = txn.put(
            keys::log(&run, seq),
            serde_json::to_vec(&old).expect("json"),
            Expect::Any,
        );
    }
    s.store.commit(txn).await.expect("seed");
    // The agent re-sends 4..=5 and goes on: old lines are not stored twice.
    s.append_logs("ams-1", batch(&run, 4..=9))
        .await
        .expect("append");
    let (page, more) = s.list_logs(P, &runner, &run, 2, 100).await.expect("logs");
    let got: Vec<(u64, &str)> = page.iter().map(|l| (l.id, l.msg.as_str())).collect();
    assert_eq!(
        got,
        [
            (3, "old 3"),
            (4, "old 4"),
            (5, "old 5"),
            (6, "line 6"),
            (7, "line 7"),
            (8, "line 8"),
            (9, "line 9")
        ]
    );
    assert!(!more);
    assert_eq!(
        stored_keys(&s, &run).await.len(),
        6,
        "5 old keys and 1 chunk"
    );
}

#[tokio::test]
async fn secret_values_are_redacted_in_stored_chunks() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut ams = attach(&s, register("ams-1", "ams", 4096, &[])).await;
    let mut with_secret = spec("ams", "standard-s");
    with_secret.env_variables.push(EnvVar {
        env_key: "TOKEN".into(),
        env_val: "hunter2-very-secret".into(),
        secret: true,
    });
    let (runner, _) = s.create_runner(P, with_secret).await.expect("runner");
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut ams);
    s.run_started("ams-1", started(&a)).await.expect("started");
    let b = LogBatch {
        run_id: a.run_id.clone(),
        lines: vec![line(1, "token=hunter2-very-secret ok")],
    };
    s.append_logs("ams-1", b).await.expect("append");
    let (page, _) = s
        .list_logs(P, &runner.id, &a.run_id, 0, 10)
        .await
        .expect("logs");
    assert_eq!(page[0].msg, format!("token={REDACTED} ok"));
    for kv in stored_keys(&s, &a.run_id).await {
        let lines = log_chunks::decode(&kv.value).expect("decode");
        assert!(lines.iter().all(|l| !l.msg.contains("hunter2")));
    }
}

/// Lines expire after the configured retention (the store's expiring puts; the conformance
/// suite checks each backend honours them).
#[tokio::test]
async fn lines_expire_after_the_log_retention() {
    let config = Config {
        log_retention: Some(Duration::from_millis(300)),
        ..config()
    };
    let (s, runner, run, _node) = started_run(MemoryStore::new(), config).await;
    s.append_logs("ams-1", batch(&run, 1..=3))
        .await
        .expect("append");
    assert_eq!(all_lines(&s, &runner, &run, 10).await, [1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(all_lines(&s, &runner, &run, 10).await.is_empty(), "expired");
    let (keep, runner, run, _kept_node) = started_run(
        MemoryStore::new(),
        Config {
            log_retention: None,
            ..super::config()
        },
    )
    .await;
    keep.append_logs("ams-1", batch(&run, 1..=3))
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        all_lines(&keep, &runner, &run, 10).await,
        [1, 2, 3],
        "kept for ever"
    );
}
