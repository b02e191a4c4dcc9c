//! The queue: placing waiting runs on nodes (backfill, with a starvation guard), the spec an
//! assigned run's node receives, and queue positions. Placement itself is the pure
//! [`crate::placement`] pipeline; this module feeds it and applies its answers.

use super::{Scheduler, State};
use crate::error::SchedulerError;
use crate::placement::{Demand, FleetIndex, NodeState};
use berth_core::agent::{AgentCommand, AssignRun, RunSpec};
use berth_core::command::EffectiveCommand;
use berth_core::store::Store;
use berth_core::{now_unix_millis, Run, RunStatus};
use std::collections::{HashMap, HashSet};

impl<S: Store> Scheduler<S> {
    /// Places every waiting run that fits, in submission order; a run that does not fit does
    /// not block later, smaller ones (backfill). Runs that stay say why.
    ///
    /// Starvation guard: when the oldest waiting run of a region that does not fit has waited
    /// `reserve_after`, the ready node in its region closest to fitting it (large enough in
    /// total, most free memory) is reserved for it for this pass: younger runs may not take that
    /// node, so its capacity drains towards the old run while the rest of the region keeps
    /// serving small runs. The choice is made again on every pass.
    pub(super) fn schedule(&self, st: &mut State) -> Result<(), SchedulerError> {
        let waiting: Vec<String> = st.queue.iter().cloned().collect();
        if waiting.is_empty() {
            return Ok(());
        }
        // Reservations live for this pass only; clear them whatever happens.
        let mut held: Vec<String> = Vec::new();
        let placed = self.place_waiting(st, waiting, &mut held);
        for node in held {
            let _ = st.index.set_reserved_for(&node, None);
        }
        placed
    }

    pub(super) fn place_waiting(
        &self,
        st: &mut State,
        waiting: Vec<String>,
        held: &mut Vec<String>,
    ) -> Result<(), SchedulerError> {
        let now = now_unix_millis();
        let reserve_after =
            i64::try_from(self.config.reserve_after.as_millis()).unwrap_or(i64::MAX);
        let mut regions_checked: HashSet<String> = HashSet::new();
        for run_id in waiting {
            let Some(cached) = st.active.get(&run_id) else {
                continue;
            };
            let mut run = cached.clone();
            let demand = Demand {
                run_id: run.id.clone(),
                region: run.region.clone(),
                memory_mib: run.memory_mib,
                image: run.image.clone(),
                warm_pin: run.warm_pin.clone(),
            };
            let chosen = st
                .index
                .place(&demand, self.config.fit_policy)
                .map(|n| n.id.clone());
            match chosen {
                Ok(node_id) => {
                    let epoch = run.assign(&node_id)?;
                    let spec = self.run_spec(st, &run);
                    // `save` records the lease in the index.
                    st.stage(run);
                    tracing::info!(run_id = %run_id, node_id = %node_id, lease_epoch = epoch, "run assigned");
                    st.send_to(
                        &node_id,
                        AgentCommand::AssignRun(AssignRun {
                            run_id,
                            lease_epoch: epoch,
                            spec,
                        }),
                    );
                }
                Err(why) => {
                    let mut reason = why.to_string();
                    let oldest_in_region = regions_checked.insert(run.region.clone());
                    if oldest_in_region && now.saturating_sub(run.created_at) >= reserve_after {
                        if let Some(node) = reserve_for(&mut st.index, &demand) {
                            reason.push_str(&format!("; node {node} is reserved for this run"));
                            held.push(node);
                        }
                    }
                    if run.pending_reason.as_deref() != Some(reason.as_str()) {
                        tracing::info!(run_id = %run_id, reason = %reason, "run waits");
                        // Why a run waits is recomputed by every pass (and by a new leader's
                        // first one): kept in memory only, never a store write per waiting
                        // run per pass (with 1,000 waiting runs that was one 1,000-record
                        // transaction each time).
                        if let Some(live) = st.active.get_mut(&run_id) {
                            live.pending_reason = Some(reason);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What the node that runs `run` needs to start it (secrets and registry credentials
    /// included: they leave the scheduler only this way).
    pub(super) fn run_spec(&self, st: &State, run: &Run) -> RunSpec {
        let effective = EffectiveCommand {
            command: run.command.clone(),
            argv: run.argv.clone(),
            entrypoint: run.entrypoint.clone(),
        };
        RunSpec {
            image: run.image.clone(),
            entrypoint: effective.entrypoint_words(),
            cmd: effective.cmd(),
            env: run
                .env
                .iter()
                .map(|e| (e.env_key.clone(), e.env_val.clone()))
                .collect::<HashMap<_, _>>(),
            timeout_seconds: run.timeout_seconds,
            memory_mib: run.memory_mib,
            cpu_millis: run.cpu_millis,
            stop_grace_seconds: run
                .stop_grace_seconds
                .unwrap_or(self.config.stop_grace_seconds),
            registry_auth: run
                .container_registry_id
                .as_ref()
                .and_then(|id| st.registries.get(id).map(|r| r.auth.clone())),
            files: run.files.clone(),
        }
    }
}

/// Reserves the ready node of `demand`'s region that is closest to fitting it; returns its id.
pub(super) fn reserve_for(index: &mut FleetIndex, demand: &Demand) -> Option<String> {
    let node = index
        .nodes()
        .filter(|v| {
            v.region == demand.region
                && v.status == NodeState::Ready
                && v.reserved_for.is_none()
                && v.total_memory_mib >= demand.memory_mib
                && v.max_runs > 0
        })
        .max_by(|a, b| {
            a.free_memory_mib()
                .cmp(&b.free_memory_mib())
                .then_with(|| b.id.cmp(&a.id))
        })?
        .id
        .clone();
    index
        .set_reserved_for(&node, Some(demand.run_id.clone()))
        .ok()?;
    Some(node)
}

impl State {
    /// Fills in `queue_position` for a run waiting to be placed: its 1-based place among the
    /// waiting runs of its region, oldest first.
    pub(super) fn with_queue_position(&self, mut run: Run) -> Run {
        run.queue_position = None;
        // The live reason it waits (see `schedule`), not the one last stored.
        if let Some(live) = self.active.get(&run.id).filter(|r| r.status == run.status) {
            run.pending_reason.clone_from(&live.pending_reason);
        }
        if is_queued(&run) {
            let ahead = self
                .queue
                .range::<String, _>(..run.id.clone())
                .filter(|id| self.active.get(*id).is_some_and(|r| r.region == run.region))
                .count();
            run.queue_position = u32::try_from(ahead + 1).ok();
        }
        run
    }
}

/// Waiting for placement: pending, on no node, and not being stopped.
pub(super) fn is_queued(run: &Run) -> bool {
    run.status == RunStatus::Pending && run.node_id.is_none() && !run.stop_requested
}
