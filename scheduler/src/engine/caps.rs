//! Per-runner concurrency caps (`max_concurrent_runs`): how many runs of each runner hold a node
//! (assigned to one or running there), and the cap of each runner that sets one.
//!
//! A scheduling pass skips the waiting runs of a runner at its cap (they keep their place in the
//! region's queue and say why they wait); a run that ends frees its slot and its exit's pass
//! places the next one. The counts are kept by `stage` (the one place a run's node changes), so
//! they are exact within one scheduler; a new leader rebuilds them from the active runs it loads
//! and the caps from the runner records, so the cap holds across a failover too.
//!
//! A run holds its slot from its assignment until the scheduler records its end. A run whose
//! node is lost ends `node_lost` and frees its slot at once, like its lease.

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct RunnerCaps {
    /// Runner id → its cap and the revision of the runner record it was read from (a slower
    /// update never overwrites a newer one).
    caps: HashMap<String, (u32, u64)>,
    /// Runner id → runs holding a node, for every runner: a cap set later counts the runs that
    /// are already out.
    holding: HashMap<String, u32>,
}

impl RunnerCaps {
    /// Records `runner_id`'s cap as of its record's `revision` (None: no cap). Returns whether
    /// more of its runs may now hold a node than before (the cap rose or went): a pass may place
    /// some.
    pub(super) fn set(&mut self, runner_id: &str, cap: Option<u32>, revision: u64) -> bool {
        let before = self.caps.get(runner_id).copied();
        if before.is_some_and(|(_, rev)| rev > revision) {
            return false;
        }
        match cap {
            Some(cap) => {
                self.caps.insert(runner_id.to_owned(), (cap, revision));
            }
            None => {
                self.caps.remove(runner_id);
            }
        }
        match (before, cap) {
            (Some((old, _)), Some(new)) => new > old,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The runner is gone: its runs are no longer capped.
    pub(super) fn forget(&mut self, runner_id: &str) {
        self.caps.remove(runner_id);
    }

    /// A run of `runner_id` held a node before a change (`before`) and holds one after it
    /// (`after`).
    pub(super) fn hold(&mut self, runner_id: &str, before: bool, after: bool) {
        match (before, after) {
            // No allocation once a runner has an entry (kept at 0: one per runner).
            (false, true) => match self.holding.get_mut(runner_id) {
                Some(n) => *n += 1,
                None => {
                    self.holding.insert(runner_id.to_owned(), 1);
                }
            },
            (true, false) => {
                if let Some(n) = self.holding.get_mut(runner_id) {
                    *n = n.saturating_sub(1);
                }
            }
            _ => {}
        }
    }

    /// Whether `runner_id` has a cap (a run of it ending frees a slot a pass can use at once).
    pub(super) fn capped(&self, runner_id: &str) -> bool {
        self.caps.contains_key(runner_id)
    }

    /// `Some((cap, holding))` while `runner_id` may not place another run.
    pub(super) fn full(&self, runner_id: &str) -> Option<(u32, u32)> {
        let &(cap, _) = self.caps.get(runner_id)?;
        let holding = self.holding.get(runner_id).copied().unwrap_or(0);
        (holding >= cap).then_some((cap, holding))
    }

    /// Runs holding a node per runner, runners with none left out.
    #[cfg(test)]
    pub(super) fn all_holding(&self) -> HashMap<String, u32> {
        self.holding
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.clone(), *n))
            .collect()
    }
}

impl super::State {
    /// [`RunnerCaps::set`], and the waiting runs of a capped runner kept apart for their places
    /// behind the cap (only capped runners pay for that).
    pub(super) fn set_cap(&mut self, runner_id: &str, cap: Option<u32>, revision: u64) -> bool {
        let more = self.caps.set(runner_id, cap, revision);
        if self.caps.capped(runner_id) {
            let waiting = self.active.values().filter(|r| super::is_queued(r));
            self.queue.track_runner(runner_id, waiting);
        } else {
            self.queue.untrack_runner(runner_id);
        }
        more
    }

    /// The runner is gone: no cap, nothing kept apart.
    pub(super) fn forget_cap(&mut self, runner_id: &str) {
        self.caps.forget(runner_id);
        self.queue.untrack_runner(runner_id);
    }
}

/// Why a run of a runner at its cap waits (its place behind the cap is added on read, see
/// [`with_place`]).
pub(super) fn reason(cap: u32, holding: u32) -> String {
    format!(
        "waiting for a slot: the runner's max_concurrent_runs is {cap} and {holding} of its runs are assigned or running"
    )
}

/// [`reason`] with the run's place among its runner's waiting runs.
pub(super) fn with_place(cap: u32, holding: u32, place: usize, waiting: usize) -> String {
    format!(
        "{}; {} of the runner's {waiting} waiting runs",
        reason(cap, holding),
        ordinal(place)
    )
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_is_full_at_its_cap_and_counts_runs_from_before_the_cap() {
        let mut c = RunnerCaps::default();
        c.hold("a", false, true);
        c.hold("a", false, true);
        assert_eq!(c.full("a"), None, "no cap");
        assert!(!c.set("a", Some(2), 5), "a new cap never lets more run");
        assert_eq!(c.full("a"), Some((2, 2)));
        c.hold("a", true, true); // still holding (e.g. started)
        assert_eq!(c.full("a"), Some((2, 2)));
        c.hold("a", true, false);
        assert_eq!(c.full("a"), None);
        assert!(c.set("a", Some(3), 6), "a raised cap may place more");
        assert!(!c.set("a", Some(1), 7), "a lowered one may not");
        assert_eq!(c.full("a"), Some((1, 1)));
        assert!(!c.set("a", Some(9), 6), "an older record is ignored");
        assert_eq!(c.full("a"), Some((1, 1)));
        assert!(c.set("a", None, 8), "removing the cap may place more");
        assert_eq!(c.full("a"), None);
        c.hold("a", true, false);
        assert!(
            c.all_holding().is_empty(),
            "a runner with none holding counts none"
        );
        c.set("b", Some(1), 1);
        c.hold("b", false, true);
        c.forget("b");
        assert_eq!(c.full("b"), None);
    }

    #[test]
    fn the_reason_names_the_cap_and_the_place() {
        assert_eq!(
            with_place(5, 5, 2, 12),
            "waiting for a slot: the runner's max_concurrent_runs is 5 and 5 of its runs are \
             assigned or running; 2nd of the runner's 12 waiting runs"
        );
        let ords: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            ords,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }
}
