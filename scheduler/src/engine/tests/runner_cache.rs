//! The runner cache: creating runs reads nothing from the store once the term knows the
//! runner, and what the runs get is always the runner's latest committed version.

use super::active::Watched;
use super::*;

fn runner_reads(store: &Watched, id: &str) -> usize {
    let key = format!("get {}", keys::runner(id));
    store.reads().iter().filter(|r| **r == key).count()
}

#[tokio::test]
async fn runs_are_created_from_the_cached_runner_and_see_every_change_to_it() {
    let store = Watched::default();
    let s = Scheduler::open(store.clone(), config())
        .await
        .expect("open");
    let (runner, rev) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    for _ in 0..3 {
        s.create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
    }
    assert_eq!(
        runner_reads(&store, &runner.id),
        0,
        "the runner this term created is never read back"
    );

    // An update is what the next run gets.
    let mut changed = spec("fra", "standard-s");
    changed.image_tag = "1.36".into();
    let (_, rev) = s
        .update_runner(P, &runner.id, changed, rev)
        .await
        .expect("update");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(run.image.ends_with(":1.36"), "the run got {}", run.image);
    assert_eq!(runner_reads(&store, &runner.id), 0);

    // A write that conflicts (a stale revision) leaves the cache unsure: the next read is the
    // store's, and it is the committed version.
    let mut stale = spec("fra", "standard-s");
    stale.image_tag = "never".into();
    s.update_runner(P, &runner.id, stale, rev - 1)
        .await
        .expect_err("a stale revision is refused");
    let run = s
        .create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert!(run.image.ends_with(":1.36"), "the run got {}", run.image);
    assert_eq!(runner_reads(&store, &runner.id), 1);
    s.create_run(P, &runner.id, RunOverrides::default())
        .await
        .expect("run");
    assert_eq!(runner_reads(&store, &runner.id), 1, "then cached again");

    // Another project never sees it, cached or not.
    assert!(matches!(
        s.create_run("another", &runner.id, RunOverrides::default())
            .await,
        Err(SchedulerError::NotFound { .. })
    ));

    // A new term (a new engine on the same store) reads it once.
    let reopened = store.reopened();
    let s2 = Scheduler::open(reopened.clone(), config())
        .await
        .expect("reopen");
    drop(s);
    for _ in 0..2 {
        let run = s2
            .create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        assert!(run.image.ends_with(":1.36"), "the run got {}", run.image);
    }
    assert_eq!(runner_reads(&reopened, &runner.id), 1);

    // Deleted: no run of it any more, without asking the store.
    s2.delete_runner(P, &runner.id).await.expect("delete");
    let reads = runner_reads(&reopened, &runner.id);
    assert!(matches!(
        s2.create_run(P, &runner.id, RunOverrides::default()).await,
        Err(SchedulerError::NotFound { .. })
    ));
    assert_eq!(runner_reads(&reopened, &runner.id), reads);
}
