//! Run networks attached ahead of time, so a run's start does not wait for the CNI plugins.
//!
//! Attaching a run's network (a namespace, a veth on the bridge, an address, masquerading)
//! takes the CNI plugins ~30 ms here, on the path of every start. [`WarmNetworks`] keeps a few
//! namespaces attached under slot ids of their own (`warm-<uuid>`) and hands one to each run
//! that starts; a background thread attaches the next. A slot is used by one run only and is
//! detached (destroyed) with it, as a run's own network would be: nothing passes from one run
//! to the next. Which slot a run holds is written to `<slots dir>/<run id>` before the run
//! gets it, so an agent that restarts detaches the right namespace; slots nobody holds are
//! listed as leftovers and released by the agent's start-up sweep like any run's. With no slot
//! ready (a burst of starts), a run attaches its own network as before.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::network::cni::{check_run_id, NetworkAttachment, RunNetwork};
use crate::network::error::NetworkError;

const SLOT_PREFIX: &str = "warm-";

/// How long after a run took a slot the next one is attached: the plugins' work (~30 ms of CPU
/// here) would otherwise compete with that run's own start (its task create, measured 30 %
/// slower with the refill right behind it on this 2-core machine).
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

struct Pool {
    inner: Arc<dyn RunNetwork>,
    slots_dir: PathBuf,
    target: usize,
    ready: Mutex<VecDeque<(String, NetworkAttachment)>>,
    filling: AtomicBool,
    /// Set when the agent shuts down: nothing more is attached ahead.
    closed: AtomicBool,
}

/// A [`RunNetwork`] that keeps `target` networks attached ahead of the runs that take them.
pub struct WarmNetworks(Arc<Pool>);

impl WarmNetworks {
    /// Keeps up to `target` networks of `inner` ready (0: none; every run attaches its own).
    /// Nothing is attached until [`Self::fill`] is called: first the agent sweeps what an
    /// earlier process left.
    pub fn new(inner: Arc<dyn RunNetwork>, slots_dir: PathBuf, target: usize) -> Self {
        Self(Arc::new(Pool {
            inner,
            slots_dir,
            target,
            ready: Mutex::new(VecDeque::new()),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }))
    }

    /// Attaches networks in the background until `target` are ready.
    pub fn fill(&self) {
        self.0.fill(std::time::Duration::ZERO);
    }

    /// How many are ready now.
    pub fn ready(&self) -> usize {
        self.0.ready().len()
    }

    fn slot_file(&self, run_id: &str) -> PathBuf {
        self.0.slots_dir.join(run_id)
    }

    fn slot_of(&self, run_id: &str) -> Option<String> {
        std::fs::read_to_string(self.slot_file(run_id))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| check_run_id(s).is_ok())
    }

    fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
        move |source| NetworkError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Gives `run_id` the slot: recorded first, so a restart knows what to detach.
    fn hand_over(&self, run_id: &str, slot: &str) -> Result<(), NetworkError> {
        let dir = &self.0.slots_dir;
        std::fs::create_dir_all(dir).map_err(Self::io("creating", dir))?;
        let file = self.slot_file(run_id);
        std::fs::write(&file, slot).map_err(Self::io("writing", &file))
    }
}

impl Pool {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, NetworkAttachment)>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches until `target` are ready, in a thread of its own, after `delay`.
    fn fill(self: &Arc<Self>, delay: std::time::Duration) {
        if self.target == 0
            || self.closed.load(Ordering::SeqCst)
            || self.filling.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("warm-networks".into())
            .spawn(move || loop {
                std::thread::sleep(delay);
                while pool.ready().len() < pool.target && !pool.closed.load(Ordering::SeqCst) {
                    let slot = format!("{SLOT_PREFIX}{}", uuid::Uuid::new_v4().simple());
                    match pool.inner.attach(&slot) {
                        // Closed meanwhile: this one goes at once.
                        Ok(_) if pool.closed.load(Ordering::SeqCst) => {
                            let _ = pool.inner.detach(&slot);
                        }
                        Ok(attachment) => pool.ready().push_back((slot, attachment)),
                        Err(error) => {
                            tracing::warn!(%error, "attaching a network ahead of time failed; runs attach their own");
                            pool.filling.store(false, Ordering::SeqCst);
                            return;
                        }
                    }
                }
                pool.filling.store(false, Ordering::SeqCst);
                // A slot taken between the last check and the store above: go on if still ours.
                if pool.ready().len() >= pool.target
                    || pool.closed.load(Ordering::SeqCst)
                    || pool.filling.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the thread that attaches networks ahead");
            self.filling.store(false, Ordering::SeqCst);
        }
    }
}

impl RunNetwork for WarmNetworks {
    fn attach(&self, run_id: &str) -> Result<NetworkAttachment, NetworkError> {
        check_run_id(run_id)?;
        let taken = self.0.ready().pop_front();
        self.0.fill(REFILL_DELAY);
        let Some((slot, attachment)) = taken else {
            return self.0.inner.attach(run_id);
        };
        if let Err(error) = self.hand_over(run_id, &slot) {
            tracing::warn!(run_id, %error, "cannot record the run's network slot; attaching its own");
            if let Err(undo) = self.0.inner.detach(&slot) {
                tracing::warn!(slot, error = %undo, "releasing an unused network slot failed");
            }
            return self.0.inner.attach(run_id);
        }
        tracing::debug!(run_id, slot, "run network taken from the ready ones");
        Ok(attachment)
    }

    fn detach(&self, run_id: &str) -> Result<(), NetworkError> {
        check_run_id(run_id)?;
        match self.slot_of(run_id) {
            Some(slot) => {
                self.0.inner.detach(&slot)?;
                let file = self.slot_file(run_id);
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(Self::io("removing", &file)(e))
                    }
                    _ => Ok(()),
                }
            }
            None => self.0.inner.detach(run_id),
        }
    }

    /// Runs holding a network: a slot a run holds is listed as that run; a ready slot is not
    /// listed (it is this process's); any other slot is (a leftover, released by the sweep).
    fn attached_runs(&self) -> Vec<String> {
        let held: BTreeMap<String, String> = std::fs::read_dir(&self.0.slots_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|run| check_run_id(run).is_ok())
                    .filter_map(|run| self.slot_of(&run).map(|slot| (slot, run)))
                    .collect()
            })
            .unwrap_or_default();
        let ready: Vec<String> = self.0.ready().iter().map(|(s, _)| s.clone()).collect();
        let mut ids: Vec<String> = self
            .0
            .inner
            .attached_runs()
            .into_iter()
            .filter(|id| !ready.contains(id))
            .map(|id| held.get(&id).cloned().unwrap_or(id))
            .collect();
        // A run whose slot is already gone still has its record to remove.
        for run in held.values() {
            if !ids.contains(run) {
                ids.push(run.clone());
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }

    fn prepare_ahead(&self) {
        self.fill();
    }

    fn release_ahead(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        let ready: Vec<String> = self.0.ready().drain(..).map(|(slot, _)| slot).collect();
        for slot in ready {
            if let Err(error) = self.0.inner.detach(&slot) {
                tracing::warn!(slot, %error, "releasing a network attached ahead failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Attached ids in memory; attaching one fails when told to.
    #[derive(Default)]
    struct FakeNetwork {
        attached: Mutex<BTreeSet<String>>,
        fail: AtomicBool,
    }

    impl RunNetwork for FakeNetwork {
        fn attach(&self, run_id: &str) -> Result<NetworkAttachment, NetworkError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(NetworkError::InvalidRunId("told to fail".into()));
            }
            self.attached
                .lock()
                .expect("lock")
                .insert(run_id.to_string());
            Ok(NetworkAttachment {
                netns: PathBuf::from("/run/netns").join(run_id),
                address: None,
                resolv_conf: None,
            })
        }
        fn detach(&self, run_id: &str) -> Result<(), NetworkError> {
            self.attached.lock().expect("lock").remove(run_id);
            Ok(())
        }
        fn attached_runs(&self) -> Vec<String> {
            self.attached
                .lock()
                .expect("lock")
                .iter()
                .cloned()
                .collect()
        }
    }

    fn wait_ready(warm: &WarmNetworks, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while warm.ready() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} ready",
                warm.ready()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn runs_take_ready_slots_once_and_a_restart_still_detaches_the_right_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Arc::new(FakeNetwork::default());
        let warm = WarmNetworks::new(inner.clone(), dir.path().join("slots"), 2);
        assert_eq!(warm.ready(), 0, "nothing before fill");
        warm.fill();
        wait_ready(&warm, 2);
        // Ready slots are this process's: not listed as runs holding a network.
        assert!(warm.attached_runs().is_empty());

        let a = warm.attach("run-a").expect("attach");
        let b = warm.attach("run-b").expect("attach");
        assert_ne!(a.netns, PathBuf::from("/run/netns/run-a"), "a ready slot's");
        assert_ne!(a.netns, b.netns, "one slot per run");
        for n in [&a.netns, &b.netns] {
            let slot = n.file_name().and_then(|s| s.to_str()).expect("slot");
            assert!(slot.starts_with(SLOT_PREFIX), "{slot}");
        }
        wait_ready(&warm, 2);
        assert_eq!(warm.attached_runs(), ["run-a", "run-b"]);

        // Another process (a restart) knows which slot run-a holds.
        let restarted = WarmNetworks::new(inner.clone(), dir.path().join("slots"), 2);
        let listed = restarted.attached_runs();
        assert!(listed.contains(&"run-a".to_string()) && listed.contains(&"run-b".to_string()));
        // ...and the previous process's ready slots show up as leftovers to sweep.
        assert_eq!(
            listed
                .iter()
                .filter(|id| id.starts_with(SLOT_PREFIX))
                .count(),
            2
        );
        restarted.detach("run-a").expect("detach");
        let slot_a = a.netns.file_name().and_then(|s| s.to_str()).expect("slot");
        assert!(!inner.attached_runs().contains(&slot_a.to_string()));
        assert!(!restarted.attached_runs().contains(&"run-a".to_string()));
        // Detaching again, or a run never attached, is a no-op.
        restarted.detach("run-a").expect("again");
        restarted.detach("run-z").expect("never attached");
    }

    #[test]
    fn with_no_slot_ready_a_run_attaches_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Arc::new(FakeNetwork::default());
        inner.fail.store(true, Ordering::SeqCst);
        let warm = WarmNetworks::new(inner.clone(), dir.path().join("slots"), 2);
        warm.fill();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(warm.ready(), 0);
        inner.fail.store(false, Ordering::SeqCst);
        let own = warm.attach("run-c").expect("attach");
        assert_eq!(own.netns, PathBuf::from("/run/netns/run-c"));
        assert!(inner.attached_runs().contains(&"run-c".to_string()));
        warm.detach("run-c").expect("detach");
        assert!(!inner.attached_runs().contains(&"run-c".to_string()));
        // A bad id is refused before anything is taken.
        assert!(warm.attach("../x").is_err());
    }

    #[test]
    fn a_shutdown_releases_the_ready_ones_and_attaches_no_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Arc::new(FakeNetwork::default());
        let warm = WarmNetworks::new(inner.clone(), dir.path().join("slots"), 2);
        warm.fill();
        wait_ready(&warm, 2);
        warm.release_ahead();
        assert_eq!(warm.ready(), 0);
        assert!(inner.attached_runs().is_empty());
        // A run during the shutdown still gets a network (its own), and nothing is refilled.
        warm.attach("run-e").expect("attach");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(inner.attached_runs(), ["run-e"]);
    }

    #[test]
    fn zero_keeps_nothing_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Arc::new(FakeNetwork::default());
        let warm = WarmNetworks::new(inner.clone(), dir.path().join("slots"), 0);
        warm.fill();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(warm.ready(), 0);
        assert!(inner.attached_runs().is_empty());
        warm.attach("run-d").expect("attach");
        assert_eq!(inner.attached_runs(), ["run-d"]);
    }
}
