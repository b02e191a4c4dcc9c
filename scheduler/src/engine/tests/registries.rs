//! Private registries and image references.

use super::*;

#[tokio::test]
async fn private_registries_seal_passwords_and_hand_credentials_only_to_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let key = Arc::new(SecretKey::generate());
    let cfg = || Config {
        secrets: Some(key.clone()),
        ..config()
    };
    let spec_private = |registry_id: &str| RunnerSpec {
        image_name: "team/app".into(),
        container_registry_id: Some(registry_id.to_owned()),
        ..spec("fra", "standard-s")
    };
    let (reg_id, runner_id) = {
        let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), cfg())
            .await
            .expect("open");
        let reg = s
            .create_registry(
                P,
                RegistrySpec {
                    name: "private".into(),
                    host: "127.0.0.1:5002".into(),
                    username: "berth".into(),
                    password: "s3cret-pass".into(),
                },
            )
            .await
            .expect("registry");
        assert!(!reg.password_sealed.contains("s3cret-pass"));
        let missing = s.create_runner(P, spec_private("nope")).await;
        assert!(
            matches!(missing, Err(SchedulerError::Invalid(_))),
            "unknown registry id is a field error"
        );
        let (runner, _) = s
            .create_runner(P, spec_private(&reg.id))
            .await
            .expect("runner");
        let in_use = s.delete_registry(P, &reg.id).await;
        assert!(matches!(in_use, Err(SchedulerError::InUse(_))));
        (reg.id, runner.id)
    };
    // The password is nowhere in the store file in clear.
    let raw = std::fs::read(&path).expect("read store");
    assert!(
        !raw.windows(11).any(|w| w == b"s3cret-pass"),
        "password stored in clear"
    );
    // After a restart the credentials are unsealed again and reach the node with the run.
    let s = Scheduler::open(EmbeddedStore::open(&path).expect("store"), cfg())
        .await
        .expect("reopen");
    let mut node = attach(&s, register("fra-1", "fra", 4096, &[])).await;
    let run = s
        .create_run(P, &runner_id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(
        run.image, "127.0.0.1:5002/team/app:latest",
        "the registry's host names the image"
    );
    let a = next_assign(&mut node);
    let auth = a.spec.registry_auth.expect("credentials in the spec");
    assert_eq!(
        (
            auth.host.as_str(),
            auth.username.as_str(),
            auth.password.as_str()
        ),
        ("127.0.0.1:5002", "berth", "s3cret-pass")
    );
    // Without a key, a store holding sealed secrets refuses to open.
    drop(s);
    assert!(
        Scheduler::open(EmbeddedStore::open(&path).expect("store"), config())
            .await
            .is_err()
    );
    let _ = reg_id;
}

#[test]
fn image_references() {
    assert_eq!(
        image_reference("docker.io", "busybox", "latest"),
        "docker.io/library/busybox:latest"
    );
    assert_eq!(
        image_reference("127.0.0.1:5000", "busybox", "1.36"),
        "127.0.0.1:5000/busybox:1.36"
    );
    assert_eq!(
        image_reference("docker.io", "ghcr.io/a/b", "v1"),
        "ghcr.io/a/b:v1"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_eq!(
        image_reference("r:1", "x/y", &digest),
        format!("r:1/x/y@{digest}")
    );
}
