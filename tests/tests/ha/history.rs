//! A history of what clients saw during a failover test, and a checker of it against the model
//! of a run: a register that only moves forward along the lifecycle (`pending` → `running` →
//! one terminal state, or straight to a terminal state), created once per idempotency key.
//!
//! Every operation is recorded with the instant it was invoked and the instant its answer
//! arrived. For a history to be linearizable against that model (as etcd's robustness tests
//! check theirs), each operation must appear to take effect at one point inside its interval.
//! For a forward-only register that comes down to these checks, applied only to pairs of
//! operations that do not overlap in time (overlapping ones may take effect in either order):
//! - a create acknowledged with a run id: every later create with the same idempotency key
//!   answers the same id, and every later read finds the run (no 404 after the ack);
//! - a read that follows another read of the same run never shows an earlier lifecycle stage,
//!   and once a terminal state was seen every later read shows that same state;
//! - at the end, every acknowledged run is in a terminal state.

use berth_core::RunStatus;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum Op {
    /// `POST …/runs` with an idempotency key; `Some(id)` when acknowledged (200/201), `None`
    /// when it failed or its outcome is unknown (503, timeout).
    Create { key: String, run_id: Option<String> },
    /// `GET …/runs/{id}`: the status, `None` for 404.
    Read {
        run_id: String,
        status: Option<RunStatus>,
    },
}

#[derive(Debug, Clone)]
pub struct Event {
    pub invoked: Instant,
    pub answered: Instant,
    pub op: Op,
}

#[derive(Default)]
pub struct History {
    events: std::sync::Mutex<Vec<Event>>,
}

impl History {
    pub fn record(&self, invoked: Instant, op: Op) {
        let event = Event {
            invoked,
            answered: Instant::now(),
            op,
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn stage(s: RunStatus) -> u8 {
    match s {
        RunStatus::Pending => 0,
        RunStatus::Running => 1,
        RunStatus::Succeeded | RunStatus::Failed | RunStatus::Canceled => 2,
    }
}

/// `a` finished before `b` started.
fn before(a: &Event, b: &Event) -> bool {
    a.answered < b.invoked
}

/// Every violation of the model found in `events`; empty when the history is consistent.
pub fn check(events: &[Event]) -> Vec<String> {
    let mut violations = Vec::new();
    // Acknowledged creates by idempotency key, and by run.
    let mut acked_by_key: HashMap<&str, Vec<(&Event, &str)>> = HashMap::new();
    let mut acked_by_run: HashMap<&str, Vec<&Event>> = HashMap::new();
    let mut reads: HashMap<&str, Vec<(&Event, Option<RunStatus>)>> = HashMap::new();
    for e in events {
        match &e.op {
            Op::Create {
                key,
                run_id: Some(id),
            } => {
                acked_by_key.entry(key).or_default().push((e, id));
                acked_by_run.entry(id).or_default().push(e);
            }
            Op::Create { run_id: None, .. } => {}
            Op::Read { run_id, status } => reads.entry(run_id).or_default().push((e, *status)),
        }
    }
    for (key, acks) in &acked_by_key {
        let first = acks[0].1;
        if let Some((_, other)) = acks.iter().find(|(_, id)| *id != first) {
            violations.push(format!(
                "idempotency key {key} created two runs: {first} and {other}"
            ));
        }
    }
    for (run, rs) in &reads {
        for (r, status) in rs {
            if status.is_none() {
                if let Some(ack) = acked_by_run
                    .get(run)
                    .and_then(|a| a.iter().find(|a| before(a, r)))
                {
                    violations.push(format!(
                        "run {run}: a read invoked {:?} after its create was acknowledged found no run",
                        r.invoked.duration_since(ack.answered)
                    ));
                }
            }
        }
        for (a, sa) in rs {
            for (b, sb) in rs {
                let (Some(sa), Some(sb)) = (sa, sb) else {
                    continue;
                };
                if !before(a, b) {
                    continue;
                }
                if stage(*sb) < stage(*sa) || (sa.is_terminal() && sa != sb) {
                    violations.push(format!(
                        "run {run}: read {sa:?}, then a later read saw {sb:?}"
                    ));
                }
            }
        }
    }
    violations
}

/// The acknowledged runs whose last read is not terminal (call after reading every run once
/// more at the end).
pub fn unfinished(events: &[Event]) -> Vec<String> {
    let mut last: HashMap<&str, (&Event, Option<RunStatus>)> = HashMap::new();
    let mut acked = Vec::new();
    for e in events {
        match &e.op {
            Op::Create {
                run_id: Some(id), ..
            } => acked.push(id.as_str()),
            Op::Read { run_id, status } => {
                let newer = last
                    .get(run_id.as_str())
                    .is_none_or(|(prev, _)| prev.invoked < e.invoked);
                if newer {
                    last.insert(run_id, (e, *status));
                }
            }
            Op::Create { .. } => {}
        }
    }
    acked.sort_unstable();
    acked.dedup();
    acked
        .into_iter()
        .filter(|id| !matches!(last.get(id), Some((_, Some(s))) if s.is_terminal()))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Clock(Instant);
    impl Clock {
        /// An event over [at, at + len] in ms from the start.
        fn ev(&self, at: u64, len: u64, op: Op) -> Event {
            Event {
                invoked: self.0 + Duration::from_millis(at),
                answered: self.0 + Duration::from_millis(at + len),
                op,
            }
        }
    }

    fn read(id: &str, s: Option<RunStatus>) -> Op {
        Op::Read {
            run_id: id.to_owned(),
            status: s,
        }
    }

    fn create(key: &str, id: Option<&str>) -> Op {
        Op::Create {
            key: key.to_owned(),
            run_id: id.map(str::to_owned),
        }
    }

    #[test]
    fn a_consistent_history_passes() {
        let c = Clock(Instant::now());
        let h = vec![
            c.ev(0, 10, create("k1", None)), // 503 during the failover
            c.ev(20, 10, create("k1", Some("r1"))),
            c.ev(25, 20, read("r1", None)), // overlaps the create: may precede it
            c.ev(40, 5, read("r1", Some(RunStatus::Pending))),
            c.ev(50, 5, read("r1", Some(RunStatus::Running))),
            c.ev(60, 5, create("k1", Some("r1"))), // the retry returns the same run
            c.ev(70, 5, read("r1", Some(RunStatus::Succeeded))),
        ];
        assert!(check(&h).is_empty(), "{:?}", check(&h));
        assert!(unfinished(&h).is_empty());
    }

    #[test]
    fn each_anomaly_is_caught() {
        let c = Clock(Instant::now());
        let cases: Vec<(&str, Vec<Event>)> = vec![
            (
                "two runs for one key",
                vec![
                    c.ev(0, 5, create("k", Some("a"))),
                    c.ev(10, 5, create("k", Some("b"))),
                ],
            ),
            (
                "lost after ack",
                vec![
                    c.ev(0, 5, create("k", Some("a"))),
                    c.ev(10, 5, read("a", None)),
                ],
            ),
            (
                "went back",
                vec![
                    c.ev(0, 5, read("a", Some(RunStatus::Running))),
                    c.ev(10, 5, read("a", Some(RunStatus::Pending))),
                ],
            ),
            (
                "terminal changed",
                vec![
                    c.ev(0, 5, read("a", Some(RunStatus::Failed))),
                    c.ev(10, 5, read("a", Some(RunStatus::Succeeded))),
                ],
            ),
        ];
        for (name, h) in cases {
            assert!(!check(&h).is_empty(), "{name} was not caught");
        }
        let h = vec![
            c.ev(0, 5, create("k", Some("a"))),
            c.ev(10, 5, read("a", Some(RunStatus::Running))),
        ];
        assert_eq!(unfinished(&h), vec!["a".to_owned()]);
    }

    #[test]
    fn overlapping_reads_may_take_effect_in_either_order() {
        let c = Clock(Instant::now());
        let h = vec![
            c.ev(0, 20, read("a", Some(RunStatus::Running))),
            c.ev(5, 5, read("a", Some(RunStatus::Pending))),
        ];
        assert!(check(&h).is_empty());
    }
}
