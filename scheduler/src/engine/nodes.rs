//! Nodes and their liveness: what the engine knows of each node, (re-)registration and its
//! reconciliation of leases, disconnection, expiry of silent nodes and of nodes whose sessions
//! keep failing without a report delivered (their leases are revoked),
//! draining, and the node list the API shows. Every message from a node renews all its leases
//! ([`Scheduler::touch`]), recorded outside the engine lock.

use super::{committed, encode, stop, Link, Scheduler, State};
use crate::error::SchedulerError;
use crate::placement::{NodeState, NodeView};
use berth_core::agent::{AgentCommand, Registered, Registration};
use berth_core::codes::ErrorCode;
use berth_core::store::{Expect, Store};
use berth_core::{keys, now_unix_millis, Run, RunStatus};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) struct Node {
    pub(super) id: String,
    pub(super) region: String,
    pub(super) boot_id: String,
    pub(super) total_memory_mib: u64,
    pub(super) cpus: u32,
    pub(super) max_runs: u32,
    pub(super) connected: bool,
    /// Missed heartbeats past TTL + grace, or its sessions kept failing that long; its leases
    /// were revoked.
    pub(super) lost: bool,
    /// Lost because its sessions kept failing without a report delivered (see `delivery`):
    /// it stays lost while it keeps re-registering, until it delivers again.
    pub(super) undeliverable: bool,
    /// An operator asked for no new leases (stored, survives restarts).
    pub(super) draining: bool,
    /// The agent is shutting down (it refused a run with `node_draining`); cleared when it
    /// registers again.
    pub(super) shutting_down: bool,
    /// Being removed (see `removal`): it takes no new run while its credentials are revoked.
    /// Memory only (a removal that fails clears it; one that succeeds deletes the node).
    pub(super) removing: bool,
    pub(super) connection: u64,
    /// How to reach the agent while it is connected.
    pub(super) link: Option<Link>,
    pub(super) cached_images: Arc<BTreeSet<String>>,
    /// Containers the agent still runs, or may still run, for runs no longer leased to it (leases
    /// revoked while it was lost, runs canceled while assigned to it, runs it reports without
    /// holding their lease), with the memory
    /// each holds (the whole node when the scheduler does not know). They count against the
    /// node's capacity in the index, like leases, until the agent says they are gone: a
    /// heartbeat or registration that no longer lists them, their `RunExited` (from an agent
    /// that sends it once the container is cleaned up) or their `RunReleased`. So a node that
    /// comes back is never handed more than it can hold while it still kills what it ran before.
    pub(super) stale: BTreeMap<String, u64>,
    /// Of `stale`, the runs whose exit the agent reported before cleaning them up
    /// (`cleanup_pending`): held like the others, but nothing to stop.
    pub(super) cleaning: BTreeSet<String>,
    /// An ephemeral node (`berthctl run --here`): the one run it exists for. It takes no other
    /// (the index holds it reserved for that run) and is removed once the run has ended and the
    /// node has left or is lost.
    pub(super) ephemeral_for: Option<String>,
    /// The OCI runtimes it registered with (`runc`, `runsc`).
    pub(super) runtimes: Vec<String>,
}

impl Node {
    /// Known from the store or from a lease, not (yet) connected since this process started.
    pub(super) fn placeholder(id: &str, region: &str, draining: bool) -> Node {
        Node {
            id: id.to_owned(),
            region: region.to_owned(),
            boot_id: String::new(),
            total_memory_mib: 0,
            cpus: 0,
            max_runs: 0,
            connected: false,
            lost: false,
            undeliverable: false,
            draining,
            shutting_down: false,
            removing: false,
            connection: 0,
            link: None,
            cached_images: Arc::default(),
            stale: BTreeMap::new(),
            cleaning: BTreeSet::new(),
            ephemeral_for: None,
            runtimes: Vec::new(),
        }
    }

    pub(super) fn status(&self) -> NodeState {
        if self.lost {
            NodeState::Lost
        } else if !self.connected {
            NodeState::Disconnected
        } else if self.draining || self.shutting_down || self.removing {
            NodeState::Draining
        } else {
            NodeState::Ready
        }
    }

    pub(super) fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.id.clone(),
            region: self.region.clone(),
            draining: self.draining,
            ephemeral_for: self.ephemeral_for.clone(),
        }
    }
}

/// What the store keeps about a node: what must survive a scheduler restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct NodeRecord {
    pub(super) id: String,
    pub(super) region: String,
    pub(super) draining: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) ephemeral_for: Option<String>,
}

/// A node as `ListNodes` shows it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub view: NodeView,
    /// The OCI runtimes it has.
    pub runtimes: Vec<String>,
    pub draining: bool,
    pub cpus: u32,
    pub running_run_ids: Vec<String>,
    pub last_heartbeat_age: Duration,
}

impl<S: Store> Scheduler<S> {
    /// Records that `node_id` was heard from at `at`: every message renews all its leases.
    pub fn touch(&self, node_id: &str, at: Instant) {
        let mut live = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let seen = live.entry(node_id.to_owned()).or_insert(at);
        if at > *seen {
            *seen = at;
        }
    }

    pub(super) fn last_seen(&self, node_id: &str) -> Option<Instant> {
        let live = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        live.get(node_id).copied()
    }

    pub async fn list_nodes(&self) -> Vec<NodeInfo> {
        let st = self.state.lock().await;
        let mut views: Vec<NodeView> = st.index.nodes().cloned().collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
            .into_iter()
            .filter_map(|view| self.node_info(&st, view))
            .collect()
    }

    /// The node `view` shows, as the node list shows it.
    pub(super) fn node_info(&self, st: &State, view: NodeView) -> Option<NodeInfo> {
        let node = st.nodes.get(&view.id)?;
        Some(NodeInfo {
            view,
            runtimes: node.runtimes.clone(),
            draining: node.draining,
            cpus: node.cpus,
            running_run_ids: st.runs_on(&node.id),
            last_heartbeat_age: self
                .last_seen(&node.id)
                .map(|t| t.elapsed())
                .unwrap_or_default(),
        })
    }

    /// A node (re-)registered on a new stream. Reconciles what it says it is running with what
    /// the scheduler has leased to it, answers `Registered` (then the node's warm pins and the
    /// stops asked for while it was away) on `link` at once, and places waiting runs.
    pub async fn attach_node(&self, reg: Registration, link: Link) -> Result<u64, SchedulerError> {
        self.attach(reg, link, None).await
    }

    /// [`Self::attach_node`] for a session whose credential was checked after `checked` was
    /// taken ([`Self::revocation_mark`]): refused if the node was revoked or removed since, so
    /// a check that passed just before a revocation was stored cannot bring the node back.
    pub async fn attach_node_checked(
        &self,
        reg: Registration,
        link: Link,
        checked: super::RevocationMark,
    ) -> Result<u64, SchedulerError> {
        self.attach(reg, link, Some(checked)).await
    }

    async fn attach(
        &self,
        reg: Registration,
        link: Link,
        checked: Option<super::RevocationMark>,
    ) -> Result<u64, SchedulerError> {
        if reg.node_id.is_empty() || reg.region.is_empty() {
            return Err(SchedulerError::Protocol(
                "register needs node_id and region".to_owned(),
            ));
        }
        let ephemeral_for = self.check_ephemeral(&reg).await?;
        let mut st = self.state.lock().await;
        if let Some(super::RevocationMark(mark)) = checked {
            if st.revoked_at.get(&reg.node_id).is_some_and(|&at| at > mark) {
                return Err(super::identity::revoked(&reg.node_id));
            }
        }
        st.next_connection += 1;
        let connection = st.next_connection;
        let previous = st.nodes.remove(&reg.node_id);
        let restarted = previous
            .as_ref()
            .is_some_and(|n| !n.boot_id.is_empty() && n.boot_id != reg.boot_id);
        let draining = previous.as_ref().is_some_and(|n| n.draining);
        // A node being removed stays out of placement while it re-registers.
        let removing = previous.as_ref().is_some_and(|n| n.removing);
        // Still held in the index: carried over, reconciled with the runs reported below.
        let (stale, cleaning) = previous
            .as_ref()
            .map(|n| (n.stale.clone(), n.cleaning.clone()))
            .unwrap_or_default();
        let now_instant = Instant::now();
        // Registering again does not make a node that cannot deliver any less lost.
        let undeliverable = previous.as_ref().is_some_and(|n| n.undeliverable)
            && self.failing_too_long(&reg.node_id, now_instant).is_some();
        let node = Node {
            id: reg.node_id.clone(),
            region: reg.region.clone(),
            boot_id: reg.boot_id.clone(),
            total_memory_mib: reg.total_memory_mib,
            cpus: reg.cpus,
            max_runs: reg.max_concurrent_runs.max(1),
            connected: true,
            lost: undeliverable,
            undeliverable,
            draining,
            shutting_down: false,
            removing,
            connection,
            link: Some(link.clone()),
            cached_images: Arc::new(reg.cached_images.into_iter().collect()),
            stale,
            cleaning,
            ephemeral_for,
            runtimes: reg.runtimes.clone(),
        };
        if previous.as_ref().map(Node::record) != Some(node.record()) {
            let rec = node.record();
            st.write(keys::node(&rec.id), encode(&rec), Expect::Any);
        }
        st.nodes.insert(reg.node_id.clone(), node);
        st.sync_node(&reg.node_id);
        self.touch(&reg.node_id, now_instant);
        self.session_started(&reg.node_id, now_instant);
        tracing::info!(
            node_id = %reg.node_id, region = %reg.region, boot_id = %reg.boot_id,
            memory_mib = reg.total_memory_mib, active = reg.active_run_ids.len(), restarted,
            undeliverable, "node registered"
        );

        let reported: HashSet<&str> = reg.active_run_ids.iter().map(String::as_str).collect();
        let leased: Vec<(String, RunStatus)> = st
            .active
            .values()
            .filter(|c| c.node_id.as_deref() == Some(reg.node_id.as_str()))
            .map(|c| (c.id.clone(), c.status))
            .collect();
        let now = now_unix_millis();
        for (run_id, status) in &leased {
            if reported.contains(run_id.as_str()) {
                continue;
            }
            let Some(cached) = st.active.get(run_id) else {
                continue;
            };
            let mut run = cached.clone();
            if *status == RunStatus::Pending {
                run.requeue(&format!(
                    "node {} restarted before starting it",
                    reg.node_id
                ))?;
                tracing::warn!(run_id = %run_id, node_id = %reg.node_id, "re-queued: node does not know the run");
            } else {
                run.fail(
                    ErrorCode::NodeRestarted,
                    &format!(
                        "the agent on node {} restarted and lost the run",
                        reg.node_id
                    ),
                    now,
                )?;
                tracing::warn!(run_id = %run_id, node_id = %reg.node_id, "failed: node lost the run");
            }
            st.stage(run);
        }
        // What it runs without a lease is stopped, and held against its capacity until gone.
        let (stale_run_ids, _) = st.reconcile_stale(&reg.node_id, &reg.active_run_ids);
        let _ = link.send(AgentCommand::Registered(Registered {
            heartbeat_interval_seconds: u32::try_from(self.config.heartbeat_interval.as_secs())
                .unwrap_or(2)
                .max(1),
            stale_run_ids,
        }));
        let _ = link.send(self.warm_pins(&st, &reg.node_id));
        // Stops asked for while the node was away.
        for c in st.active.values() {
            if c.stop_requested && c.node_id.as_deref() == Some(reg.node_id.as_str()) {
                let _ = link.send(stop(&c.id));
            }
        }
        self.settle(st, true).await?;
        Ok(connection)
    }

    /// The node's stream ended. Its runs keep their leases until it comes back.
    pub async fn detach_node(&self, node_id: &str, connection: u64) {
        let mut st = self.state.lock().await;
        if let Some(node) = st.nodes.get_mut(node_id) {
            if node.connection == connection {
                node.connected = false;
                node.link = None;
                tracing::warn!(node_id, "node disconnected");
                st.sync_node(node_id);
                if st.remove_if_ephemeral_done(node_id) {
                    let done = self.flush(&mut st);
                    drop(st);
                    if let Err(error) = committed(done).await {
                        tracing::error!(node_id, %error, "removing an ephemeral node failed");
                    }
                    self.forget_liveness(node_id);
                }
            }
        }
    }

    /// Declares lost every node silent for longer than TTL + grace, and takes its leases back:
    /// runs that had not started are queued again, runs that had started end `failed` with
    /// `node_lost`. Called periodically; `now` is a parameter so tests control the clock.
    ///
    /// Started runs are not retried: a run may have had effects outside its container (a
    /// payment, a message) and the silent node may still be running it, so running it again
    /// unasked could do them twice. The caller sees `node_lost` and decides; a per-runner
    /// retry policy is issue #15. Every revoked run keeps its memory and slot held on the
    /// node (see `Node::stale`) until the node says the container is gone.
    pub async fn expire_nodes(&self, now: Instant) -> Result<(), SchedulerError> {
        let limit = self.config.node_ttl + self.config.lost_grace;
        let mut st = self.state.lock().await;
        // A node lost because it could not deliver, whose streak is over: it is back.
        let recovered: Vec<String> = st
            .nodes
            .values()
            .filter(|n| n.undeliverable && self.failing_too_long(&n.id, now).is_none())
            .map(|n| n.id.clone())
            .collect();
        for node_id in &recovered {
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.undeliverable = false;
                node.lost = !node.connected;
            }
            st.sync_node(node_id);
            tracing::info!(node_id = %node_id, "node delivers again");
        }
        let mut expired: Vec<(String, Option<Instant>)> = Vec::new();
        for n in st.nodes.values().filter(|n| !n.lost) {
            let seen = self.last_seen(&n.id).unwrap_or(now);
            if now.saturating_duration_since(seen) > limit {
                expired.push((n.id.clone(), None));
            } else if let Some(since) = self.failing_too_long(&n.id, now) {
                // It keeps registering (which renews its liveness) but never delivers.
                expired.push((n.id.clone(), Some(since)));
            }
        }
        if expired.is_empty() {
            if recovered.is_empty() {
                return Ok(());
            }
            return self.settle(st, true).await;
        }
        let at = now_unix_millis();
        for (node_id, failing_since) in &expired {
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.lost = true;
                node.undeliverable = failing_since.is_some();
            }
            crate::metrics::node_lost();
            st.sync_node(node_id);
            match failing_since {
                None => tracing::warn!(node_id = %node_id, silent_for = ?limit, "node lost"),
                Some(since) => tracing::warn!(
                    node_id = %node_id,
                    failing_for = ?now.saturating_duration_since(*since),
                    last_error = ?self.delivery_error(node_id),
                    "node lost: its sessions keep failing without a report delivered"
                ),
            }
            let why = if failing_since.is_some() {
                "could not deliver its reports"
            } else {
                "stopped sending heartbeats"
            };
            st.take_leases_back(node_id, "was lost", why, at)?;
            if st.remove_if_ephemeral_done(node_id) {
                self.forget_liveness(node_id);
            }
        }
        self.settle(st, true).await
    }

    /// Per region, the runs waiting for a node and the runs not yet ended (for the metrics).
    pub async fn run_counts_by_region(&self) -> Vec<(String, (u64, u64))> {
        let st = self.state.lock().await;
        let mut counts: std::collections::BTreeMap<&str, (u64, u64)> =
            std::collections::BTreeMap::new();
        for run in st.active.values() {
            let c = counts.entry(run.region.as_str()).or_default();
            c.1 += 1;
            if run.node_id.is_none() {
                c.0 += 1;
            }
        }
        counts
            .into_iter()
            .map(|(region, c)| (region.to_owned(), c))
            .collect()
    }

    /// Drain (no new leases; running runs finish) or resume a node.
    pub async fn set_draining(
        &self,
        node_id: &str,
        draining: bool,
    ) -> Result<NodeInfo, SchedulerError> {
        let done = {
            let mut st = self.state.lock().await;
            let node = st
                .nodes
                .get_mut(node_id)
                .ok_or_else(|| node_not_found(node_id))?;
            node.draining = draining;
            let rec = node.record();
            st.sync_node(node_id);
            st.write(keys::node(node_id), encode(&rec), Expect::Any);
            tracing::info!(node_id, draining, "node admin state changed");
            if !draining {
                self.schedule(&mut st)?;
            }
            self.flush(&mut st)
        };
        committed(done).await?;
        self.notify();
        self.list_nodes()
            .await
            .into_iter()
            .find(|n| n.view.id == node_id)
            .ok_or_else(|| node_not_found(node_id))
    }
}

impl State {
    /// The runs leased to `node_id` (assigned and not started, or running).
    pub(super) fn runs_on(&self, node_id: &str) -> Vec<String> {
        self.active
            .values()
            .filter(|c| c.node_id.as_deref() == Some(node_id))
            .map(|c| c.id.clone())
            .collect()
    }

    /// Takes back every lease of a node that is gone (lost, or its credential revoked): runs it
    /// had not started are queued again ("node X `gone` before it started the run"), started
    /// ones end `failed` with `node_lost` ("node X `why` while the run was running"). Each
    /// keeps its memory and slot held on the node (see `Node::stale`) until the node says the
    /// container is gone.
    pub(super) fn take_leases_back(
        &mut self,
        node_id: &str,
        gone: &str,
        why: &str,
        at: i64,
    ) -> Result<(), SchedulerError> {
        let leased: Vec<Run> = self
            .active
            .values()
            .filter(|c| c.node_id.as_deref() == Some(node_id))
            .cloned()
            .collect();
        for mut run in leased {
            // An ephemeral run has no other node to go to.
            if run.status == RunStatus::Pending && run.ephemeral.is_none() {
                run.requeue(&format!("node {node_id} {gone} before it started the run"))?;
            } else if run.status == RunStatus::Pending {
                run.fail(
                    ErrorCode::NodeLost,
                    &format!("its ephemeral node {node_id} {gone} before it started the run"),
                    at,
                )?;
            } else {
                run.fail(
                    ErrorCode::NodeLost,
                    &format!("node {node_id} {why} while the run was running"),
                    at,
                )?;
            }
            tracing::warn!(run_id = %run.id, node_id = %node_id, status = %run.status, "lease revoked");
            let (run_id, memory_mib) = (run.id.clone(), run.memory_mib);
            self.stage(run);
            // The node may still run it: its capacity stays held until it says not.
            self.hold_stale(node_id, &run_id, memory_mib);
        }
        Ok(())
    }

    /// Brings the index's view of `node_id` in line with its flags and report, keeping the
    /// memory and slots its leases hold.
    pub(super) fn sync_node(&mut self, node_id: &str) {
        let Some(n) = self.nodes.get(node_id) else {
            return;
        };
        let (reserved_memory_mib, runs) = self
            .index
            .get(node_id)
            .map_or((0, 0), |v| (v.reserved_memory_mib, v.runs));
        self.index.upsert(NodeView {
            id: n.id.clone(),
            region: n.region.clone(),
            status: n.status(),
            total_memory_mib: n.total_memory_mib,
            reserved_memory_mib,
            sandbox_memory_mib: self.sandbox_memory_mib(node_id),
            max_runs: n.max_runs,
            runs,
            cached_images: n.cached_images.clone(),
            // An ephemeral node is its run's alone.
            reserved_for: n.ephemeral_for.clone(),
            sandbox: n
                .runtimes
                .iter()
                .any(|r| r == berth_core::model::RUNTIME_RUNSC),
        });
    }

    /// Holds `memory_mib` and a slot of `node_id` for a container of `run_id` that the node may
    /// still run without a lease (see [`Node::stale`]). Held once per run.
    pub(super) fn hold_stale(&mut self, node_id: &str, run_id: &str, memory_mib: u64) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        if node.stale.contains_key(run_id) {
            return;
        }
        node.stale.insert(run_id.to_owned(), memory_mib);
        tracing::info!(
            node_id,
            run_id,
            memory_mib,
            "capacity held for a run the node may still run"
        );
        self.index_lease(Some(node_id), None, memory_mib);
    }

    /// Holds what `run_id` used on `node_id` while the agent cleans up after its reported exit
    /// (released by [`Self::release_stale`] on `RunReleased`, or when a heartbeat no longer
    /// lists it).
    pub(super) fn hold_while_cleaning(&mut self, node_id: &str, run_id: &str, memory_mib: u64) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        node.cleaning.insert(run_id.to_owned());
        if node.stale.insert(run_id.to_owned(), memory_mib).is_none() {
            self.index_lease(Some(node_id), None, memory_mib);
        }
    }

    /// The node no longer runs `run_id`: what it held is free again. False if nothing was held.
    pub(super) fn release_stale(&mut self, node_id: &str, run_id: &str) -> bool {
        let Some((memory_mib, cleaning)) = self.nodes.get_mut(node_id).and_then(|n| {
            let cleaning = n.cleaning.remove(run_id);
            n.stale.remove(run_id).map(|m| (m, cleaning))
        }) else {
            return false;
        };
        if cleaning {
            self.index_lease(None, Some(node_id), memory_mib);
            return true;
        }
        tracing::info!(
            node_id,
            run_id,
            memory_mib,
            "stale run gone; capacity free again"
        );
        self.index_lease(None, Some(node_id), memory_mib);
        true
    }

    /// Brings the node's stale runs in line with `running`, every run the agent says it
    /// supervises: those not leased to it are held (and returned: the agent must stop them),
    /// held ones it no longer lists are released (the second value: whether any was).
    pub(super) fn reconcile_stale(
        &mut self,
        node_id: &str,
        running: &[String],
    ) -> (Vec<String>, bool) {
        let Some(node) = self.nodes.get(node_id) else {
            return (Vec::new(), false);
        };
        let whole_node = node.total_memory_mib;
        let listed: HashSet<&str> = running.iter().map(String::as_str).collect();
        let gone: Vec<String> = node
            .stale
            .keys()
            .filter(|id| !listed.contains(id.as_str()))
            .cloned()
            .collect();
        let mut released = false;
        for run_id in &gone {
            released |= self.release_stale(node_id, run_id);
        }
        let mut stale = Vec::new();
        for run_id in running {
            let run = self.active.get(run_id);
            if run.is_some_and(|r| r.node_id.as_deref() == Some(node_id)) {
                continue;
            }
            if self
                .nodes
                .get(node_id)
                .is_some_and(|n| n.cleaning.contains(run_id))
            {
                continue; // ended, being cleaned up: held, nothing to stop
            }
            // A run still waiting or placed elsewhere says how much it holds; for one that has
            // ended the scheduler no longer knows, so the whole node is held until it is gone.
            let memory_mib = self
                .nodes
                .get(node_id)
                .and_then(|n| n.stale.get(run_id).copied())
                .or_else(|| run.map(|r| r.memory_mib))
                .unwrap_or(whole_node);
            self.hold_stale(node_id, run_id, memory_mib);
            stale.push(run_id.clone());
        }
        (stale, released)
    }

    /// Moves one run's lease (its memory and slot) from node `from` to node `to` in the index.
    pub(super) fn index_lease(&mut self, to: Option<&str>, from: Option<&str>, memory_mib: u64) {
        if let Some(from) = from {
            if let Err(e) = self.index.release(from, memory_mib) {
                tracing::error!(error = %e, "lease released on a node the index does not know");
            }
        }
        if let Some(to) = to {
            if let Err(e) = self.index.reserve(to, memory_mib) {
                tracing::error!(error = %e, "lease taken on a node the index does not know");
            }
        }
    }
}

/// The answer for a node the scheduler does not know.
pub(super) fn node_not_found(node_id: &str) -> SchedulerError {
    SchedulerError::NotFound {
        kind: "node",
        id: node_id.to_owned(),
    }
}
