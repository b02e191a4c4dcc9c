//! Shim groups (issue #13, item 5; opt-in with `--shim-group-size`): containerd's runc v2 shim
//! serves every container whose OCI spec carries the same [`GROUP_ANNOTATION`] from one process,
//! so a node of many small runs pays for a shim per group instead of per run (measured in
//! docs/BENCHMARKS.md, "density": ~4 MiB of host memory per sleeping run with a shim each,
//! ~0.6 MiB in groups of 25). The price is the blast radius: a shim that dies takes every run of
//! its group with it (containerd kills the containers of a dead shim), so the group size is what
//! one crash can cost.
//!
//! Which group a run joins: one group is open at a time and takes runs until `size` have joined
//! it; then the next one opens. A group whose runs have all left is retired for good, never
//! joined again: its shim exits once its last task is deleted, and a run sent to it meanwhile
//! could meet a shim on its way out. One race remains without care: a run joins a group while
//! its last other member is leaving. So a member's task is deleted only once no run that
//! joined the same group is still being created ([`ShimGroups::quiet`]): by then the new
//! container is in the shim, which therefore stays.
//!
//! Runs re-adopted after an agent restart belong to no group of this process (their shims keep
//! serving them); new runs open new groups.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// The OCI annotation containerd's runc v2 shim groups containers by.
pub const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

#[derive(Default)]
struct Group {
    /// Runs in the group (joined, not yet left).
    live: usize,
    /// Runs that joined in all (the group closes at the size).
    joined: usize,
    /// Runs joined and not yet created (their container is not in the shim yet).
    creating: usize,
}

#[derive(Default)]
struct Inner {
    /// The group new runs join, while it has room.
    open: Option<String>,
    groups: HashMap<String, Group>,
    /// Each run's group.
    of_run: HashMap<String, String>,
}

impl std::fmt::Debug for ShimGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimGroups")
            .field("size", &self.size)
            .field("live", &self.live())
            .finish()
    }
}

pub struct ShimGroups {
    size: usize,
    prefix: String,
    inner: Mutex<Inner>,
    created: Notify,
}

impl Inner {
    /// Forgets `group` once it has no run and none on its way in: it is retired.
    fn retire_if_empty(&mut self, group: &str) {
        if self
            .groups
            .get(group)
            .is_some_and(|g| g.live == 0 && g.creating == 0)
        {
            self.groups.remove(group);
        }
    }
}

impl ShimGroups {
    /// Groups of at most `size` runs (at least 1), named `<prefix>-<uuid>`.
    pub fn new(size: usize, prefix: &str) -> Self {
        Self {
            size: size.max(1),
            prefix: prefix.to_owned(),
            inner: Mutex::new(Inner::default()),
            created: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group `run_id` joins (the same one if it already joined). Call [`Self::created`]
    /// once its task was created (or failed to be).
    pub fn join(&self, run_id: &str) -> String {
        let mut inner = self.lock();
        if let Some(group) = inner.of_run.get(run_id) {
            return group.clone();
        }
        let open = inner.open.clone().filter(|g| {
            inner
                .groups
                .get(g)
                .is_some_and(|g| g.live > 0 && g.joined < self.size)
        });
        let group =
            open.unwrap_or_else(|| format!("{}-{}", self.prefix, uuid::Uuid::new_v4().simple()));
        let entry = inner.groups.entry(group.clone()).or_default();
        entry.live += 1;
        entry.joined += 1;
        entry.creating += 1;
        let full = entry.joined >= self.size;
        inner.open = (!full).then(|| group.clone());
        inner.of_run.insert(run_id.to_owned(), group.clone());
        group
    }

    /// `run_id`'s task was created, or its creation failed.
    pub fn created(&self, run_id: &str) {
        {
            let mut inner = self.lock();
            let Some(group) = inner.of_run.get(run_id).cloned() else {
                return;
            };
            if let Some(g) = inner.groups.get_mut(&group) {
                g.creating = g.creating.saturating_sub(1);
            }
            inner.retire_if_empty(&group);
        }
        self.created.notify_waiters();
    }

    /// `run_id` leaves its group (idempotent; a run of no group is ignored). Returns the group
    /// it left, for [`Self::quiet`].
    pub fn leave(&self, run_id: &str) -> Option<String> {
        let mut inner = self.lock();
        let group = inner.of_run.remove(run_id)?;
        if let Some(g) = inner.groups.get_mut(&group) {
            g.live = g.live.saturating_sub(1);
        }
        // (An open group left empty is not joined again: `join` wants a live run in it.)
        inner.retire_if_empty(&group);
        Some(group)
    }

    /// Waits until no run that joined `group` is still being created (see the module doc).
    pub async fn quiet(&self, group: &str) {
        loop {
            let notified = self.created.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .lock()
                .groups
                .get(group)
                .is_none_or(|g| g.creating == 0)
            {
                return;
            }
            notified.await;
        }
    }

    /// Groups with runs in them, and their runs (for tests and logs).
    pub fn live(&self) -> Vec<(String, usize)> {
        let inner = self.lock();
        let mut groups: Vec<(String, usize)> = inner
            .groups
            .iter()
            .filter(|(_, g)| g.live > 0)
            .map(|(name, g)| (name.clone(), g.live))
            .collect();
        groups.sort();
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_fill_one_group_at_a_time_up_to_the_size() {
        let groups = ShimGroups::new(3, "g");
        let names: Vec<String> = (0..7).map(|i| groups.join(&format!("r{i}"))).collect();
        assert_eq!(names[0], names[1]);
        assert_eq!(names[0], names[2]);
        assert_ne!(names[2], names[3]);
        assert_eq!(names[3], names[5]);
        assert_ne!(names[5], names[6]);
        assert!(names.iter().all(|n| n.starts_with("g-")));
        assert_eq!(groups.join("r0"), names[0], "a run joins once");
        let sizes: Vec<usize> = groups.live().into_iter().map(|(_, n)| n).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 7);
        assert!(sizes.iter().all(|n| *n <= 3));
    }

    #[test]
    fn a_group_whose_runs_all_left_is_never_joined_again() {
        let groups = ShimGroups::new(4, "g");
        let first = groups.join("a");
        groups.created("a");
        assert_eq!(groups.leave("a").as_deref(), Some(first.as_str()));
        assert_eq!(groups.leave("a"), None, "leaving is idempotent");
        let second = groups.join("b");
        assert_ne!(first, second, "its shim may be on its way out");
        assert_eq!(groups.leave("stranger"), None);
    }

    #[test]
    fn a_group_keeps_taking_runs_while_one_is_left_in_it() {
        let groups = ShimGroups::new(4, "g");
        let g = groups.join("a");
        groups.join("b");
        groups.created("a");
        groups.created("b");
        groups.leave("a");
        assert_eq!(groups.join("c"), g);
        assert_eq!(groups.live(), vec![(g, 2)]);
    }

    /// The last old member's task may only be deleted once a run that joined meanwhile is in
    /// the shim.
    #[tokio::test]
    async fn a_leaving_member_waits_for_runs_still_being_created_in_its_group() {
        let groups = std::sync::Arc::new(ShimGroups::new(4, "g"));
        let g = groups.join("old");
        groups.created("old");
        assert_eq!(groups.join("new"), g);
        let left = groups.leave("old").expect("a group");
        let waiter = {
            let groups = groups.clone();
            tokio::spawn(async move { groups.quiet(&left).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "\"new\" is not in the shim yet");
        groups.created("new");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("quiet once created")
            .expect("join");
        assert_eq!(groups.live(), vec![(g, 1)]);
    }
}
