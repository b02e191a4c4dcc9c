//! Runs from creation to their end: statuses, exits, stops, logs, idempotency, files, restarts.

use super::*;

#[tokio::test]
async fn a_run_goes_to_its_region_and_ends_succeeded_with_its_logs() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let mut ams = attach(&s, register("ams-1", "ams", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("ams", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(run.node_id.as_deref(), Some("ams-1"));
    assert!(fra.try_recv().is_err(), "nothing goes to fra");
    let a = next_assign(&mut ams);
    let spec = a.spec.clone();
    assert_eq!(spec.image, "127.0.0.1:5000/busybox:latest");
    assert_eq!(
        spec.cmd,
        Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
    );
    assert_eq!(spec.entrypoint, None, "the image's entrypoint stays");
    assert_eq!(spec.memory_mib, 1024);
    assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));

    s.run_started("ams-1", started(&a)).await.expect("started");
    let line = |seq, stream, msg: &str| LogLine {
        seq,
        stream,
        msg: msg.into(),
        ts_unix_nanos: 5,
    };
    let batch = LogBatch {
        run_id: a.run_id.clone(),
        lines: vec![
            line(1, LogStream::Stdout, "out"),
            line(2, LogStream::Stderr, "err"),
        ],
    };
    s.append_logs("ams-1", batch.clone()).await.expect("logs");
    s.append_logs("ams-1", batch)
        .await
        .expect("a re-send is harmless");
    s.run_exited("ams-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");

    let run = s.get_run(P, &runner.id, &a.run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.image_digest.as_deref(), Some("sha256:abc"));
    assert_eq!(run.duration_seconds(), Some(3));
    let (logs, more) = s
        .list_logs(P, &runner.id, &a.run_id, 0, 10)
        .await
        .expect("logs");
    assert!(!more);
    let got: Vec<(u64, &str)> = logs.iter().map(|l| (l.id, l.msg.as_str())).collect();
    assert_eq!(got, vec![(1, "out"), (2, "err")]);
    assert_eq!(logs[1].stream, LogStream::Stderr);
    let (page, more) = s
        .list_logs(P, &runner.id, &a.run_id, 1, 10)
        .await
        .expect("logs");
    assert_eq!((page.len(), more), (1, false));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn timeouts_stops_and_start_failures_map_to_statuses() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    for (reason, code, want, err) in [
        (ExitReason::Timeout, 124, RunStatus::Failed, Some("timeout")),
        (ExitReason::Stopped, 143, RunStatus::Canceled, None),
        // An agent that gives no reason and no code: a failure to start.
        (
            ExitReason::Unspecified,
            -1,
            RunStatus::Failed,
            Some("start_failed"),
        ),
        (
            ExitReason::StartFailed,
            -1,
            RunStatus::Failed,
            Some("image_pull_failed"),
        ),
    ] {
        let run = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        if reason != ExitReason::StartFailed {
            s.run_started("fra-1", started(&a)).await.expect("started");
        }
        let mut e = exited(&a, code, reason);
        if reason == ExitReason::StartFailed {
            e.error_code = Some(ErrorCode::ImagePullFailed);
        }
        s.run_exited("fra-1", e).await.expect("exited");
        let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
        assert_eq!(run.status, want, "{reason:?}");
        assert_eq!(run.error_code.map(ErrorCode::as_str), err, "{reason:?}");
        if reason == ExitReason::Timeout {
            assert_eq!(run.exit_code, Some(124));
        }
    }
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn an_oom_kill_is_recorded_on_the_run() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let oom = RunExited {
        oom_killed: true,
        ..exited(&a, 137, ExitReason::Exited)
    };
    s.run_exited("fra-1", oom).await.expect("exited");
    let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (run.status, run.exit_code, run.oom_killed),
        (RunStatus::Failed, Some(137), true)
    );
    assert_eq!(run.error_code.map(ErrorCode::as_str), Some("oom_killed"));
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_whose_task_was_lost_shows_why() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let lost = RunExited {
        error_code: Some(ErrorCode::TaskFailed),
        error_message: "containerd lost the task".to_owned(),
        ..exited(&a, -1, ExitReason::Exited)
    };
    s.run_exited("fra-1", lost).await.expect("exited");
    let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (
            run.status,
            run.error_code.map(ErrorCode::as_str),
            run.error_message.as_deref()
        ),
        (
            RunStatus::Failed,
            Some("task_failed"),
            Some("containerd lost the task")
        )
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn a_run_refused_by_a_shutting_down_node_goes_elsewhere() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut small = attach(&s, register("fra-small", "fra", 2048, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut small);
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let refused = RunExited {
        error_code: Some(ErrorCode::NodeDraining),
        ..exited(&a, -1, ExitReason::StartFailed)
    };
    s.run_exited("fra-small", refused).await.expect("refused");
    let b = next_assign(&mut big);
    assert_eq!(
        (b.run_id.as_str(), b.lease_epoch),
        (run.id.as_str(), a.lease_epoch + 1)
    );
    let nodes = s.list_nodes().await;
    let small_node = nodes
        .iter()
        .find(|n| n.view.id == "fra-small")
        .expect("node");
    assert_eq!(
        small_node.view.status,
        NodeState::Draining,
        "no more runs go to it"
    );
    let got = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (got.status, got.node_id.as_deref()),
        (RunStatus::Pending, Some("fra-big"))
    );
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn stopping_a_pending_run_cancels_it_and_fences_a_late_start() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let stopped = s.stop_run(P, &runner.id, &run.id).await.expect("stop");
    assert_eq!(stopped.status, RunStatus::Canceled);
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::StopRun { .. })
    ));
    s.run_started("fra-1", started(&a))
        .await
        .expect("late start");
    assert!(
        matches!(node.try_recv().ok(), Some(AgentCommand::StopRun { .. })),
        "a late start is fenced"
    );
    let run = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        run.status,
        RunStatus::Canceled,
        "a canceled run never runs again"
    );
    let again = s
        .stop_run(P, &runner.id, &run.id)
        .await
        .expect("stop twice");
    assert_eq!(again, run, "a finished run is returned unchanged");
    s.assert_index_consistent().await;
}

#[tokio::test]
async fn runs_survive_a_scheduler_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, run_id, assign) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        (runner.id, run.id, a)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Running);
    let _node = attach(&s, register("fra-1", "fra", 2048, &[&run_id])).await;
    s.run_exited("fra-1", exited(&assign, 0, ExitReason::Exited))
        .await
        .expect("exit after restart");
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    s.assert_index_consistent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_one_idempotency_key_create_one_run() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, id) = (s.clone(), runner.id.clone());
        tasks.push(tokio::spawn(async move {
            s.create_run_with_key(P, &id, RunOverrides::default(), Some("retry-me"))
                .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut replays = 0;
    for t in tasks {
        let (run, replayed) = t.await.expect("join").expect("create");
        ids.insert(run.id);
        replays += usize::from(replayed);
    }
    assert_eq!((ids.len(), replays), (1, 7), "one run, seven replays");
    let (other, replayed) = s
        .create_run_with_key(P, &runner.id, RunOverrides::default(), Some("another"))
        .await
        .expect("create");
    assert!(!replayed && !ids.contains(&other.id));
    let (runner2, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (scoped, replayed) = s
        .create_run_with_key(P, &runner2.id, RunOverrides::default(), Some("retry-me"))
        .await
        .expect("create");
    assert!(
        !replayed && !ids.contains(&scoped.id),
        "keys are per runner"
    );
    assert_eq!(
        s.list_runs(P, &runner.id, None, usize::MAX, false)
            .await
            .expect("list")
            .0
            .len(),
        2
    );
}

#[tokio::test]
async fn files_and_the_stop_grace_reach_the_node_and_only_their_digest_reaches_the_api() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (plain, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (graceful, _) = s
        .create_runner(
            P,
            RunnerSpec {
                stop_grace_seconds: Some(30),
                ..spec("fra", "standard-s")
            },
        )
        .await
        .expect("runner");
    // The scheduler's flag, the runner's grace, the run's own.
    let cases = [
        (&plain, None, berth_core::defaults::STOP_GRACE_SECONDS),
        (&graceful, None, 30),
        (&graceful, Some(5), 5),
    ];
    for (runner, run_grace, want) in cases {
        let run = s
            .create_run(
                P,
                &runner.id,
                received(&[("/etc/app.conf", 0o444)], run_grace),
            )
            .await
            .expect("run");
        assert_eq!(run.stop_grace_seconds, Some(want));
        let a = next_assign(&mut fra);
        let sent = a.spec;
        assert_eq!(sent.stop_grace_seconds, want);
        let sent_files: Vec<(&str, &[u8], u32)> = sent
            .files
            .iter()
            .map(|f| (f.path.as_str(), &*f.content, f.mode))
            .collect();
        assert_eq!(sent_files, [("/etc/app.conf", &b"hello"[..], 0o444)]);
        // The API shows the file by its digest (its gRPC form has no field for content).
        let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
        assert_eq!(shown.files.len(), 1);
        assert_eq!(shown.files[0].size_bytes, 5);
        assert_eq!(shown.files[0].sha256, sent.files[0].sha256);
        assert_eq!(shown.stop_grace_seconds, Some(want));
    }
    // Once a run has ended its files' contents leave the store; the digests stay.
    let run = s
        .create_run(P, &plain.id, received(&[("/etc/ends.conf", 0o444)], None))
        .await
        .expect("run");
    let a = next_assign(&mut fra);
    let stored = |id: String| {
        let s = &s;
        async move { s.store.get(&keys::run_files(&id)).await.expect("get") }
    };
    assert!(stored(run.id.clone()).await.is_some(), "kept while active");
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert!(stored(run.id.clone()).await.is_none(), "gone once ended");
    let ended = s.get_run(P, &plain.id, &run.id).await.expect("get");
    assert_eq!(ended.status, RunStatus::Succeeded);
    assert_eq!(ended.files.len(), 1, "the record still names the file");
    // The scheduler re-checks what arrives over gRPC, the files as the bytes they are.
    let bad = s
        .create_run(P, &plain.id, received(&[("/proc/x", 0o444)], None))
        .await;
    let fields: Vec<String> = match bad {
        Err(SchedulerError::Invalid(e)) => e.0.into_iter().map(|f| f.field).collect(),
        other => panic!("expected invalid files, got {other:?}"),
    };
    assert_eq!(fields, ["files[0].path"]);
    let bad = s
        .create_runs(
            P,
            &plain.id,
            vec![
                RunOverrides::default(),
                received(&[("/etc/x", 0o1000)], None),
            ],
        )
        .await;
    let fields: Vec<String> = match bad {
        Err(SchedulerError::Invalid(e)) => e.0.into_iter().map(|f| f.field).collect(),
        other => panic!("expected invalid files, got {other:?}"),
    };
    assert_eq!(fields, ["runs[1].files[0].mode"]);
}

#[tokio::test]
async fn a_restarted_scheduler_still_sends_the_files_of_a_waiting_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, run_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        let run = s
            .create_run(P, &runner.id, received(&[("/etc/app.conf", 0o600)], None))
            .await
            .expect("run");
        // The record itself holds no content; it is stored once beside it.
        let raw = s.store.get(&keys::run(&run.id)).await.expect("get");
        let raw = String::from_utf8(raw.map(|kv| kv.value).unwrap_or_default()).unwrap_or_default();
        assert!(
            raw.contains("/etc/app.conf") && !raw.contains("aGVsbG8"),
            "{raw}"
        );
        (runner.id, run.id)
    };
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut fra = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let a = next_assign(&mut fra);
    assert_eq!(a.run_id, run_id);
    let sent = a.spec;
    assert_eq!(sent.files.len(), 1);
    assert_eq!(&*sent.files[0].content, b"hello");
    assert_eq!(sent.files[0].mode, 0o600);
    let shown = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(shown.files[0].size_bytes, 5);
}

/// Pages of long lines stop by bytes as well as by count (the API's gRPC client refused pages of
/// 100 lines of 64 KiB as too large), always hold at least one line, and page through all.
#[tokio::test]
async fn log_pages_are_bounded_by_bytes_and_page_through_everything() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
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
    let lines: Vec<LogLine> = (1..=300u64)
        .map(|seq| LogLine {
            seq,
            stream: LogStream::Stdout,
            // Lengths from 1 byte to 100 KiB.
            msg: "z".repeat(((seq * 7919) % 100_000 + 1) as usize),
            ts_unix_nanos: 5,
        })
        .collect();
    for chunk in lines.chunks(20) {
        s.append_logs(
            "ams-1",
            LogBatch {
                run_id: a.run_id.clone(),
                lines: chunk.to_vec(),
            },
        )
        .await
        .expect("logs");
    }
    for (limit, max_bytes) in [(1000, 300_000), (100, 300_000), (7, 300_000), (1000, 10)] {
        let mut after = 0;
        let mut seen = Vec::new();
        loop {
            let (page, more) = s
                .list_logs_within(P, &runner.id, &a.run_id, after, limit, max_bytes)
                .await
                .expect("logs");
            assert!(!page.is_empty() && page.len() <= limit);
            let bytes: usize = page.iter().map(log_line_cost).sum();
            assert!(page.len() == 1 || bytes <= max_bytes, "{bytes} bytes");
            after = page.last().map_or(after, |l| l.id);
            seen.extend(page.iter().map(|l| l.id));
            if !more {
                break;
            }
        }
        assert_eq!(
            seen,
            (1..=300).collect::<Vec<_>>(),
            "limit {limit}, {max_bytes} bytes"
        );
    }
    let (page, more) = s
        .list_logs(P, &runner.id, &a.run_id, 0, 1000)
        .await
        .expect("logs");
    assert!(more && page.iter().map(log_line_cost).sum::<usize>() <= LOG_PAGE_MAX_BYTES);
    let (page, more) = s
        .list_logs(P, &runner.id, &a.run_id, 299, 1000)
        .await
        .expect("logs");
    assert_eq!((page.len(), more), (1, false));
}

/// A node's reports that arrive together are one operation: every run they end is stored in
/// one write, with the placement of what waited for the capacity they free.
#[tokio::test]
async fn run_reports_that_arrive_together_are_stored_in_one_write() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    // Room for two runs of 1 GiB.
    let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        runs.push(run.id);
    }
    let (a1, a2) = (next_assign(&mut node), next_assign(&mut node));
    assert!(node.try_recv().is_err(), "the third run waits for room");
    let revision = |id: String| {
        let s = &s;
        async move {
            s.store
                .get(&keys::run(&id))
                .await
                .expect("get")
                .expect("stored")
                .mod_revision
        }
    };
    let waiting_before = revision(runs[2].clone()).await;

    s.run_reports(
        "fra-1",
        vec![
            RunReport::Started(started(&a1)),
            RunReport::Exited(exited(&a1, 0, ExitReason::Exited)),
            RunReport::Started(started(&a2)),
            RunReport::Exited(exited(&a2, 3, ExitReason::Exited)),
        ],
    )
    .await
    .expect("reports");

    let a3 = next_assign(&mut node);
    assert_eq!(a3.run_id, runs[2], "the freed room went to the waiting run");
    let ended = revision(a1.run_id.clone()).await;
    assert!(ended > waiting_before);
    assert_eq!(
        revision(a2.run_id.clone()).await,
        ended,
        "one write ends both"
    );
    assert_eq!(
        revision(a3.run_id.clone()).await,
        ended,
        "and places the waiting run"
    );
    let first = s.get_run(P, &runner.id, &a1.run_id).await.expect("get");
    assert_eq!(
        (first.status, first.exit_code),
        (RunStatus::Succeeded, Some(0))
    );
    assert_eq!(
        first.image_digest.as_deref(),
        Some("sha256:abc"),
        "its start is kept"
    );
    let second = s.get_run(P, &runner.id, &a2.run_id).await.expect("get");
    assert_eq!(
        (second.status, second.exit_code),
        (RunStatus::Failed, Some(3))
    );
    s.assert_index_consistent().await;
}

/// A report in a batch that cannot be applied fails alone: the ones before it are stored (and
/// may be acknowledged), the ones after it are left for the agent to send again.
#[tokio::test]
async fn a_report_the_lifecycle_refuses_is_dropped_and_the_batch_goes_on() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let first = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let second = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let (a1, a2) = (next_assign(&mut node), next_assign(&mut node));
    // An exit that asks to re-queue the run as refused at its start, *after* it started: the
    // lifecycle refuses it (running → pending), and no re-send can change that.
    s.run_started("fra-1", started(&a2)).await.expect("started");
    let mut refused = exited(&a2, 0, ExitReason::StartFailed);
    refused.error_code = Some(ErrorCode::NodeDraining);
    let before = s.get_run(P, &runner.id, &second.id).await.expect("get");
    s.run_reports(
        "fra-1",
        vec![
            RunReport::Started(started(&a1)),
            RunReport::Exited(refused.clone()),
            RunReport::Exited(exited(&a1, 0, ExitReason::Exited)),
        ],
    )
    .await
    .expect("a refused report does not fail the batch");
    let run = s.get_run(P, &runner.id, &first.id).await.expect("get");
    assert_eq!(
        run.status,
        RunStatus::Succeeded,
        "the reports after the refused one are applied"
    );
    let run = s.get_run(P, &runner.id, &second.id).await.expect("get");
    assert_eq!(
        run.status,
        RunStatus::Running,
        "the refused one changed nothing"
    );
    assert_eq!(run.pending_reason, before.pending_reason);
    assert!(
        s.list_nodes()
            .await
            .iter()
            .all(|n| n.view.status == NodeState::Ready),
        "nor did it mark the node as shutting down"
    );
    // Alone, it is dropped the same way; the run's real end still completes it.
    s.run_exited("fra-1", refused)
        .await
        .expect("dropped, not failed");
    s.run_exited("fra-1", exited(&a2, 0, ExitReason::Exited))
        .await
        .expect("exit");
    let run = s.get_run(P, &runner.id, &second.id).await.expect("get");
    assert_eq!(run.status, RunStatus::Succeeded);
    s.assert_index_consistent().await;
}

/// A run staged several times in one operation (created and placed; started; created and
/// left waiting with a reason) is stored once per operation, as it stands when the operation
/// is flushed: the stored record is the record in memory, never an earlier stage or an empty
/// value.
#[tokio::test]
async fn a_run_staged_several_times_in_one_operation_is_stored_as_it_stands_at_the_flush() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    // Room for one run of 1 GiB.
    let mut node = attach(&s, register("fra-1", "fra", 1024, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    // The record as stored (decoded whole) and its revision.
    let stored = |id: String| {
        let s = &s;
        async move { s.load_run(&id).await.expect("stored, a whole record") }
    };
    let in_memory = |id: String| {
        let s = &s;
        async move {
            s.state
                .lock()
                .await
                .active
                .get(&id)
                .cloned()
                .expect("active")
        }
    };

    // Created and placed in one operation.
    let placed = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    assert_eq!(a.run_id, placed.id);
    let (record, _) = stored(placed.id.clone()).await;
    assert_eq!(record.status, RunStatus::Pending);
    assert_eq!(record.node_id.as_deref(), Some("fra-1"));
    assert_eq!(record, in_memory(placed.id.clone()).await);

    // Created and left waiting: the reason it waits is in the stored record too.
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let (record, _) = stored(waiting.id.clone()).await;
    assert_eq!(record.status, RunStatus::Pending);
    assert!(record.pending_reason.is_some(), "{record:?}");
    assert_eq!(record, in_memory(waiting.id.clone()).await);

    // Started: one stage of an active run.
    s.run_reports("fra-1", vec![RunReport::Started(started(&a))])
        .await
        .expect("reports");
    let (record, _) = stored(placed.id.clone()).await;
    assert_eq!(record.status, RunStatus::Running);
    assert_eq!(record, in_memory(placed.id.clone()).await);

    // Ended, which places the waiting run, in one write.
    s.run_reports(
        "fra-1",
        vec![RunReport::Exited(exited(&a, 0, ExitReason::Exited))],
    )
    .await
    .expect("reports");
    let next = next_assign(&mut node);
    assert_eq!(next.run_id, waiting.id);
    let (ended, ended_at) = stored(placed.id.clone()).await;
    assert_eq!(ended.status, RunStatus::Succeeded);
    let (record, placed_at) = stored(waiting.id.clone()).await;
    assert_eq!(placed_at, ended_at, "one write");
    assert_eq!(record.status, RunStatus::Pending);
    assert_eq!(record, in_memory(waiting.id.clone()).await);
    s.assert_index_consistent().await;
}
