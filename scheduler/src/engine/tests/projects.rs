//! Projects' isolation and API keys.

use super::*;

#[tokio::test]
async fn another_projects_records_are_not_found_and_never_listed() {
    let key = Arc::new(SecretKey::generate());
    let s = Scheduler::open(
        MemoryStore::new(),
        Config {
            secrets: Some(key),
            ..config()
        },
    )
    .await
    .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let reg = s
        .create_registry(
            "alpha",
            RegistrySpec {
                name: "private".into(),
                host: "127.0.0.1:5002".into(),
                username: "berth".into(),
                password: "s3cret-pass".into(),
            },
        )
        .await
        .expect("registry");
    let (runner, _) = s
        .create_runner("alpha", spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (run, _) = s
        .create_run_with_key("alpha", &runner.id, RunOverrides::default(), Some("k1"))
        .await
        .expect("run");
    assert_eq!(
        (runner.project.as_str(), run.project.as_str()),
        ("alpha", "alpha")
    );
    let a = next_assign(&mut node);
    s.run_started("fra-1", started(&a)).await.expect("started");
    s.append_logs(
        "fra-1",
        LogBatch {
            run_id: a.run_id.clone(),
            lines: vec![LogLine {
                seq: 1,
                stream: LogStream::Stdout,
                msg: "alpha's line".into(),
                ts_unix_nanos: 1,
            }],
        },
    )
    .await
    .expect("logs");
    s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
        .await
        .expect("exited");

    // beta sees none of it, by id or in lists.
    let b = "beta";
    assert!(not_found(s.get_runner(b, &runner.id).await));
    assert!(not_found(
        s.update_runner(b, &runner.id, spec("fra", "standard-s"), 0)
            .await
    ));
    assert!(not_found(s.delete_runner(b, &runner.id).await));
    assert!(not_found(s.get_run(b, &runner.id, &run.id).await));
    assert!(not_found(
        s.list_runs(b, &runner.id, None, usize::MAX, false).await
    ));
    assert!(not_found(s.stop_run(b, &runner.id, &run.id).await));
    assert!(not_found(s.list_logs(b, &runner.id, &run.id, 0, 10).await));
    assert!(not_found(s.warmup_runner(b, &runner.id, 0).await));
    assert!(not_found(
        s.create_run(b, &runner.id, RunOverrides::default()).await
    ));
    assert!(not_found(
        s.create_run_with_key(b, &runner.id, RunOverrides::default(), Some("k1"))
            .await
    ));
    assert!(not_found(
        s.create_runs(b, &runner.id, vec![RunOverrides::default()])
            .await
    ));
    assert!(not_found(s.get_registry(b, &reg.id).await));
    assert!(not_found(s.delete_registry(b, &reg.id).await));
    assert!(s.list_runners(b).await.expect("list").is_empty());
    assert!(s.list_registries(b).await.expect("list").is_empty());
    assert!(s
        .usage(b, 0, i64::MAX, UsageGroup::Runner)
        .await
        .expect("usage")
        .is_empty());
    // beta's runner may not name alpha's registry: to beta it does not exist.
    let borrowed = RunnerSpec {
        container_registry_id: Some(reg.id.clone()),
        ..spec("fra", "standard-s")
    };
    assert!(matches!(
        s.create_runner(b, borrowed.clone()).await,
        Err(SchedulerError::Invalid(_))
    ));
    // The same idempotency key in beta's own runner creates beta's own run.
    let (beta_runner, _) = s
        .create_runner(b, spec("fra", "standard-s"))
        .await
        .expect("beta runner");
    let (beta_run, replayed) = s
        .create_run_with_key(b, &beta_runner.id, RunOverrides::default(), Some("k1"))
        .await
        .expect("beta run");
    assert!(!replayed && beta_run.id != run.id && beta_run.project == b);

    // alpha sees its own.
    assert_eq!(s.list_runners("alpha").await.expect("list").len(), 1);
    assert_eq!(s.list_registries("alpha").await.expect("list").len(), 1);
    let (logs, _) = s
        .list_logs("alpha", &runner.id, &run.id, 0, 10)
        .await
        .expect("alpha's logs");
    assert_eq!(logs.len(), 1);
    let usage = s
        .usage("alpha", 0, i64::MAX, UsageGroup::Runner)
        .await
        .expect("usage");
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].key, runner.id);
    assert!(
        s.create_runner("alpha", borrowed).await.is_ok(),
        "a runner may name its own project's registry"
    );
}

#[tokio::test]
async fn records_written_before_projects_belong_to_default() {
    let store = MemoryStore::new();
    let legacy = serde_json::json!({
        "id": "0190aaaa-0000-7000-8000-000000000001",
        "spec": spec("fra", "standard-s"),
        "warmed_at": null, "created_at": 1, "updated_at": 1
    });
    store
        .commit(Txn::new().put(
            keys::runner("0190aaaa-0000-7000-8000-000000000001"),
            serde_json::to_vec(&legacy).expect("json"),
            Expect::Absent,
        ))
        .await
        .expect("seed");
    let s = Scheduler::open(store, config()).await.expect("open");
    let (r, _) = s
        .get_runner("default", "0190aaaa-0000-7000-8000-000000000001")
        .await
        .expect("a legacy runner is in default");
    assert_eq!(r.project, "default");
    assert!(not_found(
        s.get_runner("alpha", "0190aaaa-0000-7000-8000-000000000001")
            .await
    ));
}

#[tokio::test]
async fn api_keys_are_stored_hashed_verified_and_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
        .await
        .expect("open");
    let bad = s.create_api_key("Not_A_Project", "x").await;
    assert!(matches!(bad, Err(SchedulerError::Invalid(ref v)) if v.0[0].field == "project"));
    let (key, plaintext) = s.create_api_key("alpha", "ci").await.expect("create");
    let (other, _) = s.create_api_key("beta", "").await.expect("create");
    let presented = berth_core::auth::parse_key(&plaintext).expect("well-formed");
    assert_eq!(presented.key_id, key.key_id);

    let who = s.authenticate_api_key(&plaintext).await.expect("valid key");
    assert_eq!(
        (who.project.as_str(), who.key_id.as_str()),
        ("alpha", key.key_id.as_str())
    );
    // A wrong secret with a real key id, an unknown id, garbage: all the same refusal.
    let wrong_secret = format!("berth_{}_{}", key.key_id, "0".repeat(64));
    let unknown_id = format!("berth_{}_{}", "f".repeat(16), presented.secret);
    for bad in [wrong_secret.as_str(), unknown_id.as_str(), "garbage", ""] {
        assert!(
            matches!(
                s.authenticate_api_key(bad).await,
                Err(SchedulerError::Unauthenticated)
            ),
            "{bad}"
        );
    }
    assert_eq!(s.list_api_keys(None).await.expect("list").len(), 2);
    let alpha_keys = s.list_api_keys(Some("alpha")).await.expect("list");
    assert_eq!(alpha_keys.len(), 1);
    assert_eq!(alpha_keys[0].key_id, key.key_id);

    let revoked = s.revoke_api_key(&key.key_id).await.expect("revoke");
    assert!(revoked.revoked_at.is_some());
    assert!(matches!(
        s.authenticate_api_key(&plaintext).await,
        Err(SchedulerError::Unauthenticated)
    ));
    let again = s.revoke_api_key(&key.key_id).await.expect("revoke twice");
    assert_eq!(
        again.revoked_at, revoked.revoked_at,
        "revoking is idempotent"
    );
    assert!(not_found(s.revoke_api_key("nope").await));
    assert!(s.authenticate_api_key(&plaintext).await.is_err());
    assert!(s.list_api_keys(Some("beta")).await.expect("list")[0].key_id == other.key_id);

    // Only the hash is stored: the secret is nowhere in the store file.
    drop(s);
    let raw = std::fs::read(&path).expect("read store");
    assert!(
        !raw.windows(presented.secret.len())
            .any(|w| w == presented.secret.as_bytes()),
        "the secret is stored in clear"
    );
    assert!(raw
        .windows(key.secret_sha256.len())
        .any(|w| w == key.secret_sha256.as_bytes()));
}
