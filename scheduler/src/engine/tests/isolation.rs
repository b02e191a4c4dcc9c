//! Sandboxed runs (issue #16): only nodes that registered with gVisor take them, a run no node
//! of its region can host says so, an instance type may force the sandbox, and the run keeps
//! the runtime its node reported.

use super::*;
use berth_core::model::{Catalog, InstanceType};
use berth_core::Isolation;

fn sandboxed() -> RunnerSpec {
    RunnerSpec {
        isolation: Isolation::Sandbox,
        ..spec("fra", "standard-xs")
    }
}

fn with_gvisor(node: &str, mem: u64) -> Registration {
    Registration {
        runtimes: vec!["runc".into(), "runsc".into()],
        ..register(node, "fra", mem, &[])
    }
}

#[tokio::test]
async fn a_sandboxed_run_waits_for_a_node_with_gvisor_and_runs_there() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut plain = attach(&s, register("fra-plain", "fra", 8192, &[])).await;
    let (runner, _) = s.create_runner(P, sandboxed()).await.expect("runner");
    assert_eq!(runner.spec.isolation, Isolation::Sandbox);
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(run.isolation, Isolation::Sandbox);
    assert!(
        plain.try_recv().is_err(),
        "never sent to a node without gVisor"
    );
    let waiting = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        waiting.pending_reason.as_deref(),
        Some("no node in fra can run sandboxed runs: none of its 1 has gVisor (runsc)")
    );

    // A container run of the same size goes to the plain node meanwhile.
    let (plain_runner, _) = s
        .create_runner(P, spec("fra", "standard-xs"))
        .await
        .expect("runner");
    let container = s
        .create_run(P, &plain_runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut plain);
    assert_eq!(a.run_id, container.id);
    assert_eq!(a.spec.isolation, Isolation::Container);

    let mut gvisor = attach(&s, with_gvisor("fra-gvisor", 8192)).await;
    let a = next_assign(&mut gvisor);
    assert_eq!(a.run_id, run.id);
    assert_eq!(a.spec.isolation, Isolation::Sandbox, "the node is told");
    s.run_started(
        "fra-gvisor",
        RunStarted {
            runtime: Some("runsc 0.0~20221219.0".into()),
            ..started(&a)
        },
    )
    .await
    .expect("started");
    let got = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(got.node_id.as_deref(), Some("fra-gvisor"));
    assert_eq!(got.runtime.as_deref(), Some("runsc 0.0~20221219.0"));
    assert_eq!(got.isolation, Isolation::Sandbox);
    let nodes = s.list_nodes().await;
    let runtimes: Vec<(&str, &[String])> = nodes
        .iter()
        .map(|n| (n.view.id.as_str(), n.runtimes.as_slice()))
        .collect();
    assert_eq!(
        runtimes,
        [
            ("fra-gvisor", &["runc".to_owned(), "runsc".to_owned()][..]),
            ("fra-plain", &["runc".to_owned()][..])
        ]
    );
}

#[tokio::test]
async fn a_full_gvisor_node_is_told_apart_from_nodes_without_it() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let _plain = attach(&s, register("fra-plain", "fra", 8192, &[])).await;
    let _gvisor = attach(&s, with_gvisor("fra-gvisor", 256)).await;
    let (runner, _) = s.create_runner(P, sandboxed()).await.expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let waiting = s.get_run(P, &runner.id, &run.id).await.expect("get");
    assert_eq!(
        waiting.pending_reason.as_deref(),
        Some("no node in fra with 512 MiB free: 1 without gVisor (runsc), 1 full")
    );
}

#[tokio::test]
async fn an_instance_type_may_force_the_sandbox() {
    let mut catalog = Catalog::default();
    catalog.instance_types.push(InstanceType {
        slug: "untrusted-s".into(),
        cpu_millis: 1000,
        memory_mib: 1024,
        price_per_second_usd: 0.000_005,
        isolation: Some(Isolation::Sandbox),
    });
    let s = Scheduler::open(
        MemoryStore::new(),
        Config {
            catalog: Arc::new(catalog),
            ..config()
        },
    )
    .await
    .expect("open");
    let mut plain = attach(&s, register("fra-plain", "fra", 8192, &[])).await;
    let mut gvisor = attach(&s, with_gvisor("fra-gvisor", 2048)).await;
    // The runner chose nothing; its type decides.
    let (runner, _) = s
        .create_runner(P, spec("fra", "untrusted-s"))
        .await
        .expect("runner");
    assert_eq!(runner.spec.isolation, Isolation::Container);
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(run.isolation, Isolation::Sandbox);
    assert!(plain.try_recv().is_err());
    assert_eq!(next_assign(&mut gvisor).run_id, run.id);
}

#[tokio::test]
async fn a_retry_keeps_the_isolation_and_forgets_the_runtime() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut gvisor = attach(&s, with_gvisor("fra-gvisor", 8192)).await;
    let (runner, _) = s
        .create_runner(
            P,
            RunnerSpec {
                retry_policy: Some(berth_core::retry::RetryPolicy {
                    max_attempts: 2,
                    backoff_seconds: 0,
                    backoff_multiplier: 2,
                    max_backoff_seconds: 60,
                    retry_on: vec![berth_core::retry::RetryCause::ExitCode],
                    exit_codes: vec![],
                }),
                ..sandboxed()
            },
        )
        .await
        .expect("runner");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    let a = next_assign(&mut gvisor);
    s.run_started(
        "fra-gvisor",
        RunStarted {
            runtime: Some("runsc 0.0~20221219.0".into()),
            ..started(&a)
        },
    )
    .await
    .expect("started");
    s.run_exited("fra-gvisor", exited(&a, 1, ExitReason::Exited))
        .await
        .expect("exited");
    let first = s.get_run(P, &runner.id, &run.id).await.expect("get");
    let next = first.next_attempt_id.clone().expect("retried");
    let second = s.get_run(P, &runner.id, &next).await.expect("get");
    assert_eq!(second.isolation, Isolation::Sandbox);
    assert_eq!(second.runtime, None, "not started yet");
}
