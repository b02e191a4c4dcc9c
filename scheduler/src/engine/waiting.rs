//! The runs waiting for placement, per region, in submission order, with what a scheduling pass
//! needs to stop early.
//!
//! A pass places each region's waiting runs oldest first. Within one pass the free capacity of
//! a region only shrinks (placing takes memory and slots; the starvation guard reserves a node
//! for one run), so once a run of `m` MiB found no node, every later run of that region needing
//! `m` MiB or more finds none either. When that holds for every run still waiting in the region
//! (the smallest size waiting is at least the blocked size), the pass stops there: the runs it
//! did not look at are *skipped*, and each waits for the reason placement gives its size at
//! that moment, kept here per size. Without this, every pass (one per submitted run) walked
//! every waiting run: with 20,000 waiting that was the whole scheduler's CPU.
//!
//! A run's *size* is its memory and whether it is sandboxed ([`Size`]): a sandboxed run that
//! finds no node says nothing about runs any node may take, so only a container run's failure
//! blocks the sizes at or above its memory (no node at all has that much free), and reasons
//! are kept per size.

use berth_core::{Isolation, Run};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

/// What placement needs of a waiting run beyond its region: its memory, and whether it is
/// sandboxed (only nodes with gVisor take it). Orders by memory first.
pub(super) type Size = (u64, bool);

pub(super) fn size(run: &Run) -> Size {
    (run.memory_mib, run.isolation == Isolation::Sandbox)
}

#[derive(Default)]
pub(super) struct WaitQueue {
    regions: BTreeMap<String, RegionQueue>,
    /// The same run ids per runner, for a run's place behind its runner's cap: kept for runners
    /// with a cap only (`track_runner`), so runs of uncapped runners cost nothing more here.
    runners: HashMap<String, BTreeSet<String>>,
}

#[derive(Default)]
struct RegionQueue {
    /// Run ids (UUIDv7: ordered by submission).
    ids: BTreeSet<String>,
    /// How many waiting runs have each size.
    sizes: BTreeMap<Size, usize>,
    /// What the last pass left unvisited (see the module doc).
    skipped: Option<Skipped>,
}

struct Skipped {
    /// The first run id the pass did not look at; every later waiting run was skipped too.
    from: String,
    /// Why a skipped run waits, by its size.
    reasons: HashMap<Size, String>,
}

impl WaitQueue {
    /// Adds a waiting run (again: no effect).
    pub(super) fn insert(&mut self, run: &Run) {
        let q = self.regions.entry(run.region.clone()).or_default();
        if q.ids.insert(run.id.clone()) {
            *q.sizes.entry(size(run)).or_default() += 1;
            if let Some(ids) = self.runners.get_mut(&run.runner_id) {
                ids.insert(run.id.clone());
            }
        }
    }

    /// Keeps `runner_id`'s waiting runs apart from now on (it has a cap), starting with those of
    /// `waiting` (the runs this queue holds).
    pub(super) fn track_runner<'a>(
        &mut self,
        runner_id: &str,
        waiting: impl Iterator<Item = &'a Run>,
    ) {
        if self.runners.contains_key(runner_id) {
            return;
        }
        let ids = waiting
            .filter(|r| r.runner_id == runner_id)
            .map(|r| r.id.clone())
            .collect();
        self.runners.insert(runner_id.to_owned(), ids);
    }

    /// `runner_id` has no cap any more.
    pub(super) fn untrack_runner(&mut self, runner_id: &str) {
        self.runners.remove(runner_id);
    }

    /// Removes a run that no longer waits (absent: no effect).
    pub(super) fn remove(&mut self, run: &Run) {
        let Some(q) = self.regions.get_mut(&run.region) else {
            return;
        };
        if q.ids.remove(&run.id) {
            if let Some(n) = q.sizes.get_mut(&size(run)) {
                *n -= 1;
                if *n == 0 {
                    q.sizes.remove(&size(run));
                }
            }
            if let Some(ids) = self.runners.get_mut(&run.runner_id) {
                ids.remove(&run.id);
            }
        }
        if q.ids.is_empty() {
            self.regions.remove(&run.region);
        }
    }

    /// The regions with waiting runs.
    pub(super) fn regions(&self) -> Vec<String> {
        self.regions.keys().cloned().collect()
    }

    /// The first waiting run of `region` after `after` (from the start when `None`).
    pub(super) fn next(&self, region: &str, after: Option<&str>) -> Option<String> {
        let q = self.regions.get(region)?;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        q.ids
            .range::<str, _>((from, Bound::Unbounded))
            .next()
            .cloned()
    }

    /// The smallest memory any waiting run of `region` needs.
    pub(super) fn smallest(&self, region: &str) -> Option<u64> {
        self.regions.get(region)?.sizes.keys().next().map(|s| s.0)
    }

    /// Every size waiting in `region`.
    pub(super) fn sizes(&self, region: &str) -> Vec<Size> {
        self.regions
            .get(region)
            .map(|q| q.sizes.keys().copied().collect())
            .unwrap_or_default()
    }

    /// A pass over `region` starts: forget what the previous one skipped.
    pub(super) fn start_pass(&mut self, region: &str) {
        if let Some(q) = self.regions.get_mut(region) {
            q.skipped = None;
        }
    }

    /// The pass over `region` stopped before `from`, with a reason per size.
    pub(super) fn skip_from(&mut self, region: &str, from: String, reasons: HashMap<Size, String>) {
        if let Some(q) = self.regions.get_mut(region) {
            q.skipped = Some(Skipped { from, reasons });
        }
    }

    /// Why `run` waits, if the last pass skipped it.
    pub(super) fn skipped_reason(&self, run: &Run) -> Option<&str> {
        let skipped = self.regions.get(&run.region)?.skipped.as_ref()?;
        if run.id < skipped.from {
            return None;
        }
        skipped.reasons.get(&size(run)).map(String::as_str)
    }

    /// `run`'s 1-based place among the waiting runs of its region, if it waits.
    pub(super) fn position(&self, run: &Run) -> Option<usize> {
        let q = self.regions.get(&run.region)?;
        if !q.ids.contains(&run.id) {
            return None;
        }
        // The run just created is the newest (UUIDv7): no need to count those ahead of it.
        if q.ids.last() == Some(&run.id) {
            return Some(q.ids.len());
        }
        Some(
            q.ids
                .range::<str, _>((Bound::Unbounded, Bound::Excluded(run.id.as_str())))
                .count()
                + 1,
        )
    }

    /// Like [`WaitQueue::position`], counting on from `from`: an earlier waiting run of the
    /// same region and its position. A page of runs in id order then costs one walk from the
    /// queue's head, not one per run.
    pub(super) fn position_from(&self, run: &Run, from: Option<(&str, usize)>) -> Option<usize> {
        let Some((prev, at)) = from.filter(|(prev, _)| *prev < run.id.as_str()) else {
            return self.position(run);
        };
        let q = self.regions.get(&run.region)?;
        if !q.ids.contains(&run.id) {
            return None;
        }
        Some(
            at + q
                .ids
                .range::<str, _>((Bound::Excluded(prev), Bound::Included(run.id.as_str())))
                .count(),
        )
    }

    /// `run`'s 1-based place among its runner's waiting runs (all regions), and how many wait.
    pub(super) fn runner_place(&self, run: &Run) -> (usize, usize) {
        let Some(ids) = self.runners.get(&run.runner_id) else {
            return (0, 0);
        };
        let before = ids
            .range::<str, _>((Bound::Unbounded, Bound::Excluded(run.id.as_str())))
            .count();
        (before + 1, ids.len())
    }

    /// Every waiting run id (for consistency checks).
    #[cfg(test)]
    pub(super) fn ids(&self) -> BTreeSet<String> {
        self.regions
            .values()
            .flat_map(|q| q.ids.iter().cloned())
            .collect()
    }

    #[cfg(test)]
    pub(super) fn sizes_consistent(&self, runs: &BTreeMap<String, Run>) -> bool {
        let queued: BTreeSet<&String> = self.regions.values().flat_map(|q| &q.ids).collect();
        let runners_agree = self.runners.iter().all(|(runner, ids)| {
            let want: BTreeSet<&String> = queued
                .iter()
                .copied()
                .filter(|id| runs.get(*id).is_some_and(|r| &r.runner_id == runner))
                .collect();
            ids.iter().collect::<BTreeSet<_>>() == want
        });
        runners_agree
            && self.regions.iter().all(|(region, q)| {
                let mut want: BTreeMap<Size, usize> = BTreeMap::new();
                for id in &q.ids {
                    match runs.get(id) {
                        Some(r) if &r.region == region => *want.entry(size(r)).or_default() += 1,
                        _ => return false,
                    }
                }
                want == q.sizes && !q.ids.is_empty()
            })
    }
}
