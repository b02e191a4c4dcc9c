//! What a runner's `max_concurrent_runs` promises, checked from the runs' own records: never more
//! than the cap of its runs holding a node at once.

use super::{instant as at, Fleet};
use anyhow::{Context, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The most intervals open at one instant (an interval ending when another starts does not
/// overlap it).
pub fn peak(intervals: &[(i128, i128)]) -> usize {
    let mut events: Vec<(i128, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // Ends before starts at the same instant.
    events.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, d) in events {
        open += d;
        most = most.max(open);
    }
    usize::try_from(most).unwrap_or(0)
}

/// Of the runs `ids` (ended), the most that held a node at once by the scheduler's clock
/// (assigned → end recorded) and the most whose processes ran at once by the node's clock
/// (started → exited).
pub async fn peaks(fleet: &Fleet, runner: &str, ids: &[String]) -> Result<(usize, usize)> {
    let (mut held, mut ran) = (Vec::new(), Vec::new());
    for id in ids {
        let run = fleet.run(runner, id).await?;
        let t = &run["timeline"];
        let span = |from: &str, to: &str| Some((at(&t[from])?, at(&t[to])?));
        held.push(span("assigned_at", "ended_at").with_context(|| format!("held span: {run}"))?);
        if let Some(s) = span("started_at", "exited_at") {
            ran.push(s);
        }
    }
    Ok((peak(&held), peak(&ran)))
}

/// Waits until every run of `ids` has ended; answers the ones that did not succeed.
pub async fn wait_all_ended(
    fleet: &Fleet,
    runner: &str,
    ids: &[String],
    within: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + within;
    let mut open: Vec<&String> = ids.iter().collect();
    let mut failed = Vec::new();
    while !open.is_empty() {
        let mut still = Vec::new();
        for id in open {
            let run = fleet.run(runner, id).await?;
            match run["status"].as_str() {
                Some("succeeded") => {}
                Some("failed" | "canceled") => failed.push(run),
                _ => still.push(id),
            }
        }
        open = still;
        anyhow::ensure!(
            open.is_empty() || Instant::now() < deadline,
            "{} of {} runs not ended after {within:?}",
            open.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(failed)
}
