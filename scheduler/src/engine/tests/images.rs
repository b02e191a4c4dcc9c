//! Warmups, warm pins and pull progress.

use super::*;

/// A warm pin follows its runner's latest warmup: a warmup on another node moves it (both
/// nodes hear their new set), deleting the runner releases it, and a re-registering node gets
/// its set again; a scheduler restart rebuilds the pins from the stored runners.
#[tokio::test]
async fn warm_pins_move_with_the_warmup_and_go_with_the_runner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let image = "127.0.0.1:5000/busybox:latest".to_string();
    let runner_id = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut one = attach(&s, register("fra-1", "fra", 4096, &[])).await;
        let mut two = attach(&s, register("fra-2", "fra", 4096, &[])).await;
        let (runner, _) = s
            .create_runner(P, spec("fra", "standard-s"))
            .await
            .expect("runner");
        s.set_draining("fra-2", true).await.expect("drain");
        s.warmup_runner(P, &runner.id, 0).await.expect("warmup");
        assert!(matches!(one.try_recv().ok(), Some(AgentCommand::Warmup(_))));
        assert_eq!(next_pins(&mut one), [image.as_str()]);
        assert!(two.try_recv().is_err(), "fra-2's pins did not change");
        s.set_draining("fra-2", false).await.expect("resume");
        runner.id
    };
    // A restarted scheduler knows the pin from the stored runner.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut one = attach_keeping_pins(&s, register("fra-1", "fra", 4096, &[])).await;
    assert_eq!(next_pins(&mut one), [image.as_str()]);
    let mut two = attach(&s, register("fra-2", "fra", 4096, &[])).await;

    s.set_draining("fra-1", true).await.expect("drain");
    s.warmup_runner(P, &runner_id, 0)
        .await
        .expect("warmup elsewhere");
    assert!(next_pins(&mut one).is_empty(), "moved away from fra-1");
    assert!(matches!(two.try_recv().ok(), Some(AgentCommand::Warmup(_))));
    assert_eq!(next_pins(&mut two), [image.as_str()]);

    s.delete_runner(P, &runner_id).await.expect("delete");
    assert!(next_pins(&mut two).is_empty(), "released with the runner");
    assert!(one.try_recv().is_err());
}

#[tokio::test]
async fn warmup_pins_the_node_that_pulled_the_image() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut small = attach(&s, register("fra-small", "fra", 2048, &[])).await;
    let mut big = attach(&s, register("fra-big", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    // Spread would not matter: best fit would pick fra-small; make the warmup land on fra-big.
    s.set_draining("fra-small", true).await.expect("drain");
    let (warming, _) = s.warmup_runner(P, &runner.id, 0).await.expect("warmup");
    let w = warming.warmup.clone().expect("warmup state");
    assert_eq!(
        (w.node_id.as_str(), w.status),
        ("fra-big", WarmupStatus::Pending)
    );
    match big.try_recv().ok() {
        Some(AgentCommand::Warmup(msg)) => assert_eq!(msg.image, "127.0.0.1:5000/busybox:latest"),
        other => panic!("expected Warmup, got {other:?}"),
    }
    assert_eq!(
        next_pins(&mut big),
        ["127.0.0.1:5000/busybox:latest"],
        "the warmed image is pinned on its node"
    );
    s.set_draining("fra-small", false).await.expect("resume");
    let result = WarmupResult {
        runner_id: runner.id.clone(),
        image: w.image.clone(),
        outcome: Ok("sha256:x".into()),
    };
    s.warmup_result("fra-big", result.clone())
        .await
        .expect("result");
    let (warm, _) = s.get_runner(P, &runner.id).await.expect("runner");
    assert!(warm.warmed_at.is_some());
    assert_eq!(warm.warm_pin(), Some("fra-big"));
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(
        run.node_id.as_deref(),
        Some("fra-big"),
        "the pin beats best fit"
    );
    assert!(small.try_recv().is_err());
    let _ = next_assign(&mut big);

    let failed = WarmupResult {
        outcome: Err("404 not found".into()),
        ..result
    };
    s.warmup_result("fra-big", failed).await.expect("result");
    let (cold, _) = s.get_runner(P, &runner.id).await.expect("runner");
    let w = cold.warmup.clone().expect("warmup");
    assert_eq!(w.status, WarmupStatus::Failed);
    assert_eq!(w.error.as_deref(), Some("image_pull_failed: 404 not found"));
    assert_eq!(cold.warm_pin(), None);
    s.assert_index_consistent().await;
}

/// Pull progress shows on the pending run (with its reason) only for the current lease; the
/// last report's figures are stored with the run when it starts.
#[tokio::test]
async fn pull_progress_shows_while_pending_and_is_kept_at_the_start() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut node);
    let report = |done: u64, epoch: u64, complete: bool| PullProgress {
        pull_for: PullFor::Run {
            run_id: a.run_id.clone(),
            lease_epoch: epoch,
        },
        image: "127.0.0.1:5000/busybox:latest".into(),
        progress: ImagePull {
            bytes_done: done,
            bytes_total: 1000,
            layers_done: u32::from(complete),
            layers_total: 1,
        },
        complete,
    };
    s.pull_progress("fra-1", report(400, a.lease_epoch + 1, false));
    s.pull_progress("fra-2", report(400, a.lease_epoch, false));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.image_pull, None, "other leases' reports are ignored");
    s.pull_progress("fra-1", report(400, a.lease_epoch, false));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.image_pull.map(|p| p.bytes_done), Some(400));
    assert_eq!(shown.pending_reason.as_deref(), Some("pulling the image"));
    s.pull_progress("fra-1", report(1000, a.lease_epoch, true));
    let shown = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(shown.pending_reason, None, "fetched: no longer pulling");
    s.run_started("fra-1", started(&a)).await.expect("started");
    let running = s.get_run(P, &runner.id, &run.id).await.expect("get");
    let pull = running.image_pull.expect("stored at the start");
    assert_eq!(
        (pull.bytes_done, pull.bytes_total, pull.layers_done),
        (1000, 1000, 1)
    );
}

fn next_sandboxes(rx: &mut Rx) -> Vec<berth_core::agent::WarmSandboxes> {
    match rx.try_recv().ok() {
        Some(AgentCommand::WarmPins { sandboxes, .. }) => sandboxes,
        other => panic!("expected WarmPins, got {other:?}"),
    }
}

fn free_mib(nodes: &[NodeInfo], id: &str) -> u64 {
    nodes
        .iter()
        .find(|n| n.view.id == id)
        .map(|n| n.view.free_memory_mib())
        .expect("node listed")
}

/// A warmup with sandboxes: the node hears the runner, the count and the spec of a run with no
/// overrides; each sandbox holds the run's memory there (so runs that would need it wait or go
/// elsewhere); a changed runner sends the new spec; the memory comes back with the runner; a
/// restarted scheduler holds it again from the stored runner; more than the bound is refused.
#[tokio::test]
async fn warm_sandboxes_hold_memory_on_their_node_and_follow_the_runner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let memory = s
        .config()
        .catalog
        .instance_type("standard-s")
        .expect("type")
        .memory_mib;
    let refused = s
        .warmup_runner(P, &runner.id, MAX_WARM_SANDBOXES + 1)
        .await
        .expect_err("over the bound");
    assert!(
        matches!(&refused, SchedulerError::Invalid(e) if format!("{e:?}").contains("sandboxes")),
        "{refused:?}"
    );
    let (warm, rev) = s.warmup_runner(P, &runner.id, 2).await.expect("warmup");
    assert_eq!(warm.warmup.as_ref().map(|w| w.sandboxes), Some(2));
    assert!(matches!(
        node.try_recv().ok(),
        Some(AgentCommand::Warmup(_))
    ));
    let sandboxes = next_sandboxes(&mut node);
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(
        (sandboxes[0].runner_id.as_str(), sandboxes[0].count),
        (runner.id.as_str(), 2)
    );
    assert_eq!(sandboxes[0].spec.memory_mib, memory);
    assert_eq!(sandboxes[0].spec.image, "127.0.0.1:5000/busybox:latest");
    assert_eq!(free_mib(&s.list_nodes().await, "fra-1"), 8192 - 2 * memory);

    let mut changed = spec("fra", "standard-s");
    changed.run_command = Some("echo changed".into());
    s.update_runner(P, &runner.id, changed, rev)
        .await
        .expect("update");
    let sandboxes = next_sandboxes(&mut node);
    assert_eq!(
        sandboxes[0].spec.cmd,
        Some(vec!["sh".to_string(), "-c".into(), "echo changed".into()]),
        "the node hears the runner's new command"
    );
    drop(s);

    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let mut node = attach_keeping_pins(&s, register("fra-1", "fra", 8192, &[])).await;
    assert_eq!(next_sandboxes(&mut node)[0].count, 2);
    assert_eq!(
        free_mib(&s.list_nodes().await, "fra-1"),
        8192 - 2 * memory,
        "held again after a restart"
    );
    s.delete_runner(P, &runner.id).await.expect("delete");
    assert!(next_sandboxes(&mut node).is_empty());
    assert_eq!(free_mib(&s.list_nodes().await, "fra-1"), 8192);

    // Sandboxes must leave room for a run of their runner beside them.
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let per_node = u32::try_from(8192 / memory).expect("small");
    let (full, _) = s
        .warmup_runner(P, &runner.id, per_node)
        .await
        .expect("warmup");
    let w = full.warmup.expect("warmup state");
    assert_eq!(w.status, WarmupStatus::Failed, "{w:?}");
    let (fits, rev) = s
        .warmup_runner(P, &runner.id, per_node - 1)
        .await
        .expect("warmup");
    assert_eq!(fits.warmup.map(|w| w.status), Some(WarmupStatus::Pending));
    assert_eq!(free_mib(&s.list_nodes().await, "fra-1"), memory);

    // A larger instance type keeps only the sandboxes that still leave room for one run.
    while node.try_recv().is_ok() {}
    let larger = s
        .config()
        .catalog
        .instance_type("standard-l")
        .expect("type")
        .memory_mib;
    let (updated, _) = s
        .update_runner(P, &runner.id, spec("fra", "standard-l"), rev)
        .await
        .expect("update");
    let kept = u32::try_from(8192 / larger - 1).expect("small");
    assert!(kept < per_node - 1);
    assert_eq!(updated.warmup.map(|w| w.sandboxes), Some(kept));
    let sandboxes = next_sandboxes(&mut node);
    assert_eq!(
        sandboxes.iter().map(|s| s.count).collect::<Vec<_>>(),
        [kept]
    );
    assert_eq!(
        free_mib(&s.list_nodes().await, "fra-1"),
        8192 - u64::from(kept) * larger
    );
}
