//! The runners this engine has read or written, so that creating a run — the hot path — does
//! not read and decode its runner from the store every time.
//!
//! It is exact, not merely recent: only the leading scheduler writes runner records (on etcd
//! every write is fenced by the leader key), each term opens a new engine with an empty cache,
//! and every runner write of this engine goes through [`RunnerCache::wrote`] once committed.
//! What must not happen is an older version landing over a newer one:
//! - an entry is only ever replaced by a higher revision, and a deletion leaves a tombstone at
//!   its revision (a write committed before it, recorded after it, cannot bring it back);
//! - a store read fills the cache only if no write was recorded since the read began
//!   ([`RunnerCache::generation`]): a read may return a version older than one recorded
//!   meanwhile;
//! - a write that failed (a conflict: someone holds a newer version) forgets the entry, so the
//!   next read goes to the store.
//!
//! Bounded: past [`MAX_ENTRIES`] it starts empty again, and from then on ignores recorded
//! writes at or below the highest revision it had seen (they could be older than what it
//! dropped); those runners are read from the store once more.

use berth_core::Runner;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most runners (and tombstones) kept.
pub(super) const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub(super) struct RunnerCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Bumped by every recorded write or forget, and by a reset.
    generation: u64,
    /// Recorded writes at or below this revision are ignored (see the module doc).
    floor: u64,
    /// The highest revision recorded.
    highest: u64,
}

struct Entry {
    revision: u64,
    /// None: deleted at `revision`.
    runner: Option<Arc<Runner>>,
}

/// What the cache knows of a runner.
#[derive(Debug)]
pub(super) enum Cached {
    /// Its record, at this revision.
    Found(Arc<Runner>, u64),
    /// This engine deleted it.
    Deleted,
    /// Nothing: read the store.
    Unknown,
}

impl RunnerCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, id: &str) -> Cached {
        match self.lock().entries.get(id) {
            Some(Entry {
                revision,
                runner: Some(runner),
            }) => Cached::Found(runner.clone(), *revision),
            Some(Entry { runner: None, .. }) => Cached::Deleted,
            None => Cached::Unknown,
        }
    }

    /// Taken before a store read whose result goes to [`RunnerCache::fill`].
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A runner read from the store at `revision`, after [`RunnerCache::generation`] answered
    /// `generation`. Kept only if nothing was written since.
    pub(super) fn fill(&self, generation: u64, runner: &Runner, revision: u64) {
        let mut inner = self.lock();
        if inner.generation != generation || inner.entries.contains_key(&runner.id) {
            return;
        }
        inner.insert(&runner.id, revision, Some(Arc::new(runner.clone())), false);
    }

    /// This engine committed `runner` (None: its deletion) at `revision`.
    pub(super) fn wrote(&self, id: &str, runner: Option<&Runner>, revision: u64) {
        let mut inner = self.lock();
        inner.generation += 1;
        let newer_kept = inner
            .entries
            .get(id)
            .is_some_and(|e| e.revision >= revision);
        if revision <= inner.floor {
            inner.entries.remove(id);
        } else if !newer_kept {
            inner.insert(id, revision, runner.map(|r| Arc::new(r.clone())), true);
        }
        inner.highest = inner.highest.max(revision);
    }

    /// A write of runner `id` failed: what the cache holds of it may be stale.
    pub(super) fn forget(&self, id: &str) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.remove(id);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    /// `written`: recorded from a write, which the floor applies to (a fill is judged by its
    /// generation instead: one that began after a reset read the store's current version).
    fn insert(&mut self, id: &str, revision: u64, runner: Option<Arc<Runner>>, written: bool) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(id) {
            self.entries.clear();
            self.generation += 1;
            self.floor = self.highest;
        }
        if written && revision <= self.floor {
            return;
        }
        self.entries
            .insert(id.to_owned(), Entry { revision, runner });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(id: &str, name: &str) -> Runner {
        let mut spec = crate::engine::tests::spec("fra", "standard-s");
        spec.name = name.to_owned();
        Runner {
            id: id.to_owned(),
            project: "default".to_owned(),
            spec,
            warmed_at: None,
            created_at: 0,
            updated_at: 0,
            warmup: None,
        }
    }

    fn name_of(c: &RunnerCache, id: &str) -> Option<String> {
        match c.get(id) {
            Cached::Found(r, _) => Some(r.spec.name.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_write_recorded_late_never_replaces_a_newer_one() {
        let c = RunnerCache::default();
        c.wrote("r", Some(&runner("r", "new")), 12);
        c.wrote("r", Some(&runner("r", "old")), 11);
        assert_eq!(name_of(&c, "r").as_deref(), Some("new"));
    }

    #[test]
    fn a_deletion_is_not_undone_by_an_earlier_write_recorded_after_it() {
        let c = RunnerCache::default();
        c.wrote("r", None, 12);
        c.wrote("r", Some(&runner("r", "old")), 11);
        assert!(matches!(c.get("r"), Cached::Deleted));
    }

    #[test]
    fn a_read_overtaken_by_a_write_does_not_fill() {
        let c = RunnerCache::default();
        let before = c.generation();
        // The read returns version 10 while a write of version 11 is recorded meanwhile.
        c.wrote("r", Some(&runner("r", "new")), 11);
        c.forget("r"); // (and even once that entry is gone)
        c.fill(before, &runner("r", "old"), 10);
        assert!(matches!(c.get("r"), Cached::Unknown));
        let now = c.generation();
        c.fill(now, &runner("r", "current"), 11);
        assert_eq!(name_of(&c, "r").as_deref(), Some("current"));
    }

    #[test]
    fn a_fill_does_not_replace_what_a_write_recorded() {
        let c = RunnerCache::default();
        let g = c.generation();
        c.wrote("r", Some(&runner("r", "new")), 11);
        c.fill(g, &runner("r", "old"), 10);
        assert_eq!(name_of(&c, "r").as_deref(), Some("new"));
    }

    #[test]
    fn past_its_bound_it_starts_again_and_ignores_writes_it_may_have_dropped_newer_ones_of() {
        let c = RunnerCache::default();
        for i in 0..MAX_ENTRIES as u64 {
            c.wrote(
                &format!("r{i}"),
                Some(&runner(&format!("r{i}"), "x")),
                i + 1,
            );
        }
        assert_eq!(c.len(), MAX_ENTRIES);
        // One more: the cache starts again with it.
        let top = MAX_ENTRIES as u64 + 1;
        c.wrote("extra", Some(&runner("extra", "x")), top);
        assert_eq!(c.len(), 1);
        assert!(name_of(&c, "extra").is_some());
        // A write committed before the reset and recorded after it could be older than a
        // version the reset dropped: not kept.
        c.wrote("r5", Some(&runner("r5", "late")), 3);
        assert!(matches!(c.get("r5"), Cached::Unknown));
        // Newer writes are kept again.
        c.wrote("r5", Some(&runner("r5", "newer")), top + 1);
        assert_eq!(name_of(&c, "r5").as_deref(), Some("newer"));
    }
}
