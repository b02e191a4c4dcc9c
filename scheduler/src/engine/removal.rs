//! Removing a node from the fleet (issue #17): an operator's `RemoveNode` (`DELETE
//! /v1/nodes/{id}`, `berthctl nodes remove`), or the node's own `Leave` (`berth-node-agent
//! leave`: drain, wait for its runs, then remove). Without it a node that is gone for good
//! stays listed, lost, for ever.
//!
//! A removal is a revocation (`identity`) followed by forgetting the node:
//! 1. Refused while the node holds runs (assigned and not started, or running): for an operator
//!    only while it is connected and unless forced; for a node leaving, always. From this check
//!    on the node takes no new run (`Node::removing`), so the check still holds when it is
//!    removed.
//! 2. Every credential of the node is revoked, stored first: its agent cannot come back, and a
//!    session whose credential was checked just before cannot register it again
//!    (`RevocationMark`).
//! 3. A connected node is told to stop what it still runs for the fleet (its leased runs, and
//!    the stale ones it runs without a lease), then its session is closed: nothing reaches it
//!    afterwards. Its leases are taken back as for a lost node: runs it had not started are
//!    queued again, started ones end `failed`/`node_lost` (a waiting ephemeral run of it ends
//!    `node_lost` too: it has no other node).
//! 4. The node is forgotten: memory, the placement index (with the memory its stale runs held:
//!    there is no node left to hold it on), liveness, its session errors, its warm pins, and its
//!    record `nodes/<id>`, deleted in the same commit as the runs taken back, so it is not
//!    listed after a restart or on a new leader either. Runners whose warmup names the node get
//!    a failed warmup saying so (their ready sandboxes go with it), so neither new runs nor a
//!    restarted scheduler prefer a node that is gone.
//!
//! A node id that enrolls again afterwards starts as a new node; if its agent still runs
//! containers of the old one, its registration lists them and they are held and stopped as any
//! run without a lease. Without a cluster token (loopback development) agents need no
//! credential, so a removed node whose agent still runs registers again at once.

use super::nodes::node_not_found;
use super::{stop, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::codes::ErrorCode;
use berth_core::model::WarmupStatus;
use berth_core::store::Store;
use berth_core::{keys, now_unix_millis};

/// Who removes a node, which decides when it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// An operator (`RemoveNode`): refused while the node is connected and holds runs, unless
    /// `force` (they are then taken back as a lost node's).
    Admin { force: bool },
    /// The node itself (`Leave`): refused while it holds any run.
    Leave,
}

impl Removal {
    /// Why a node with `runs` runs leased to it is not removed, if it is not.
    fn refusal(self, node_id: &str, connected: bool, runs: usize) -> Option<SchedulerError> {
        let (held, them, they_have) = match runs {
            0 => return None,
            1 => ("1 run".to_owned(), "it", "it has"),
            n => (format!("{n} runs"), "them", "they have"),
        };
        let message = match self {
            Removal::Admin { force: true } => return None,
            Removal::Admin { force: false } if !connected => return None,
            Removal::Admin { force: false } => format!(
                "node {node_id} holds {held}: drain it and wait for {them} to end, or remove it \
                 with force (its running runs end node_lost, runs it has not started are queued \
                 again)"
            ),
            Removal::Leave => format!(
                "node {node_id} still holds {held}: it stays drained; leave again once \
                 {they_have} ended"
            ),
        };
        Some(SchedulerError::NodeHoldsRuns { runs, message })
    }
}

/// A removed node, as it was.
#[derive(Debug, Clone)]
pub struct RemovedNode {
    pub node_id: String,
    /// Its region (its credential's when it never connected to this scheduler).
    pub region: String,
    /// The node as the node list showed it just before it was removed (with the runs it held);
    /// `None` for a node enrolled that never connected to this scheduler.
    pub last_seen: Option<super::NodeInfo>,
    /// The error that ended its last session, if it had not delivered a report since.
    pub last_error: Option<String>,
}

/// What a node leaving is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveOutcome {
    /// The runs still leased to it (assigned and not started, or running).
    pub active_runs: u32,
    pub removed: bool,
}

impl<S: Store> Scheduler<S> {
    /// Removes `node_id` from the fleet (see the module's steps). `NotFound` for a node the
    /// scheduler does not know (nor has a valid credential of): one removed already, say.
    pub async fn remove_node(
        &self,
        node_id: &str,
        how: Removal,
    ) -> Result<RemovedNode, SchedulerError> {
        let now = now_unix_millis();
        // No credential is issued for the node while its credentials are revoked.
        let _one = self.enrolling.lock().await;
        let credentials = self.node_credentials_of(node_id).await?;
        let enrolled_in = credentials
            .iter()
            .find(|(c, _)| c.revoked_at.is_none())
            .map(|(c, _)| c.region.clone());
        {
            let mut st = self.state.lock().await;
            match st.nodes.get(node_id).map(|n| n.connected) {
                // Enrolled, never connected to this scheduler: its credentials are all there is.
                None if enrolled_in.is_some() => {}
                None => return Err(node_not_found(node_id)),
                Some(connected) => {
                    let runs = st.runs_on(node_id).len();
                    if let Some(refused) = how.refusal(node_id, connected, runs) {
                        tracing::info!(
                            node_id,
                            runs,
                            connected,
                            ?how,
                            "node not removed: it holds runs"
                        );
                        return Err(refused);
                    }
                    if let Some(node) = st.nodes.get_mut(node_id) {
                        node.removing = true;
                    }
                    st.sync_node(node_id);
                }
            }
        }
        if let Err(e) = self.store_revocations(credentials, now).await {
            let mut st = self.state.lock().await;
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.removing = false;
            }
            st.sync_node(node_id);
            return Err(e);
        }
        let mut st = self.state.lock().await;
        // Seen as it was before the removal began (not as `removing` shows it).
        if let Some(node) = st.nodes.get_mut(node_id) {
            node.removing = false;
        }
        st.sync_node(node_id);
        let last_seen = st
            .index
            .get(node_id)
            .cloned()
            .and_then(|view| self.node_info(&st, view));
        let region = st
            .nodes
            .get(node_id)
            .map(|n| n.region.clone())
            .or(enrolled_in)
            .unwrap_or_default();
        let last_error = self.delivery_error(node_id);
        let leased = st.runs_on(node_id);
        let ephemeral_for = st.nodes.get(node_id).and_then(|n| n.ephemeral_for.clone());
        // Nothing reaches the node once it is gone: what it runs for the fleet is stopped first.
        let stale: Vec<String> = st
            .nodes
            .get(node_id)
            .map(|n| {
                n.stale
                    .keys()
                    .filter(|id| !n.cleaning.contains(*id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for run_id in leased.iter().chain(&stale) {
            st.send_to(node_id, stop(run_id));
        }
        let reason = format!(
            "node {node_id} was removed from the fleet; it joins again only by enrolling with a \
             registration token"
        );
        st.close_session(node_id, reason.clone());
        self.cut_off(&mut st, node_id, &reason);
        st.take_leases_back(node_id, "was removed", "was removed from the fleet", now)?;
        if let Some(mut run) = ephemeral_for.and_then(|id| st.active.get(&id).cloned()) {
            run.fail(
                ErrorCode::NodeLost,
                &format!("its ephemeral node {node_id} was removed from the fleet"),
                now,
            )?;
            st.stage(run);
        }
        st.forget_node(node_id);
        self.forget_liveness(node_id);
        self.forget_delivery(node_id);
        tracing::warn!(
            node_id,
            region = %region,
            ?how,
            runs_taken_back = leased.len(),
            stale_runs_stopped = stale.len(),
            "node removed from the fleet: credentials revoked, session closed, record deleted"
        );
        self.settle(st, true).await?;
        // The node is gone whatever happens here: a warmup left naming it only pins nothing.
        if let Err(error) = self.drop_warmups_on(node_id).await {
            tracing::warn!(node_id, %error, "the warmups on the removed node could not be marked failed");
        }
        Ok(RemovedNode {
            node_id: node_id.to_owned(),
            region,
            last_seen,
            last_error,
        })
    }

    /// A node leaving by itself (`Leave`): drains it (stored, as an operator's drain) and says
    /// how many runs it still holds, or with `remove` removes it once it holds none.
    pub async fn leave_node(
        &self,
        node_id: &str,
        remove: bool,
    ) -> Result<LeaveOutcome, SchedulerError> {
        if remove {
            self.remove_node(node_id, Removal::Leave).await?;
            return Ok(LeaveOutcome {
                active_runs: 0,
                removed: true,
            });
        }
        let held = {
            let st = self.state.lock().await;
            st.nodes
                .get(node_id)
                .map(|n| (n.draining, st.runs_on(node_id).len()))
        };
        let active_runs = match held {
            // Asked again while its runs end: nothing to write.
            Some((true, runs)) => runs,
            Some((false, _)) => self
                .set_draining(node_id, true)
                .await?
                .running_run_ids
                .len(),
            // Enrolled, never connected here: there is nothing to drain.
            None if self.node_is_known(node_id).await? => 0,
            None => return Err(node_not_found(node_id)),
        };
        tracing::info!(node_id, active_runs, "node leaving: drained");
        Ok(LeaveOutcome {
            active_runs: u32::try_from(active_runs).unwrap_or(u32::MAX),
            removed: false,
        })
    }

    /// Marks failed every runner's warmup on `node_id` (a removed node), so no run and no
    /// restarted scheduler prefers it; their ready sandboxes go with it.
    async fn drop_warmups_on(&self, node_id: &str) -> Result<(), SchedulerError> {
        for (runner, _) in self.all_runners().await? {
            if runner.warmup.as_ref().is_none_or(|w| w.node_id != node_id) {
                continue;
            }
            let dropped = self
                .change_runner(&runner.id, |runner| {
                    let Some(w) = runner.warmup.as_mut().filter(|w| w.node_id == node_id) else {
                        return false; // a newer warmup chose another node
                    };
                    w.node_id.clear();
                    w.status = WarmupStatus::Failed;
                    w.error = Some(format!(
                        "node {node_id} was removed from the fleet; warm the runner up again"
                    ));
                    w.sandboxes = 0;
                    true
                })
                .await?;
            if dropped {
                tracing::info!(runner_id = %runner.id, node_id, "warmup dropped: its node was removed");
            }
        }
        Ok(())
    }
}

impl State {
    /// Forgets `node_id`: memory, the placement index (with what its leases and stale runs
    /// held there), its warm pins, and its stored record (staged).
    pub(super) fn forget_node(&mut self, node_id: &str) {
        self.nodes.remove(node_id);
        self.index.remove(node_id);
        self.warm_pins.remove(node_id);
        self.delete(keys::node(node_id));
    }
}
