//! Removing nodes: by an operator (refused while a connected node holds runs, unless forced)
//! and by the node itself (`Leave`: drain, then remove once its runs have ended). A removed
//! node is gone from the list and the store, its credentials are revoked, its session closed,
//! and it cannot register again with its old credential.

use super::ephemeral::{ephemeral_input, one_shot};
use super::*;

/// What a fake agent heard: a command, or its session closed.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a test's record of a few messages
enum Heard {
    Command(AgentCommand),
    Closed(String),
}

struct Agent(mpsc::UnboundedSender<Heard>);

impl AgentLink for Agent {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed> {
        self.0.send(Heard::Command(command)).map_err(|_| LinkClosed)
    }

    fn close(&self, reason: &str) {
        let _ = self.0.send(Heard::Closed(reason.to_owned()));
    }
}

type Ears = mpsc::UnboundedReceiver<Heard>;

/// Attaches `reg` as a session whose credential was checked after `checked`; what it hears
/// after `Registered` and its warm pins.
async fn attach_checked<S: Store>(
    s: &Scheduler<S>,
    reg: Registration,
    checked: RevocationMark,
) -> Result<Ears, SchedulerError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.attach_node_checked(reg, Arc::new(Agent(tx)), checked)
        .await?;
    for _ in 0..2 {
        match rx.recv().await {
            Some(Heard::Command(AgentCommand::Registered(_) | AgentCommand::WarmPins { .. })) => {}
            other => panic!("expected Registered and the warm pins, got {other:?}"),
        }
    }
    Ok(rx)
}

/// Everything heard so far.
fn heard(rx: &mut Ears) -> Vec<Heard> {
    let mut all = Vec::new();
    while let Ok(h) = rx.try_recv() {
        all.push(h);
    }
    all
}

fn assignment(rx: &mut Ears) -> AssignRun {
    match rx.try_recv().ok() {
        Some(Heard::Command(AgentCommand::AssignRun(a))) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// Enrolls `node_id` in fra; answers its plaintext credential.
async fn enroll<S: Store>(s: &Scheduler<S>, node_id: &str) -> String {
    let (_, token) = s
        .create_registration_token("fra", "test", None, true)
        .await
        .expect("token");
    s.enroll_node(&token, node_id, "fra")
        .await
        .expect("enroll")
        .1
}

/// Attaches `node_id` the way the agent service does: its credential checked first.
async fn attach_enrolled<S: Store>(s: &Scheduler<S>, credential: &str, node_id: &str) -> Ears {
    let mark = s.revocation_mark();
    s.authenticate_node(credential).await.expect("credential");
    attach_checked(s, register(node_id, "fra", 4096, &[]), mark)
        .await
        .expect("attach")
}

fn listed(nodes: &[NodeInfo], id: &str) -> bool {
    nodes.iter().any(|n| n.view.id == id)
}

/// A lost node is removed without force: gone from the list, from the store (a reopened
/// scheduler does not know it), and a second removal finds nothing.
#[tokio::test]
async fn a_lost_node_is_removed_from_the_list_and_from_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let (runner_id, run_id) = {
        let s = Scheduler::open(
            EmbeddedStore::open(&path).expect("store"),
            config_fast_expiry(),
        )
        .await
        .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 2048, &[])).await;
        let _other = attach(&s, register("fra-2", "fra", 2048, &[])).await;
        s.set_draining("fra-1", true)
            .await
            .expect("drained: stored");
        s.set_draining("fra-1", false).await.expect("resumed");
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
        s.expire_nodes(Instant::now() + Duration::from_secs(10))
            .await
            .expect("expire");
        let removed = s
            .remove_node("fra-1", Removal::Admin { force: false })
            .await
            .expect("a lost node holds nothing: removed without force");
        let seen = removed.last_seen.expect("last seen");
        assert_eq!(seen.view.status, NodeState::Lost, "as it was last seen");
        assert!(!listed(&s.list_nodes().await, "fra-1"));
        assert!(not_found(
            s.remove_node("fra-1", Removal::Admin { force: true }).await
        ));
        s.assert_index_consistent().await;
        (runner.id, run.id)
    };
    let s = Scheduler::open(
        EmbeddedStore::open(&path).expect("store"),
        config_fast_expiry(),
    )
    .await
    .expect("reopen");
    let nodes = s.list_nodes().await;
    assert!(
        !listed(&nodes, "fra-1"),
        "the store is the truth: {:?}",
        nodes.iter().map(|n| &n.view.id).collect::<Vec<_>>()
    );
    assert!(listed(&nodes, "fra-2"));
    let run = s.get_run(P, &runner_id, &run_id).await.expect("get");
    assert_eq!(
        (run.status, run.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    assert!(not_found(
        s.remove_node("fra-1", Removal::Admin { force: false })
            .await
    ));
}

/// A connected node holding runs is refused, naming the count and what to do; forced, its
/// started run ends `node_lost`, its unstarted one is queued again, it is told to stop both
/// before its session closes, and its credential no longer attaches.
#[tokio::test]
async fn a_connected_node_with_runs_is_refused_unless_forced() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let credential = enroll(&s, "fra-1").await;
    let before = s.revocation_mark();
    let mut node = attach_enrolled(&s, &credential, "fra-1").await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let running = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = assignment(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    let assigned = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(assignment(&mut node).run_id, assigned.id);

    match s
        .remove_node("fra-1", Removal::Admin { force: false })
        .await
    {
        Err(SchedulerError::NodeHoldsRuns { runs: 2, message }) => {
            assert!(
                message.contains("node fra-1 holds 2 runs")
                    && message.contains("drain it")
                    && message.contains("force"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let nodes = s.list_nodes().await;
    assert_eq!(nodes.len(), 1, "still there");
    assert_eq!(
        nodes[0].view.status,
        NodeState::Ready,
        "and still placeable"
    );
    assert!(heard(&mut node).is_empty(), "told nothing");
    s.authenticate_node(&credential)
        .await
        .expect("its credential still holds");

    let removed = s
        .remove_node("fra-1", Removal::Admin { force: true })
        .await
        .expect("forced");
    let seen = removed.last_seen.expect("last seen");
    assert_eq!(seen.view.status, NodeState::Ready, "as it was last seen");
    assert_eq!(seen.running_run_ids.len(), 2, "with the runs it held");
    let ended = s.get_run(P, &runner.id, &running.id).await.expect("get");
    assert_eq!(
        (ended.status, ended.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    let queued = s.get_run(P, &runner.id, &assigned.id).await.expect("get");
    assert_eq!((queued.status, queued.node_id), (RunStatus::Pending, None));
    // Both runs stopped, then the session closed; nothing after.
    let events = heard(&mut node);
    let stopped: Vec<&str> = events
        .iter()
        .filter_map(|h| match h {
            Heard::Command(AgentCommand::StopRun { run_id }) => Some(run_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stopped.len(), 2, "{events:?}");
    assert!(stopped.contains(&running.id.as_str()) && stopped.contains(&assigned.id.as_str()));
    assert!(
        matches!(events.last(), Some(Heard::Closed(why)) if why.contains("removed from the fleet")),
        "{events:?}"
    );
    assert!(s.list_nodes().await.is_empty());
    assert!(matches!(
        s.authenticate_node(&credential).await,
        Err(SchedulerError::NodeUnauthenticated(_))
    ));
    // A session whose credential was checked before the removal cannot register it again.
    assert!(matches!(
        attach_checked(&s, register("fra-1", "fra", 4096, &[]), before).await,
        Err(SchedulerError::NodeUnauthenticated(_))
    ));
    assert!(s.list_nodes().await.is_empty());
    s.assert_index_consistent().await;
}

/// An idle connected node is removed without force: its session closes, its old credential
/// neither authenticates nor registers it again, and it comes back only by enrolling anew.
#[tokio::test]
async fn an_idle_connected_node_is_removed_and_cannot_register_again() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let credential = enroll(&s, "fra-1").await;
    let mut node = attach_enrolled(&s, &credential, "fra-1").await;
    // A session whose check passed just before the removal, registering just after it.
    let racing = s.revocation_mark();
    s.authenticate_node(&credential).await.expect("valid now");
    s.remove_node("fra-1", Removal::Admin { force: false })
        .await
        .expect("idle: removed");
    assert!(
        matches!(heard(&mut node).as_slice(), [Heard::Closed(why)] if why.contains("fra-1")),
        "its session is closed"
    );
    assert!(s.list_nodes().await.is_empty());
    assert!(matches!(
        attach_checked(&s, register("fra-1", "fra", 4096, &[]), racing).await,
        Err(SchedulerError::NodeUnauthenticated(_))
    ));
    assert!(matches!(
        s.authenticate_node(&credential).await,
        Err(SchedulerError::NodeUnauthenticated(_))
    ));
    assert!(s.list_nodes().await.is_empty(), "not back");
    // Enrolled again, it is a node again.
    let fresh = enroll(&s, "fra-1").await;
    let _node = attach_enrolled(&s, &fresh, "fra-1").await;
    assert_eq!(s.list_nodes().await.len(), 1);
    s.assert_index_consistent().await;
}

/// A node enrolled that never connected is removed too (its credential revoked); a node
/// nobody knows is not found.
#[tokio::test]
async fn an_enrolled_node_that_never_connected_is_removed_and_an_unknown_one_is_not_found() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let credential = enroll(&s, "fra-9").await;
    let removed = s
        .remove_node("fra-9", Removal::Admin { force: false })
        .await
        .expect("removed");
    assert!(removed.last_seen.is_none());
    assert_eq!(removed.region, "fra");
    assert!(s.authenticate_node(&credential).await.is_err());
    assert!(not_found(
        s.remove_node("fra-9", Removal::Admin { force: false })
            .await
    ));
    assert!(not_found(
        s.remove_node("nope", Removal::Admin { force: true }).await
    ));
}

/// Leave: drains (stored) and counts the runs; removal is refused while one is held; once it
/// has ended the node is removed; a second leave is not found, also with its old credential,
/// and another node's credential is forbidden.
#[tokio::test]
async fn a_node_leaves_drained_first_and_removed_once_its_runs_have_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("open");
    let credential = enroll(&s, "fra-1").await;
    let other = enroll(&s, "fra-2").await;
    let mut node = attach_enrolled(&s, &credential, "fra-1").await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = assignment(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");

    assert!(matches!(
        s.authenticate_leaving_node(&other, "fra-1").await,
        Err(SchedulerError::Forbidden(m)) if m.contains("belongs to node fra-2")
    ));
    s.authenticate_leaving_node(&credential, "fra-1")
        .await
        .expect("its own");
    assert_eq!(
        s.leave_node("fra-1", false).await.expect("drain"),
        LeaveOutcome {
            active_runs: 1,
            removed: false
        }
    );
    let nodes = s.list_nodes().await;
    assert!(nodes[0].draining, "drained");
    match s.leave_node("fra-1", true).await {
        Err(SchedulerError::NodeHoldsRuns { runs: 1, message }) => {
            assert!(message.contains("still holds 1 run"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Drained: a new run of its region waits rather than going there.
    let waiting = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");
    assert_eq!(
        s.leave_node("fra-1", false).await.expect("drain again"),
        LeaveOutcome {
            active_runs: 0,
            removed: false
        }
    );
    assert_eq!(
        s.leave_node("fra-1", true).await.expect("remove"),
        LeaveOutcome {
            active_runs: 0,
            removed: true
        }
    );
    assert!(s.list_nodes().await.is_empty());
    assert!(not_found(s.leave_node("fra-1", true).await), "idempotent");
    assert!(
        not_found(s.authenticate_leaving_node(&credential, "fra-1").await),
        "its revoked credential learns it is gone"
    );
    let w = s.get_run(P, &runner.id, &waiting.id).await.expect("get");
    assert_eq!(w.status, RunStatus::Pending);
    drop(s);
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    assert!(s.list_nodes().await.is_empty(), "gone after a restart");
}

/// A revoked node that is still listed is refused as revoked on leave (it is not gone).
#[tokio::test]
async fn a_revoked_node_still_listed_cannot_leave_with_its_credential() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let credential = enroll(&s, "fra-1").await;
    let _node = attach_enrolled(&s, &credential, "fra-1").await;
    s.revoke_node("fra-1").await.expect("revoke");
    assert!(matches!(
        s.authenticate_leaving_node(&credential, "fra-1").await,
        Err(SchedulerError::NodeUnauthenticated(m)) if m.contains("revoked")
    ));
    assert_eq!(s.list_nodes().await.len(), 1, "lost, listed");
}

/// Runners warmed up on a removed node lose that warmup: no run prefers a node that is gone,
/// and the node's pins (and the memory its sandboxes held) go with it.
#[tokio::test]
async fn removing_a_warm_node_fails_the_warmups_on_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut warm = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    s.warmup_runner(P, &runner.id, 1).await.expect("warmup");
    let image = match warm.try_recv().ok() {
        Some(AgentCommand::Warmup(w)) => w.image,
        other => panic!("expected a warmup, got {other:?}"),
    };
    s.warmup_result(
        "fra-1",
        WarmupResult {
            runner_id: runner.id.clone(),
            image,
            outcome: Ok("sha256:x".into()),
        },
    )
    .await
    .expect("warm");
    let (ready, _) = s.get_runner(P, &runner.id).await.expect("get");
    assert_eq!(ready.warm_pin(), Some("fra-1"));
    s.remove_node("fra-1", Removal::Admin { force: false })
        .await
        .expect("removed");
    let (cold, _) = s.get_runner(P, &runner.id).await.expect("get");
    assert_eq!(cold.warm_pin(), None);
    let w = cold.warmup.expect("warmup kept, failed");
    assert_eq!(
        (w.status, w.node_id.as_str(), w.sandboxes),
        (WarmupStatus::Failed, "", 0)
    );
    assert!(w.error.is_some_and(|e| e.contains("fra-1 was removed")));
    assert!(s.state.lock().await.warm_pins.is_empty());
    s.assert_index_consistent().await;
}

/// An ephemeral node removed while its run waits for it: the run ends `node_lost` at once
/// (no other node may take it).
#[tokio::test]
async fn removing_an_ephemeral_node_ends_the_run_waiting_for_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, ephemeral_input())
        .await
        .expect("run");
    let pin = run.ephemeral.clone().expect("pinned");
    // It still runs a container the scheduler does not know: that holds the whole node, so
    // its run waits, unassigned.
    let reg = Registration {
        active_run_ids: vec!["left-over".into()],
        ..one_shot(&run, pin.claim.as_deref().unwrap_or_default(), 4096)
    };
    let _rx = attach(&s, reg).await;
    let waiting = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (waiting.status, waiting.node_id),
        (RunStatus::Pending, None)
    );
    s.remove_node(&pin.node_id, Removal::Admin { force: false })
        .await
        .expect("removed");
    let ended = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        (ended.status, ended.error_code.map(ErrorCode::as_str)),
        (RunStatus::Failed, Some("node_lost"))
    );
    assert!(s.list_nodes().await.is_empty());
    s.assert_index_consistent().await;
}
