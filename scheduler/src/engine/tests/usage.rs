//! Billed usage.

use super::*;
use crate::engine::usage::utc_day;

#[tokio::test]
async fn usage_bills_started_runs_by_the_second_grouped() {
    let s = Scheduler::open(MemoryStore::new(), config())
        .await
        .expect("open");
    let mut node = attach(&s, register("fra-1", "fra", 8192, &[])).await;
    let (small, _) = s
        .create_runner(P, spec("fra", "standard-s"))
        .await
        .expect("runner");
    let (medium, _) = s
        .create_runner(P, spec("fra", "standard-m"))
        .await
        .expect("runner");
    // standard-s: 4,000 nano-USD/s for 2.5 s → 3 s; standard-m: 8,000 for 2.5 s → 3 s.
    for runner in [&small, &medium] {
        s.create_run(P, &runner.id, RunOverrides::default())
            .await
            .expect("run");
        let a = next_assign(&mut node);
        s.run_started("fra-1", started(&a)).await.expect("started");
        s.run_exited("fra-1", exited(&a, 0, ExitReason::Exited))
            .await
            .expect("exited");
    }
    // A run canceled while pending is never billed.
    s.set_draining("fra-1", true).await.expect("drain");
    let never = s
        .create_run(P, &small.id, RunOverrides::default())
        .await
        .expect("run");
    s.stop_run(P, &small.id, &never.id).await.expect("stop");

    let rows = s
        .usage(P, 0, i64::MAX, UsageGroup::InstanceType)
        .await
        .expect("usage");
    let got: Vec<(String, u64, u64, u64)> = rows
        .into_iter()
        .map(|r| (r.key, r.runs, r.billed_seconds, r.cost_nano_usd))
        .collect();
    assert_eq!(
        got,
        vec![
            ("standard-m".to_string(), 1, 3, 24_000),
            ("standard-s".to_string(), 1, 3, 12_000)
        ]
    );
    let days = s
        .usage(P, 0, i64::MAX, UsageGroup::Day)
        .await
        .expect("usage");
    assert_eq!(days.len(), 1);
    assert_eq!(
        days[0].key, "1970-01-01",
        "the test's runs ended 3.5 s after the epoch"
    );
    assert!(
        s.usage(P, 0, 3_000, UsageGroup::Runner)
            .await
            .expect("usage")
            .is_empty(),
        "ended at 3,500 ms: outside [0, 3000)"
    );
}

#[test]
fn utc_days() {
    assert_eq!(utc_day(0), "1970-01-01");
    assert_eq!(utc_day(1_795_000_000_000), "2026-11-18");
    assert_eq!(utc_day(951_782_400_000), "2000-02-29");
    assert_eq!(utc_day(-1), "1969-12-31");
    assert_eq!(
        utc_day(i64::MAX),
        "9999-12-31",
        "beyond the calendar clamps"
    );
}
