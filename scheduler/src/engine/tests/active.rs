//! The index of active runs: it follows every run transition in the same commit as the run
//! record, `open` loads the runs it names and nothing else, and a store that predates it gets
//! it built once.

use super::*;
use berth_core::store::{KeyValue, Txn};
use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

/// A shared in-memory store that records every read, so a test can see what `open` touched.
#[derive(Clone, Default)]
pub(super) struct Watched {
    inner: Arc<MemoryStore>,
    reads: Arc<StdMutex<Vec<String>>>,
}

impl Watched {
    /// The same data, with an empty read log.
    pub(super) fn reopened(&self) -> Watched {
        Watched {
            inner: self.inner.clone(),
            reads: Arc::default(),
        }
    }

    pub(super) fn reads(&self) -> Vec<String> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn log(&self, what: String) {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

impl Store for Watched {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.log(format!("get {key}"));
        self.inner.get(key).await
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.log(format!("range {start}"));
        self.inner.range(start, end, limit).await
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        self.inner.submit(txn)
    }
}

/// The ids the stored index names.
async fn indexed<S: Store>(store: &S) -> BTreeSet<String> {
    store
        .list_prefix(keys::ACTIVE_RUNS)
        .await
        .expect("list index")
        .into_iter()
        .map(|kv| kv.key[keys::ACTIVE_RUNS.len()..].to_owned())
        .collect()
}

/// The ids of the stored runs that have not ended (the slow reference: a scan of every run).
async fn stored_active<S: Store>(store: &S) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for kv in store.list_prefix(keys::RUNS).await.expect("list runs") {
        let run: Run = serde_json::from_slice(&kv.value).expect("run record");
        if !run.status.is_terminal() {
            ids.insert(run.id);
        }
    }
    ids
}

/// The stored index names exactly the runs that have not ended, in the store and in memory;
/// returns them.
async fn assert_index_follows<S: Store>(s: &Scheduler<S>) -> BTreeSet<String> {
    let index = indexed(&s.store).await;
    assert_eq!(
        index,
        stored_active(&s.store).await,
        "index = stored non-terminal runs"
    );
    let memory: BTreeSet<String> = s.state.lock().await.active.keys().cloned().collect();
    assert_eq!(index, memory, "index = the engine's active runs");
    s.assert_index_consistent().await;
    index
}

#[tokio::test]
async fn the_index_follows_every_transition() {
    let s = Scheduler::open(MemoryStore::new(), config_fast_expiry())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (elsewhere, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let create = |runner: String| {
        let s = s.clone();
        async move {
            s.create_run(P, &runner, RunOverrides::default())
                .await
                .expect("run")
        }
    };

    // Created and waiting (no node in ams): indexed.
    let waiting = create(elsewhere.id.clone()).await;
    assert_eq!(waiting.status, RunStatus::Pending);
    assert!(assert_index_follows(&s).await.contains(&waiting.id));
    // Stop of a pending run: canceled, out of the index.
    s.stop_run(P, &elsewhere.id, &waiting.id)
        .await
        .expect("stop");
    assert!(assert_index_follows(&s).await.is_empty());

    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    // Assigned (still pending), then running, then each way to end.
    for (reason, code, want) in [
        (ExitReason::Exited, 0, RunStatus::Succeeded),
        (ExitReason::Exited, 3, RunStatus::Failed),
        (ExitReason::Timeout, 124, RunStatus::Failed),
        (ExitReason::Stopped, 143, RunStatus::Canceled),
    ] {
        let run = create(runner.id.clone()).await;
        let a = next_assign(&mut node);
        assert!(assert_index_follows(&s).await.contains(&run.id), "assigned");
        s.run_started("fra-1", started(&a)).await.expect("started");
        assert!(assert_index_follows(&s).await.contains(&run.id), "running");
        s.run_exited("fra-1", exited(&a, code, reason))
            .await
            .expect("exited");
        let ended = s.get_run(P, &runner.id, &run.id).await.expect("get");
        assert_eq!(ended.status, want, "{reason:?}");
        assert!(assert_index_follows(&s).await.is_empty(), "{want} leaves");
    }
    // Never started (pending → failed).
    let run = create(runner.id.clone()).await;
    let a = next_assign(&mut node);
    let mut e = exited(&a, -1, ExitReason::StartFailed);
    e.error_code = Some(ErrorCode::ImagePullFailed);
    s.run_exited("fra-1", e).await.expect("start failed");
    assert_eq!(
        s.get_run(P, &runner.id, &run.id).await.expect("get").status,
        RunStatus::Failed
    );
    assert!(assert_index_follows(&s).await.is_empty());
    // Stop of an assigned run that had not started.
    let run = create(runner.id.clone()).await;
    let _ = next_assign(&mut node);
    s.stop_run(P, &runner.id, &run.id).await.expect("stop");
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    assert!(assert_index_follows(&s).await.is_empty());

    // Node loss: the running run fails, the assigned one is re-queued (and stays indexed).
    let running = create(runner.id.clone()).await;
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let requeued = create(runner.id.clone()).await;
    let _ = next_assign(&mut node);
    assert_eq!(assert_index_follows(&s).await.len(), 2);
    s.expire_nodes(Instant::now() + Duration::from_secs(10))
        .await
        .expect("expire");
    let lost = s.get_run(P, &runner.id, &running.id).await.expect("get");
    assert_eq!(
        (lost.status, lost.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    let back = s.get_run(P, &runner.id, &requeued.id).await.expect("get");
    assert_eq!((back.status, back.node_id), (RunStatus::Pending, None));
    assert_eq!(
        assert_index_follows(&s).await,
        BTreeSet::from([requeued.id.clone()])
    );
    // The re-queued run is placed again when a node comes, and ends.
    let mut again = attach(&s, register("fra-2", "fra", 8192, &[])).await;
    let a = next_assign(&mut again);
    assert_eq!(a.run_id, requeued.id);
    s.run_started("fra-2", started(&a)).await.expect("started");
    s.run_exited("fra-2", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert!(assert_index_follows(&s).await.is_empty());

    // A batch: every run of it is indexed in its one commit.
    let batch = s
        .create_runs(P, &elsewhere.id, vec![RunOverrides::default(); 3])
        .await
        .expect("batch");
    let ids: BTreeSet<String> = batch.into_iter().map(|r| r.id).collect();
    assert_eq!(assert_index_follows(&s).await, ids);
}

/// What a reopened scheduler shows of its runs: each active run with its queue position.
async fn snapshot<S: Store>(s: &Scheduler<S>) -> Vec<(String, RunStatus, Option<u32>)> {
    let st = s.state.lock().await;
    st.active
        .values()
        .map(|r| {
            let r = st.with_queue_position(r.clone());
            (r.id, r.status, r.queue_position)
        })
        .collect()
}

#[tokio::test]
async fn open_loads_exactly_the_active_runs_in_the_same_queue_order() {
    let store = Watched::default();
    let s = Scheduler::open(store.reopened(), config())
        .await
        .expect("open");
    let (fra, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (ams, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
    let mut finished = Vec::new();
    for _ in 0..5 {
        let run = s
            .create_run(P, &fra.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
            .await
            .expect("exited");
        finished.push(run.id);
    }
    // Two running (the node is full), then a queue in two regions, interleaved.
    for _ in 0..2 {
        s.create_run(P, &fra.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
    }
    for i in 0..6 {
        let runner = if i % 2 == 0 { &fra.id } else { &ams.id };
        s.create_run(P, runner, RunOverrides::default())
            .await
            .expect("run");
    }
    let before = snapshot(&s).await;
    assert_eq!(before.len(), 8);
    let positions: Vec<Option<u32>> = before.iter().map(|r| r.2).collect();
    assert_eq!(
        positions,
        vec![
            None,
            None,
            Some(1),
            Some(1),
            Some(2),
            Some(2),
            Some(3),
            Some(3)
        ]
    );
    drop(s);

    let reopened = store.reopened();
    let s = Scheduler::open(reopened.clone(), config())
        .await
        .expect("reopen");
    assert_eq!(snapshot(&s).await, before, "the same runs, the same queue");
    let reads = reopened.reads();
    assert!(
        !reads
            .iter()
            .any(|r| r.starts_with(&format!("range {}", keys::RUNS))),
        "open never lists every run: {reads:?}"
    );
    for id in &finished {
        assert!(
            !reads.iter().any(|r| r.contains(id.as_str())),
            "open never reads the finished run {id}"
        );
    }
    // Placement goes on in the same order: the oldest waiting fra run goes first.
    let _node = attach(&s, register("fra-2", "fra", 1024, &[])).await;
    let first_waiting = before.iter().find(|r| r.2 == Some(1)).expect("a head");
    let placed = s.state.lock().await.active[&first_waiting.0]
        .node_id
        .clone();
    assert_eq!(placed.as_deref(), Some("fra-2"));
    s.assert_index_consistent().await;
}

/// A run record as an older build stored it, without any index entry.
fn old_record(id: &str, runner_id: &str, status: RunStatus) -> Run {
    Run {
        id: id.to_owned(),
        runner_id: runner_id.to_owned(),
        project: P.to_owned(),
        status,
        exit_code: status.is_terminal().then_some(0),
        command: Some("echo hi".to_owned()),
        argv: vec![],
        entrypoint: None,
        env: vec![],
        image: "127.0.0.1:5000/busybox:latest".to_owned(),
        image_digest: None,
        image_pull: None,
        region: "fra".to_owned(),
        instance_type: "standard-s".to_owned(),
        memory_mib: 1024,
        cpu_millis: 1000,
        timeout_seconds: 30,
        node_id: None,
        lease_epoch: 0,
        created_at: 1,
        started_at: None,
        completed_at: status.is_terminal().then_some(2),
        error_code: None,
        error_message: None,
        pending_reason: None,
        stop_requested: false,
        warm_pin: None,
        container_registry_id: None,
        oom_killed: false,
        price_nano_usd_per_second: 0,
        queue_position: None,
        files: vec![],
        stop_grace_seconds: None,
        timeline: Default::default(),
        trace_parent: None,
        attempt: 1,
        first_attempt_id: None,
        previous_attempt_id: None,
        next_attempt_id: None,
        retry_policy: None,
        not_before: None,
        retry_cause: None,
        schedule_id: None,
        scheduled_for: None,
        final_attempt: None,
        ephemeral: None,
        notification: None,
        isolation: Default::default(),
        runtime: None,
    }
}

#[tokio::test]
async fn a_store_from_an_older_build_gets_its_index_built_once() {
    let store = Watched::default();
    let runner = "0190aaaa-0000-7000-8000-000000000000";
    let mut want_active = BTreeSet::new();
    let mut txn = Txn::new();
    // More than one page of the build's scan.
    for i in 0..1234u32 {
        let id = uuid::Uuid::now_v7().to_string();
        let status = match i % 5 {
            0 => RunStatus::Pending,
            1 => RunStatus::Succeeded,
            2 => RunStatus::Failed,
            _ => RunStatus::Canceled,
        };
        if !status.is_terminal() {
            want_active.insert(id.clone());
        }
        txn = txn.put(
            keys::run(&id),
            encode(&old_record(&id, runner, status)),
            Expect::Absent,
        );
    }
    store.commit(txn).await.expect("old store");
    assert!(indexed(&store).await.is_empty(), "no index yet");

    let s = Scheduler::open(store.reopened(), config())
        .await
        .expect("open");
    assert_eq!(want_active.len(), 247);
    assert_eq!(assert_index_follows(&s).await, want_active);
    assert!(store
        .get(keys::ACTIVE_RUNS_INDEXED)
        .await
        .expect("get")
        .is_some());
    drop(s);

    // From now on open reads the index only.
    let reopened = store.reopened();
    let s = Scheduler::open(reopened.clone(), config())
        .await
        .expect("reopen");
    let active: BTreeSet<String> = s.state.lock().await.active.keys().cloned().collect();
    assert_eq!(active, want_active);
    let reads = reopened.reads();
    assert!(
        !reads
            .iter()
            .any(|r| r.starts_with(&format!("range {}", keys::RUNS))),
        "the scan happens once: {reads:?}"
    );
}

#[tokio::test]
async fn open_drops_index_entries_of_runs_that_ended_or_are_gone() {
    let store = Watched::default();
    let live = uuid::Uuid::now_v7().to_string();
    let ended = uuid::Uuid::now_v7().to_string();
    let gone = uuid::Uuid::now_v7().to_string();
    let runner = "0190aaaa-0000-7000-8000-000000000000";
    let txn = Txn::new()
        .put(
            keys::run(&live),
            encode(&old_record(&live, runner, RunStatus::Pending)),
            Expect::Absent,
        )
        .put(
            keys::run(&ended),
            encode(&old_record(&ended, runner, RunStatus::Succeeded)),
            Expect::Absent,
        )
        .put(keys::active_run(&live), vec![], Expect::Absent)
        .put(keys::active_run(&ended), vec![], Expect::Absent)
        .put(keys::active_run(&gone), vec![], Expect::Absent)
        .put(keys::ACTIVE_RUNS_INDEXED, b"1".to_vec(), Expect::Absent);
    store.commit(txn).await.expect("store");
    let s = Scheduler::open(store.reopened(), config())
        .await
        .expect("open");
    assert_eq!(assert_index_follows(&s).await, BTreeSet::from([live]));
}
