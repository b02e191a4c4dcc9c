//! Ephemeral nodes (issue #15): a run created with `ephemeral: true` is for a one-shot node that
//! its creator starts (`berthctl run --here`, e.g. inside a CI job). The run answers with a claim
//! (shown once; the record keeps its SHA-256) and the node's id, `eph-<run id>`. The node
//! enrolls with a registration token of the run's region like any node, and registers with the
//! run's id and claim. Then:
//!
//! - The run is never in a region's queue: each pass first offers every waiting ephemeral run
//!   to its own node, through the same placement filter as any run (ready, a free slot, enough
//!   memory), and to no other node.
//! - The node takes nothing else: the index holds it reserved for its run for as long as it
//!   lives, so the regions' passes pass it over ("reserved for another run").
//! - A run whose node has not connected by `connect_by` (creation + the connect timeout) ends
//!   `failed` with `node_lost`; so does one whose node is lost, started or not (there is no
//!   other node to queue it for). Ephemeral runs are not retried.
//! - The node is removed (memory, index, store) once its run has ended and the node has left or
//!   been declared lost; a scheduler that starts finds ephemeral node records of ended runs and
//!   deletes them.
//!
//! A registration is checked against the run's stored record, not memory, so a node whose run
//! ended while it was away may still register to deliver what it holds (it lists the run among
//! its active ones), and takes nothing.

use super::queue::{set_reason, waits_unassigned};
use super::{Scheduler, State};
use crate::error::SchedulerError;
use crate::placement::{self, Demand};
use berth_core::agent::Registration;
use berth_core::codes::ErrorCode;
use berth_core::model::EPHEMERAL_NODE_PREFIX;
use berth_core::store::Store;
use berth_core::Run;

impl<S: Store> Scheduler<S> {
    /// Checks an ephemeral registration against its run (the node's id, the claim, the region,
    /// room for the run); answers the run id the node is for. A node of the fleet may not take
    /// an ephemeral node's id.
    pub(super) async fn check_ephemeral(
        &self,
        reg: &Registration,
    ) -> Result<Option<String>, SchedulerError> {
        let Some(claim) = &reg.ephemeral else {
            if reg.node_id.starts_with(EPHEMERAL_NODE_PREFIX) {
                return Err(SchedulerError::Forbidden(format!(
                    "node ids starting with {EPHEMERAL_NODE_PREFIX:?} are for ephemeral nodes, \
                     which register with their run's claim (berthctl run --here)"
                )));
            }
            return Ok(None);
        };
        let refused = |why: &str| {
            SchedulerError::Forbidden(format!(
                "this node cannot take ephemeral run {}: {why}",
                claim.run_id
            ))
        };
        let run = match self.load_run(&claim.run_id).await {
            Ok((run, _)) => run,
            Err(SchedulerError::NotFound { .. }) => {
                return Err(refused("no such run, or the claim is wrong"))
            }
            Err(e) => return Err(e),
        };
        let Some(pin) = run.ephemeral.as_ref().filter(|pin| {
            berth_core::auth::verify_ephemeral_claim(&claim.claim, &pin.claim_sha256)
        }) else {
            return Err(refused("no such run, or the claim is wrong"));
        };
        if pin.node_id != reg.node_id {
            return Err(refused(&format!(
                "its node id is {}, not {}",
                pin.node_id, reg.node_id
            )));
        }
        if run.region != reg.region {
            return Err(refused(&format!(
                "the run is in region {}, this node in {}",
                run.region, reg.region
            )));
        }
        if run.status.is_terminal() {
            if reg.active_run_ids.contains(&run.id) {
                // Back to deliver what it holds of the run; it takes nothing.
                return Ok(Some(run.id));
            }
            return Err(SchedulerError::Refused(format!(
                "ephemeral run {} has ended ({}); its node has nothing to do",
                run.id, run.status
            )));
        }
        if reg.total_memory_mib < run.memory_mib {
            return Err(SchedulerError::Refused(format!(
                "ephemeral run {} needs {} MiB (instance type {}); this node offers {} MiB",
                run.id, run.memory_mib, run.instance_type, reg.total_memory_mib
            )));
        }
        Ok(Some(run.id))
    }

    /// Offers each waiting ephemeral run to its own node (and to no other).
    pub(super) fn place_ephemeral(&self, st: &mut State) -> Result<(), SchedulerError> {
        if st.ephemeral_waiting.is_empty() {
            return Ok(());
        }
        let now = berth_core::now_unix_millis();
        let waiting: Vec<String> = st.ephemeral_waiting.iter().cloned().collect();
        for run_id in waiting {
            let Some(run) = st.active.get(&run_id) else {
                continue;
            };
            let Some(pin) = &run.ephemeral else {
                continue;
            };
            let node_id = pin.node_id.clone();
            if let Some(reason) = st.held_back(run, now, false) {
                // Its runner's cap counts it like any run.
                set_reason(st, &run_id, reason);
                continue;
            }
            let demand = Demand {
                run_id: run.id.clone(),
                region: run.region.clone(),
                memory_mib: run.memory_mib,
                image: run.image.clone(),
                warm_pin: None,
                sandbox: run.isolation == berth_core::Isolation::Sandbox,
            };
            let verdict = match st.index.get(&node_id) {
                Some(view) if st.nodes.get(&node_id).is_some_and(|n| n.connected) => {
                    placement::filter(&demand, view)
                        .map_err(|why| format!("its ephemeral node {node_id} is {}", why.label()))
                }
                _ => Err(waiting_reason(run)),
            };
            match verdict {
                Ok(()) => {
                    let run = run.clone();
                    self.assign(st, run, &node_id)?;
                }
                Err(reason) => set_reason(st, &run_id, reason),
            }
        }
        Ok(())
    }

    /// Ends, `failed` with `node_lost`, every ephemeral run still waiting at `now` (unix ms)
    /// past its `connect_by` whose node is not connected. Called periodically.
    pub async fn expire_ephemeral_runs(&self, now: i64) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let overdue: Vec<Run> = st
            .ephemeral_waiting
            .iter()
            .filter_map(|id| st.active.get(id))
            .filter(|run| {
                run.ephemeral.as_ref().is_some_and(|pin| {
                    // A node that is there but cannot take it (drained, shutting down, lost
                    // with its stream half open) is no better than none.
                    pin.connect_by < now
                        && !st
                            .nodes
                            .get(&pin.node_id)
                            .is_some_and(|n| n.status() == crate::placement::NodeState::Ready)
                })
            })
            .cloned()
            .collect();
        if overdue.is_empty() {
            return Ok(());
        }
        for mut run in overdue {
            let node_id = run
                .ephemeral
                .as_ref()
                .map(|pin| pin.node_id.clone())
                .unwrap_or_default();
            run.fail(
                ErrorCode::NodeLost,
                &format!(
                    "its ephemeral node {node_id} was not connected and ready within {} s",
                    self.config.ephemeral_connect_timeout.as_secs()
                ),
                now,
            )?;
            tracing::warn!(run_id = %run.id, node_id = %node_id, "ephemeral run ended: its node never came");
            st.stage(run);
            if st.remove_if_ephemeral_done(&node_id) {
                self.forget_liveness(&node_id);
            }
        }
        self.settle(st, false).await
    }

    /// Forgets when `node_id` was last heard from (a removed node).
    pub(super) fn forget_liveness(&self, node_id: &str) {
        self.liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node_id);
    }
}

impl State {
    /// Keeps `ephemeral_waiting` in step with `run`'s new state (called by `stage`).
    pub(super) fn track_ephemeral(&mut self, run: &Run) {
        if run.ephemeral.is_none() {
            return;
        }
        if waits_unassigned(run) {
            self.ephemeral_waiting.insert(run.id.clone());
        } else {
            self.ephemeral_waiting.remove(&run.id);
        }
    }

    /// Removes `node_id` if it is an ephemeral node whose run has ended and that has left or
    /// was declared lost (its session, if any, is closed); stages the removal of its record.
    /// Answers whether it did.
    pub(super) fn remove_if_ephemeral_done(&mut self, node_id: &str) -> bool {
        let done = self.nodes.get(node_id).is_some_and(|n| {
            (!n.connected || n.lost)
                && n.ephemeral_for
                    .as_ref()
                    .is_some_and(|run| !self.active.contains_key(run))
        });
        if !done {
            return false;
        }
        if let Some(link) = self.nodes.get_mut(node_id).and_then(|n| n.link.take()) {
            link.close(&format!(
                "ephemeral node {node_id} was lost and its run has ended"
            ));
        }
        self.forget_node(node_id);
        tracing::info!(node_id, "ephemeral node removed: its run has ended");
        true
    }
}

/// Why an ephemeral run waits while its node is not connected (also a new one's first reason).
pub(super) fn waiting_reason(run: &Run) -> String {
    let (node_id, by) = run
        .ephemeral
        .as_ref()
        .map_or(("?", 0), |pin| (pin.node_id.as_str(), pin.connect_by));
    let by = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(by) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| by.to_string());
    format!(
        "waiting for its ephemeral node {node_id} to connect (berthctl run --here); \
         the run ends node_lost if it has not by {by}"
    )
}
