//! The queue: placing waiting runs on nodes (backfill, with a starvation guard), the spec an
//! assigned run's node receives, and queue positions. Placement itself is the pure
//! [`crate::placement`] pipeline; this module feeds it and applies its answers.

use super::waiting::{size, Size};
use super::{Scheduler, State};
use crate::error::SchedulerError;
use crate::placement::{Demand, FleetIndex, NodeState};
use berth_core::agent::{AgentCommand, AssignRun, RunSpec};
use berth_core::command::EffectiveCommand;
use berth_core::store::Store;
use berth_core::{now_unix_millis, Isolation, Run, RunStatus};
use std::collections::HashMap;

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
        // Reservations live for this pass only; clear them whatever happens.
        let begun = std::time::Instant::now();
        let mut held: Vec<String> = Vec::new();
        // Ephemeral runs go to their own nodes only, outside the regions' queues.
        let mut placed = self.place_ephemeral(st);
        // Regions share no capacity: each is placed on its own, oldest run first.
        let regions = st.queue.regions();
        let waited = !regions.is_empty();
        for region in regions {
            if placed.is_err() {
                break;
            }
            placed = self.place_region(st, &region, &mut held);
            if placed.is_err() {
                break;
            }
        }
        for node in held {
            let _ = st.index.set_reserved_for(&node, None);
        }
        if waited {
            crate::metrics::placement_pass(begun.elapsed());
        }
        placed
    }

    /// Places the waiting runs of `region` in submission order; stops as soon as no run left
    /// can fit (see [`super::waiting`]).
    fn place_region(
        &self,
        st: &mut State,
        region: &str,
        held: &mut Vec<String>,
    ) -> Result<(), SchedulerError> {
        let now = now_unix_millis();
        let reserve_after =
            i64::try_from(self.config.reserve_after.as_millis()).unwrap_or(i64::MAX);
        st.queue.start_pass(region);
        // The least memory a container run found no node for in this pass: no run needing as
        // much or more can fit either (see `waiting`).
        let mut blocked: Option<u64> = None;
        // Whether a run of this pass found no node (the starvation guard serves the first).
        let mut failed_before = false;
        // Why each size waits, valid until the index changes (a placement, a reservation).
        let mut reasons: HashMap<Size, String> = HashMap::new();
        let mut after: Option<String> = None;
        while let Some(run_id) = st.queue.next(region, after.as_deref()) {
            if blocked.is_some_and(|b| st.queue.smallest(region).is_some_and(|s| s >= b)) {
                let reasons = st
                    .queue
                    .sizes(region)
                    .into_iter()
                    .map(|size| {
                        let reason = reasons
                            .remove(&size)
                            .unwrap_or_else(|| unplaceable_reason(st, region, size));
                        (size, reason)
                    })
                    .collect();
                st.queue.skip_from(region, run_id, reasons);
                break;
            }
            after = Some(run_id.clone());
            #[cfg(test)]
            {
                st.pass_visits += 1;
            }
            let Some(waiting) = st.active.get(&run_id) else {
                continue;
            };
            if let Some(reason) = st.held_back(waiting, now, false) {
                // It keeps its place in the queue.
                set_reason(st, &run_id, reason);
                continue;
            }
            if let Some(reason) = reasons.get(&size(waiting)) {
                // Same region, same size, nothing changed since that size found no node.
                let reason = reason.clone();
                set_reason(st, &run_id, reason);
                continue;
            }
            let demand = Demand {
                run_id: run_id.clone(),
                region: waiting.region.clone(),
                memory_mib: waiting.memory_mib,
                image: waiting.image.clone(),
                warm_pin: waiting.warm_pin.clone(),
                sandbox: waiting.isolation == Isolation::Sandbox,
            };
            let created_at = waiting.created_at;
            let chosen = st
                .index
                .place(&demand, self.config.fit_policy)
                .map(|n| n.id.clone());
            crate::metrics::placement_attempt(region, chosen.is_ok());
            match chosen {
                Ok(node_id) => {
                    reasons.clear();
                    let run = waiting.clone();
                    self.assign(st, run, &node_id)?;
                }
                Err(why) => {
                    let mut reason = why.to_string();
                    let oldest_in_region = !failed_before;
                    failed_before = true;
                    if !demand.sandbox {
                        blocked =
                            Some(blocked.map_or(demand.memory_mib, |b| b.min(demand.memory_mib)));
                    }
                    let mut reserved = None;
                    if oldest_in_region && now.saturating_sub(created_at) >= reserve_after {
                        reserved = reserve_for(&mut st.index, &demand);
                    }
                    if let Some(node) = reserved {
                        reasons.clear();
                        reason.push_str(&format!("; node {node} is reserved for this run"));
                        held.push(node);
                    } else {
                        reasons.insert((demand.memory_mib, demand.sandbox), reason.clone());
                    }
                    set_reason(st, &run_id, reason);
                }
            }
        }
        Ok(())
    }

    /// Hands `run` to `node_id` under a new lease: stages the run (which records the lease in
    /// the index) and the node's `AssignRun`.
    pub(super) fn assign(
        &self,
        st: &mut State,
        mut run: Run,
        node_id: &str,
    ) -> Result<(), SchedulerError> {
        let epoch = run.assign(node_id)?;
        run.timeline.assigned = berth_core::now_unix_micros();
        let spec = self.run_spec(st, &run);
        let runner_id = run.runner_id.clone();
        let run_id = run.id.clone();
        let trace_parent = placement_trace(&run, node_id);
        st.stage(run);
        tracing::info!(run_id = %run_id, node_id = %node_id, lease_epoch = epoch, "run assigned");
        st.send_to(
            node_id,
            AgentCommand::AssignRun(AssignRun {
                run_id,
                lease_epoch: epoch,
                spec,
                runner_id,
                trace_parent,
            }),
        );
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
            isolation: run.isolation,
        }
    }
}

/// Records why a run waits. Recomputed by every pass (and by a new leader's first one): kept
/// in memory only, never a store write per waiting run per pass (with 1,000 waiting runs that
/// was one 1,000-record transaction each time).
/// A span for the placement of `run` (assigned to `node_id`) in the trace of the call that
/// created it, and its `traceparent` for the assignment: the node's spans follow it. None for a
/// run created while traces were not exported.
fn placement_trace(run: &Run, node_id: &str) -> Option<String> {
    let parent = run.trace_parent.as_deref()?;
    let span = tracing::info_span!(
        "placement",
        otel.name = "place run",
        run_id = %run.id,
        node_id,
        region = %run.region,
        queue_wait_ms = now_unix_millis().saturating_sub(run.created_at),
        lease_epoch = run.lease_epoch,
        trace_id = tracing::field::Empty,
    );
    berth_core::telemetry::follow(&span, Some(parent));
    span.in_scope(berth_core::telemetry::traceparent)
}

pub(super) fn set_reason(st: &mut State, run_id: &str, reason: String) {
    if let Some(live) = st.active.get_mut(run_id) {
        if live.pending_reason.as_deref() != Some(reason.as_str()) {
            tracing::info!(run_id = %run_id, reason = %reason, "run waits");
            live.pending_reason = Some(reason);
        }
    }
}

/// Why a run of `region` of `size` finds no node now. Only for a run no node is reserved for:
/// such a run's answer depends on nothing else about it.
fn unplaceable_reason(st: &State, region: &str, (memory_mib, sandbox): Size) -> String {
    let demand = Demand {
        run_id: String::new(),
        region: region.to_owned(),
        memory_mib,
        image: String::new(),
        warm_pin: None,
        sandbox,
    };
    match st
        .index
        .place(&demand, crate::placement::FitPolicy::default())
    {
        Err(why) => why.to_string(),
        // Unreachable while the pass's reasoning holds; say something true anyway.
        Ok(_) => "waiting for placement".to_owned(),
    }
}

/// Reserves the ready node of `demand`'s region that is closest to fitting it; returns its id.
pub(super) fn reserve_for(index: &mut FleetIndex, demand: &Demand) -> Option<String> {
    let node = index
        .nodes()
        .filter(|v| {
            v.region == demand.region
                && (v.sandbox || !demand.sandbox)
                && v.status == NodeState::Ready
                && v.reserved_for.is_none()
                // Memory held for ready sandboxes is never freed by runs ending.
                && v.total_memory_mib.saturating_sub(v.sandbox_memory_mib) >= demand.memory_mib
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
    pub(super) fn with_queue_position(&self, run: Run) -> Run {
        self.with_queue_position_from(run, None)
    }

    /// [`State::with_queue_position`], counting on from an earlier waiting run of the same
    /// region and its position (see `WaitQueue::position_from`).
    pub(super) fn with_queue_position_from(
        &self,
        mut run: Run,
        from: Option<(&str, usize)>,
    ) -> Run {
        run.queue_position = None;
        // The live reason it waits (see `schedule`), not the one last stored.
        if let Some(live) = self.active.get(&run.id).filter(|r| r.status == run.status) {
            run.pending_reason.clone_from(&live.pending_reason);
        }
        if is_queued(&run) {
            if let Some(reason) = self.queue.skipped_reason(&run) {
                run.pending_reason = Some(reason.to_owned());
            }
            run.queue_position = self
                .queue
                .position_from(&run, from)
                .and_then(|p| u32::try_from(p).ok());
            if let Some(reason) = self.held_back(&run, now_unix_millis(), true) {
                run.pending_reason = Some(reason);
            }
        }
        run
    }
}

impl State {
    /// Why a waiting run may not be placed now whatever room its region has, if it may not:
    /// its retry's backoff is not over (first: a free slot could not start it either), or its
    /// runner is at its cap (`place`: with its place among the runner's waiting runs, on read).
    pub(super) fn held_back(&self, run: &Run, now: i64, place: bool) -> Option<String> {
        if let Some(until) = super::retries::in_backoff(run, now) {
            return Some(super::retries::backoff_reason(run, until));
        }
        let (cap, holding) = self.caps.full(&run.runner_id)?;
        Some(if place {
            let (at, waiting) = self.queue.runner_place(run);
            super::caps::with_place(cap, holding, at, waiting)
        } else {
            super::caps::reason(cap, holding)
        })
    }
}

/// Waiting for placement on the fleet: pending, on no node, not being stopped, and not an
/// ephemeral run (those wait for their own node: see `ephemeral`).
pub(super) fn is_queued(run: &Run) -> bool {
    waits_unassigned(run) && run.ephemeral.is_none()
}

/// Pending, on no node, and not being stopped.
pub(super) fn waits_unassigned(run: &Run) -> bool {
    run.status == RunStatus::Pending && run.node_id.is_none() && !run.stop_requested
}
