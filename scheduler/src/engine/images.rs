//! What the scheduler knows about images on nodes, beyond `cached_images`:
//! - live pull progress per run (memory only, never stored; the agent re-reports it), shown on
//!   the run while it is pending on its node and stored as the run's final figures at its start;
//! - warm pins: which images each node must keep because a runner's warmup put them there.
//!   The agent gets the node's whole set after `Registered` and whenever it changes.

use super::{Run, RunStatus, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::agent::{AgentCommand, PullFor, PullProgress, WarmSandboxes};
use berth_core::keys;
use berth_core::model::{ImagePull, Warmup};
use berth_core::overrides::RunOverrides;
use berth_core::store::Store;
use std::collections::{BTreeMap, BTreeSet};

/// The latest pull report for one run.
#[derive(Debug, Clone)]
pub(super) struct PullEntry {
    node_id: String,
    image: String,
    lease_epoch: u64,
    progress: ImagePull,
    complete: bool,
}

/// Most runs with remembered pull progress; beyond it the oldest reports are forgotten (a run
/// whose node vanished mid-pull never reports its start or exit).
const MAX_PULL_ENTRIES: usize = 100_000;

/// The node's warm pins: runner id → pin, per node.
pub(super) type WarmPins = BTreeMap<String, BTreeMap<String, Pin>>;

/// A runner's warm pin on a node: the image its warmup put there, and the ready sandboxes the
/// node keeps for it.
#[derive(Debug, Clone)]
pub(super) struct Pin {
    pub image: String,
    pub sandboxes: Option<SandboxPin>,
}

/// Ready sandboxes of one runner on its warm node. They hold `count` × the run's memory on
/// the node for as long as the pin stands (see [`State::sandbox_memory_mib`]).
#[derive(Debug, Clone)]
pub(super) struct SandboxPin {
    pub count: u32,
    /// A run of the runner with no overrides: what each sandbox is created for.
    pub template: Run,
}

impl Pin {
    /// The pin of `runner`'s warmup `w`: the image it pulled, and its sandboxes templated from
    /// the runner as it is now (`image`: the runner's image now, which a PATCH may have changed
    /// since the warmup; the node pulls it for the sandboxes if it must).
    pub(super) fn of(
        config: &super::Config,
        runner: &berth_core::Runner,
        w: &Warmup,
        image: &str,
    ) -> Pin {
        let sandboxes = (w.sandboxes > 0)
            .then(|| super::runs::new_run(config, runner, image, RunOverrides::default()))
            .and_then(Result::ok)
            .map(|template| SandboxPin {
                count: w.sandboxes,
                template,
            });
        Pin {
            image: w.image.clone(),
            sandboxes,
        }
    }

    pub(super) fn sandbox_memory_mib(&self) -> u64 {
        self.sandboxes.as_ref().map_or(0, |s| {
            u64::from(s.count).saturating_mul(s.template.memory_mib)
        })
    }
}

/// Takes `runner_id`'s pin out without telling its node (its memory is no longer held there):
/// a new warmup chooses its node without it, and the node hears only the final set.
pub(super) fn take_pin(st: &mut State, runner_id: &str) -> Option<(String, Pin)> {
    let (node, pin) = st
        .warm_pins
        .iter_mut()
        .find_map(|(node, pins)| Some((node.clone(), pins.remove(runner_id)?)))?;
    st.warm_pins.retain(|_, runners| !runners.is_empty());
    st.sync_node(&node);
    Some((node, pin))
}

/// Puts back what [`take_pin`] took (the new warmup could not be stored).
pub(super) fn restore_pin(st: &mut State, runner_id: &str, node: String, pin: Pin) {
    st.warm_pins
        .entry(node.clone())
        .or_default()
        .insert(runner_id.to_owned(), pin);
    st.sync_node(&node);
}

impl State {
    /// Memory the node holds for ready sandboxes (its pins'), not for any run.
    pub(super) fn sandbox_memory_mib(&self, node_id: &str) -> u64 {
        self.warm_pins
            .get(node_id)
            .map_or(0, |pins| pins.values().map(Pin::sandbox_memory_mib).sum())
    }
}

impl<S: Store> Scheduler<S> {
    /// Records a pull report (ephemeral: nothing is stored): a run's by its id, a warmup's by
    /// `warmup:<runner id>`.
    pub fn pull_progress(&self, node_id: &str, msg: PullProgress) {
        let (key, lease_epoch) = match msg.pull_for {
            PullFor::Run {
                run_id,
                lease_epoch,
            } => (run_id, lease_epoch),
            PullFor::Warmup { runner_id } => (format!("warmup:{runner_id}"), 0),
        };
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if pulls.len() >= MAX_PULL_ENTRIES && !pulls.contains_key(&key) {
            pulls.clear();
        }
        let entry = PullEntry {
            node_id: node_id.to_owned(),
            image: msg.image,
            lease_epoch,
            progress: msg.progress,
            complete: msg.complete,
        };
        pulls.insert(key, entry);
    }

    /// The progress of the runner's warmup pull while the warmup is pending (memory only).
    pub fn warmup_pull(&self, runner: &berth_core::Runner) -> Option<ImagePull> {
        let warmup = runner
            .warmup
            .as_ref()
            .filter(|w| w.status == berth_core::model::WarmupStatus::Pending)?;
        let pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls
            .get(&format!("warmup:{}", runner.id))
            .filter(|e| e.node_id == warmup.node_id && e.image == warmup.image)
            .map(|e| e.progress)
    }

    /// The latest pull report for `run`, if it belongs to the run's current lease.
    fn current_pull(&self, run: &Run) -> Option<PullEntry> {
        let pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls
            .get(&run.id)
            .filter(|e| {
                run.node_id.as_deref() == Some(e.node_id.as_str())
                    && run.lease_epoch == e.lease_epoch
            })
            .cloned()
    }

    /// A pending run as the API shows it: with its live pull progress, and `pending_reason`
    /// saying the image is being pulled while it is (derived on read, never stored).
    pub(super) fn with_pull_progress(&self, mut run: Run) -> Run {
        if run.status != RunStatus::Pending {
            return run;
        }
        if let Some(entry) = self.current_pull(&run) {
            run.image_pull = Some(entry.progress);
            if !entry.complete {
                run.pending_reason = Some("pulling the image".to_owned());
            }
        }
        run
    }

    /// At the run's start: the final pull figures go into the stored run, the memory entry goes.
    pub(super) fn take_pull_for_start(&self, run: &mut Run) {
        if let Some(entry) = self.current_pull(run) {
            run.image_pull = Some(entry.progress);
        }
        self.forget_pull(&run.id);
    }

    pub(super) fn forget_pull(&self, run_id: &str) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.remove(run_id);
    }

    /// Warm pins from the stored runners, at start.
    pub(super) async fn load_warm_pins(
        store: &S,
        config: &super::Config,
        registries: &std::collections::HashMap<String, super::RegistryEntry>,
    ) -> Result<WarmPins, SchedulerError> {
        let mut pins = WarmPins::new();
        for kv in store.list_prefix(keys::RUNNERS).await? {
            let runner: berth_core::Runner = super::decode(&kv.key, &kv.value)?;
            if let Some(w) = runner.warmup.as_ref().filter(|w| !w.node_id.is_empty()) {
                let image = super::registries::runner_image_in(config, registries, &runner.spec);
                let pin = Pin::of(config, &runner, w, &image);
                pins.entry(w.node_id.clone())
                    .or_default()
                    .insert(runner.id.clone(), pin);
            }
        }
        Ok(pins)
    }

    /// Moves (or with `None` removes) a runner's warm pin and stages the new pin sets for the
    /// nodes whose set changed; their memory held for sandboxes follows.
    pub(super) fn set_warm_pin(&self, st: &mut State, runner_id: &str, pin: Option<(&str, Pin)>) {
        self.set_warm_pin_telling(st, runner_id, pin, None);
    }

    /// [`Self::set_warm_pin`], also sending `also_tell` its set (a node the pin was taken from
    /// silently, see [`take_pin`]).
    pub(super) fn set_warm_pin_telling(
        &self,
        st: &mut State,
        runner_id: &str,
        pin: Option<(&str, Pin)>,
        also_tell: Option<&str>,
    ) {
        let mut changed = BTreeSet::new();
        for (node, runners) in st.warm_pins.iter_mut() {
            if runners.remove(runner_id).is_some() {
                changed.insert(node.clone());
            }
        }
        if let Some((node, pin)) = pin {
            st.warm_pins
                .entry(node.to_owned())
                .or_default()
                .insert(runner_id.to_owned(), pin);
            changed.insert(node.to_owned());
        }
        st.warm_pins.retain(|_, runners| !runners.is_empty());
        for node in changed.into_iter().chain(also_tell.map(str::to_owned)) {
            st.sync_node(&node);
            let command = self.warm_pins(st, &node);
            st.send_to(&node, command);
        }
    }

    /// The node's whole pin set as a command: the images, and the sandboxes with the spec of
    /// their runs (registry credentials as they are now).
    pub(super) fn warm_pins(&self, st: &State, node_id: &str) -> AgentCommand {
        let pins = st.warm_pins.get(node_id);
        let images: BTreeSet<String> = pins
            .map(|runners| runners.values().map(|p| p.image.clone()).collect())
            .unwrap_or_default();
        let sandboxes = pins
            .into_iter()
            .flatten()
            .filter_map(|(runner_id, pin)| {
                let s = pin.sandboxes.as_ref()?;
                Some(WarmSandboxes {
                    runner_id: runner_id.clone(),
                    count: s.count,
                    spec: self.run_spec(st, &s.template),
                })
            })
            .collect();
        AgentCommand::WarmPins {
            images: images.into_iter().collect(),
            sandboxes,
        }
    }
}
