//! Run-ended webhooks: the delivery is stored with the run's end, handed out when due, retried
//! after a failed attempt, settled on a 2xx, shown with the run, and reloaded by a new leader.

use super::*;
use berth_core::webhook::{Attempt, DeliveryStatus, Notify};

fn notifying() -> RunnerSpec {
    RunnerSpec {
        notify: Some(Notify {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef".into(),
        }),
        ..spec("fra", "standard-xs")
    }
}

fn answered(code: Option<u16>) -> Attempt {
    Attempt {
        attempt: 0,
        at: now_unix_millis(),
        status_code: code,
        error: (code != Some(200)).then(|| "no".to_owned()),
        duration_ms: 3,
    }
}

#[tokio::test]
async fn an_ended_run_is_notified_retried_and_settled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let (runner_id, run_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .expect("open");
        let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
        let (runner, _) = s.create_runner(P, notifying()).await.expect("runner");
        let (quiet, _) = s
            .create_runner(P, spec("fra", "standard-xs"))
            .await
            .expect("runner");
        let run = s
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        let other = s
            .create_run(P, &quiet.id, RunOverrides::default())
            .await
            .expect("run");
        assert!(
            s.due_webhooks(now_unix_millis(), 10).await.is_empty(),
            "nothing ended yet"
        );
        for _ in 0..2 {
            let a = next_assign(&mut node);
            s.run_started("fra-1", started(&a)).await.expect("started");
            s.run_exited("fra-1", exited(&a, 3, ExitReason::Exited))
                .await
                .expect("exited");
        }
        let due = s.due_webhooks(now_unix_millis(), 10).await;
        assert_eq!(due.len(), 1, "only the notifying runner's run: {due:?}");
        assert_eq!(due[0].run_id, run.id);
        let body: serde_json::Value = serde_json::from_str(&due[0].body).expect("json");
        assert_eq!(body["type"], "run.ended");
        assert_eq!(body["run"]["id"], run.id.as_str());
        assert_eq!(body["run"]["status"], "failed");
        assert_eq!(body["run"]["exit_code"], 3);
        assert!(
            s.due_webhooks(now_unix_millis(), 10).await.is_empty(),
            "in flight: handed out once"
        );
        let read = s.get_run(P, &quiet.id, &other.id).await.expect("get");
        assert!(read.notification.is_none());

        // A 500: pending again, due after its backoff (1 s), not before.
        s.webhook_attempted(&run.id, answered(Some(500)))
            .await
            .expect("attempt");
        let read = s.get_run(P, &runner.id, &run.id).await.expect("get");
        let n = read.notification.expect("shown with the run");
        assert_eq!(n.status, DeliveryStatus::Pending);
        assert_eq!(n.attempts.len(), 1);
        let next = n.next_attempt_at.expect("next attempt");
        assert!(s.due_webhooks(next - 1, 10).await.is_empty());
        (runner.id, run.id)
    };
    // A new leader reloads the pending delivery and hands it out when due.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    let due = s.due_webhooks(now_unix_millis() + 2_000, 10).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].attempts_made, 1);
    s.webhook_attempted(&run_id, answered(Some(200)))
        .await
        .expect("attempt");
    let n = s
        .get_run(P, &runner_id, &run_id)
        .await
        .expect("get")
        .notification
        .expect("shown");
    assert_eq!(n.status, DeliveryStatus::Delivered);
    assert_eq!(
        n.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
        [Some(500), Some(200)]
    );
    assert!(s.due_webhooks(i64::MAX, 10).await.is_empty(), "settled");
    drop(s);
    // Settled deliveries are not loaded again.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("reopen");
    assert!(s.due_webhooks(i64::MAX, 10).await.is_empty());
    assert_eq!(
        s.get_run(P, &runner_id, &run_id)
            .await
            .expect("get")
            .notification
            .map(|n| n.status),
        Some(DeliveryStatus::Delivered)
    );
}

#[tokio::test]
async fn the_secret_is_write_only_and_an_update_without_it_keeps_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let (runner, rev) = s.create_runner(P, notifying()).await.expect("runner");
    let shown = berth_core::convert::runner_to_pb(&runner, rev);
    assert_eq!(
        shown.spec.as_ref().and_then(|s| s.notify_secret.clone()),
        Some(String::new())
    );
    // What the API sends back after a PATCH of the URL alone: the secret it never saw.
    let mut next = runner.spec.clone();
    next.notify = Some(Notify {
        url: "http://127.0.0.1:10/other".into(),
        secret: String::new(),
    });
    let (updated, _) = s
        .update_runner(P, &runner.id, next, rev)
        .await
        .expect("update");
    assert_eq!(
        updated.spec.notify.map(|n| (n.url, n.secret)),
        Some((
            "http://127.0.0.1:10/other".into(),
            "0123456789abcdef".into()
        ))
    );
    // Without a stored one, an empty secret is refused.
    let mut bare = spec("fra", "standard-xs");
    bare.notify = Some(Notify {
        url: "http://127.0.0.1:10/x".into(),
        secret: String::new(),
    });
    assert!(matches!(
        s.create_runner(P, bare).await,
        Err(SchedulerError::Invalid(_))
    ));
}
